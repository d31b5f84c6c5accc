//! Idle clients cost almost nothing: 10k connections that each sent one
//! GET and went quiet, through the real proxy in front of a real Redis.
//! A regression guard with a generous margin over the figure README
//! documents (measured on the release build, `cargo xtask bench --only
//! idle`), not the benchmark.

use testbed::idle::{self, IdleClients};

const CLIENTS: u64 = 10_000;
/// README: about 1.8 KiB per idle client (release and debug alike). More
/// than twice that, so the guard catches what matters, such as a buffer or
/// channel per idle client coming back (they cost 14 KiB), or a session
/// future or per-client collection that doubles, not allocator noise.
const MAX_BYTES_PER_CLIENT: u64 = 4 * 1024;

#[test]
fn ten_thousand_idle_clients_stay_within_the_documented_memory() {
    let hard = idle::raise_open_files_limit();
    let needed = CLIENTS + idle::SPARE_FDS;
    assert!(
        hard >= needed,
        "the hard open-files limit {hard} is below the {needed} this test needs"
    );
    let mut idle = IdleClients::open(CLIENTS);
    let per_client = idle.bytes_per_client();
    println!(
        "{CLIENTS} idle clients: RSS {} -> {} KiB, {per_client} bytes each",
        idle.before_kib, idle.after_kib
    );
    assert!(
        per_client <= MAX_BYTES_PER_CLIENT,
        "{per_client} bytes of RSS per idle client (bound {MAX_BYTES_PER_CLIENT})"
    );
    // Idle, not stuck: each still gets an answer, and on the same
    // upstream connections (one shared connection, nothing per client).
    for stream in idle.clients.iter_mut().step_by(1000) {
        idle::get(stream);
    }
    let upstream = idle.redis.cli(&["CLIENT", "LIST"]).lines().count();
    assert!(
        upstream < 20,
        "{upstream} upstream connections for idle clients"
    );
}
