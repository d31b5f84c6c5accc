//! Hash slots: `CRC16-XMODEM(hash tag or key) mod 16384`, as the Redis
//! Cluster specification defines them.

pub const SLOTS: usize = 16_384;

/// The slot of a key. Only the part between the first `{` and the next `}`
/// is hashed when that part is non-empty (a hash tag), so `{user1}:a` and
/// `{user1}:b` share a slot.
// Compiled once, on its own, so the CRC's algorithm constants fold into
// it whatever its callers inline (callgrind: the checksum cost 66 or 112
// instructions per key as inlining around it shifted).
#[inline(never)]
pub fn slot(key: &[u8]) -> u16 {
    let hashed = hash_tag(key).unwrap_or(key);
    XMODEM.checksum(hashed) & (SLOTS as u16 - 1)
}

/// CRC16-XMODEM, sixteen bytes per table step: a byte-at-a-time table
/// chains one lookup per key byte, which made the hash 4% of the proxy's
/// CPU on pipelined GETs.
const XMODEM: crc::Crc<u16, crc::Table<16>> =
    crc::Crc::<u16, crc::Table<16>>::new(&crc::CRC_16_XMODEM);

fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    // A vector compare, not a byte loop: most keys have no `{`, and each
    // routed command's keys are searched (callgrind: ~60 instructions per
    // 16-byte key byte by byte).
    let open = memchr::memchr(b'{', key)?;
    let rest = &key[open + 1..];
    let close = memchr::memchr(b'}', rest)?;
    (close > 0).then(|| &rest[..close])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b""), 0);
        assert_eq!(slot(b"123456789"), 12739); // 0x31c3 mod 16384
    }

    /// The specification's definition, one bit at a time (poly 0x1021,
    /// init 0): what the table-driven hash must equal.
    fn xmodem_bitwise(data: &[u8]) -> u16 {
        let mut crc: u16 = 0;
        for &byte in data {
            crc ^= u16::from(byte) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc
    }

    #[test]
    fn the_table_hash_equals_the_bitwise_definition_at_every_length() {
        // Lengths around the 16-byte step, and bytes of every value.
        let data: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for len in 0..data.len() {
            for start in [0, 1, 7] {
                let key = &data[start..(start + len).min(data.len())];
                assert_eq!(XMODEM.checksum(key), xmodem_bitwise(key), "{key:?}");
            }
        }
    }

    #[test]
    fn hash_tags_follow_the_spec() {
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"{user1000}.followers"), slot(b"user1000"));
        // Empty tag: the whole key is hashed.
        assert_eq!(slot(b"foo{}{bar}"), xmodem_bitwise(b"foo{}{bar}") & 16383);
        // Only the first `{` counts.
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
        // No closing brace: the whole key.
        assert_eq!(slot(b"{unclosed"), xmodem_bitwise(b"{unclosed") & 16383);
    }
}
