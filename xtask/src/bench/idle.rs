//! What an idle client costs the proxy: RSS per connection that sent one
//! `GET` and went quiet (a PHP-FPM or Node.js pool between requests), at
//! 10k and 50k clients, release build, against one `redis-server`
//! (`testbed::idle`).
//!
//! `tests/tests/idle_clients.rs` guards the same figure loosely at 10k; this
//! is the measurement, with the target. Both ends need a socket per client:
//! a count above the hard open-files limit (which only `CAP_SYS_RESOURCE`
//! raises) is reported as not measurable, and counted as MISSED.

use testbed::idle::{self, IdleClients};

/// The bound: half predixy's 4.6 KiB.
const TARGET_BYTES: u64 = 2 * 1024;
const COUNTS: [u64; 2] = [10_000, 50_000];

/// Prints bytes of RSS per idle client for each count, with MISSED where
/// over the target or not measurable (a bench reports; it does not fail).
pub fn idle_clients() {
    println!("\n== idle clients: proxy RSS per client that sent one GET and went quiet");
    let hard = idle::raise_open_files_limit();
    for count in COUNTS {
        if count + idle::SPARE_FDS > hard {
            println!(
                "  {count:>6} clients: not measurable here: the hard open-files limit is {hard} (raising it needs CAP_SYS_RESOURCE)  MISSED"
            );
            continue;
        }
        let per_client = IdleClients::open(count).bytes_per_client();
        let verdict = if per_client <= TARGET_BYTES {
            "ok"
        } else {
            "MISSED"
        };
        println!(
            "  {count:>6} clients: {per_client} bytes each (target {TARGET_BYTES})  {verdict}"
        );
    }
}
