//! A few units of Redis's own test suite (the one matching the installed
//! `redis-server`), run direct against a single-node cluster and through
//! redirector in front of a 3+3 cluster: every test that passes direct
//! passes through the proxy, and no unit aborts. The full suite is
//! `cargo xtask conformance`; these units are the ones a regression in
//! the one-Redis view (INFO merging, PUBLISH counts, keyspace
//! notifications, counters over shards) shows up in first.

use std::{
    sync::{LazyLock, Mutex},
    time::Duration,
};

use testbed::{
    cluster::RedisCluster,
    conformance::{self, SingleNodeCluster, Suite},
    proxy::Proxy,
};

/// Fetched once per test binary (`cargo xtask test` fetches it first, so
/// this only fetches when the test runs on its own).
static SUITE: LazyLock<Suite> = LazyLock::new(|| {
    let suite = conformance::suite_dir()
        .unwrap_or_else(|e| panic!("Redis's test suite cannot be located: {e}"));
    suite.fetch().unwrap_or_else(|e| {
        panic!(
            "Redis {}'s test suite is not available (`cargo xtask setup` fetches it): {e}",
            suite.version
        )
    });
    suite
});

const UNIT_TIMEOUT: Duration = Duration::from_secs(300);

/// One unit at a time: the suite has timing-sensitive tests, and two
/// clusters with their proxies and runners would share two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn passes_through_the_proxy_as_direct(unit: &str) {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let suite = &*SUITE;
    let direct = {
        let server = SingleNodeCluster::start();
        suite.run_unit(unit, server.addr(), UNIT_TIMEOUT, &[])
    };
    assert!(
        direct.exception.is_none() && !direct.passed.is_empty(),
        "{unit} does not run direct, so it proves nothing through the proxy:\n{}",
        direct.output
    );
    let proxied = {
        let cluster = RedisCluster::start_local(3, 1);
        let proxy = Proxy::start(&cluster.seeds(), &[]);
        let result = suite.run_unit(unit, proxy.addr(), UNIT_TIMEOUT, &[]);
        drop(proxy);
        result
    };
    assert!(
        proxied.exception.is_none(),
        "{unit} aborts through the proxy: {}\n{}",
        proxied.exception.as_deref().unwrap_or_default(),
        proxied.output
    );
    let missing: Vec<&String> = direct
        .passed
        .iter()
        .filter(|test| !proxied.passed.contains(*test))
        .collect();
    assert!(
        missing.is_empty(),
        "{unit}: {} of {} tests that pass direct fail through the proxy: {missing:?}\n{}",
        missing.len(),
        direct.passed.len(),
        proxied.output
    );
}

#[test]
fn info_command_sections_read_as_one_redis() {
    passes_through_the_proxy_as_direct("unit/info-command");
}

#[test]
fn pubsub_counts_and_notifications_read_as_one_redis() {
    passes_through_the_proxy_as_direct("unit/pubsub");
}

#[test]
fn counters_read_as_one_redis() {
    passes_through_the_proxy_as_direct("unit/type/incr");
}

#[test]
fn keyspace_commands_span_every_shard_as_one_redis() {
    passes_through_the_proxy_as_direct("unit/keyspace");
}
