//! What an idle client costs the proxy: RSS per connection that sent one
//! `GET` and went quiet (a PHP-FPM or Node.js pool between requests), at
//! 10k and 50k clients, release build, against one `redis-server`
//! (`testbed::idle`).
//!
//! `tests/tests/idle_clients.rs` guards the same figure loosely at 10k; this
//! is the measurement, with the target. Both ends need a socket per client:
//! a count above the hard open-files limit (which only `CAP_SYS_RESOURCE`
//! raises) is reported as not measurable, and counted as MISSED; the most
//! clients the limit allows are measured instead, so a per-client cost that
//! grew with the count would still show.

use testbed::idle::{self, IdleClients};

/// The bound: half predixy's 4.6 KiB.
const TARGET_BYTES: u64 = 2 * 1024;
const COUNTS: [u64; 2] = [10_000, 50_000];

/// Prints bytes of RSS per idle client for each count, with MISSED where
/// over the target or not measurable (a bench reports; it does not fail).
pub fn idle_clients() {
    println!("\n== idle clients: proxy RSS per client that sent one GET and went quiet");
    let hard = idle::raise_open_files_limit();
    let most = most_measurable(hard);
    for count in COUNTS {
        if count > most {
            println!(
                "  {count:>6} clients: not measurable here: the hard open-files limit is {hard} (raising it needs CAP_SYS_RESOURCE)  MISSED"
            );
            continue;
        }
        let per_client = IdleClients::open(count).bytes_per_client();
        println!(
            "  {count:>6} clients: {per_client} bytes each (target {TARGET_BYTES})  {}",
            verdict(per_client)
        );
    }
    // A count out of reach: the most the limit allows, to see whether the
    // cost per client stays flat as clients grow, short of the count.
    if COUNTS.iter().any(|&count| count > most) && most > COUNTS[0] {
        let per_client = IdleClients::open(most).bytes_per_client();
        println!(
            "  {most:>6} clients (the most this limit allows): {per_client} bytes each (target {TARGET_BYTES})  {}",
            verdict(per_client)
        );
    }
}

fn verdict(per_client: u64) -> &'static str {
    if per_client <= TARGET_BYTES {
        "ok"
    } else {
        "MISSED"
    }
}

/// The most idle clients both ends can hold under the hard open-files
/// limit, in whole thousands.
fn most_measurable(hard: u64) -> u64 {
    hard.saturating_sub(idle::SPARE_FDS) / 1000 * 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_measurable_count_leaves_the_spare_descriptors() {
        assert_eq!(most_measurable(20_000), 19_000);
        assert_eq!(most_measurable(1_048_576), 1_048_000);
        assert_eq!(most_measurable(100), 0);
        assert!(most_measurable(20_000) + idle::SPARE_FDS <= 20_000);
    }
}
