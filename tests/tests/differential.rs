//! Differential fuzzing: random valid command sequences, sent at the same
//! time to a standalone `redis-server` and through the proxy in front of a
//! real 3+3 Redis Cluster; every pair of replies must be equal, or differ
//! only as a named rule of `testbed::differential` allows.
//!
//! By default a fixed set of seeds runs (the same commands every time).
//! `DIFFERENTIAL_SECONDS=N` runs seeds from `DIFFERENTIAL_SEED` (or one
//! taken from the clock, printed) upwards for N seconds;
//! `DIFFERENTIAL_SEED` alone replays that one seed.

use std::time::{Duration, Instant, SystemTime};

use testbed::{
    TempDir,
    cluster::RedisCluster,
    differential::driver::{self, Sides},
    proxy::Proxy,
    redis::RedisServer,
};

/// The seeds `cargo xtask test` runs, 3000 units each: about 190,000
/// commands, 30 s on an idle 2-core machine.
const CI_SEEDS: std::ops::RangeInclusive<u64> = 1..=40;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}"))
    })
}

#[test]
fn random_command_sequences_get_the_same_replies_through_the_proxy_as_from_one_redis() {
    let cluster = RedisCluster::start_local(3, 1);
    let proxy = Proxy::start(&cluster.seeds(), &[]);
    let dir = TempDir::new("rdr-differential-");
    let redis = RedisServer::start_local(dir.path(), &[]);
    let sides = Sides {
        proxy: proxy.addr(),
        redis: redis.addr(),
    };

    let seconds = env_u64("DIFFERENTIAL_SECONDS");
    let seed = env_u64("DIFFERENTIAL_SEED");
    let started = Instant::now();
    let result = match (seconds, seed) {
        (Some(s), first) => {
            let first = first.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_secs()
            });
            println!("differential: seeds from {first} for {s} s");
            driver::run(sides, first.., Some(started + Duration::from_secs(s)))
        }
        (None, Some(one)) => driver::run(sides, [one], None),
        (None, None) => driver::run(sides, CI_SEEDS, None),
    };
    match result {
        Ok(stats) => println!(
            "differential: {stats} in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
        Err(mismatch) => panic!(
            "the proxy and one Redis disagree\n{mismatch}\nproxy log tail:\n{}",
            tail(&proxy.log(), 20)
        ),
    }
    assert!(proxy.log().lines().all(|l| !l.contains("panicked")));
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
