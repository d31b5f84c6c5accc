//! The SCAN cursor codec: any cursor a client sends decodes to a shard
//! slot or is refused; every cursor the proxy gives decodes back to the
//! position it was made from, and a scan visits each shard in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redirector::proxy::exec::scan_cursor;

/// Redis Cluster's slot count: a shard's first slot is below it.
const SLOTS: u16 = 16384;
/// Node cursors the proxy's cursor can carry (64 bits less the shard's 14).
const NODE_CURSOR_LIMIT: u64 = 1 << 50;

fuzz_target!(|data: &[u8]| {
    let Some((cursor, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let Some((next, rest)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let cursor = u64::from_le_bytes(*cursor);
    let next = u64::from_le_bytes(*next);
    // The shards' first slots, as the scan has them: sorted, unique.
    let mut firsts: Vec<u16> = rest
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) % SLOTS)
        .collect();
    firsts.sort_unstable();
    firsts.dedup();

    // Whatever a client sends: a shard slot, or a refusal.
    match scan_cursor::decode(cursor, &firsts) {
        Some((slot, node)) => {
            assert!(slot < SLOTS, "cursor {cursor} decodes to slot {slot}");
            assert!(node < NODE_CURSOR_LIMIT);
            if cursor == 0 {
                assert_eq!((Some(&slot), node), (firsts.first(), 0));
            }
        }
        None => assert!(cursor == 0 && firsts.is_empty()),
    }

    for (i, &shard) in firsts.iter().enumerate() {
        let given = scan_cursor::next(shard, next % NODE_CURSOR_LIMIT, &firsts);
        if next % NODE_CURSOR_LIMIT != 0 {
            // The same shard, further on.
            assert_eq!(
                scan_cursor::decode(given, &firsts),
                Some((shard, next % NODE_CURSOR_LIMIT))
            );
        } else if let Some(&following) = firsts.get(i + 1) {
            // The next shard, from its start.
            assert_ne!(given, 0, "a scan ended before shard {following}");
            assert_eq!(scan_cursor::decode(given, &firsts), Some((following, 0)));
        } else {
            assert_eq!(given, 0, "the last shard done ends the scan");
        }
    }
});
