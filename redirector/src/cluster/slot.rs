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
    let open = find_byte(key, b'{')?;
    let rest = &key[open + 1..];
    let close = find_byte(rest, b'}')?;
    (close > 0).then(|| &rest[..close])
}

/// Keys longer than this are searched with `memchr`'s vector code.
const SHORT_KEY: usize = 64;

/// The first `needle` in `hay`. Most keys are short and have no `{`, and
/// every routed command's keys are searched: eight bytes per step in a
/// register for them (callgrind, a 16-byte key: byte by byte ~60
/// instructions, `memchr`'s setup ~90, this ~20), `memchr` for long ones.
fn find_byte(hay: &[u8], needle: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    if hay.len() > SHORT_KEY {
        return memchr::memchr(needle, hay);
    }
    let pattern = ONES * u64::from(needle);
    let mut words = hay.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        // Bytes equal to the needle become zero; the lowest zero byte sets
        // its top bit here (a borrow only marks bytes above a zero one).
        let xored = u64::from_le_bytes(bytes) ^ pattern;
        let zeros = xored.wrapping_sub(ONES) & !xored & HIGHS;
        if zeros != 0 {
            return Some(at + zeros.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| b == needle)
        .map(|i| at + i)
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
    fn the_short_key_search_finds_what_memchr_finds() {
        // Every length up to past the short-key bound, the byte at every
        // place, alone, after bytes one above or below it, and twice.
        for len in 0..=SHORT_KEY + 9 {
            for at in 0..len {
                for filler in [b'a', b'{' - 1, b'{' + 1, 0x80 + b'{', 0xff, 0] {
                    let mut hay = vec![filler; len];
                    hay[at] = b'{';
                    assert_eq!(find_byte(&hay, b'{'), Some(at), "{hay:?}");
                    if at + 1 < len {
                        hay[at + 1] = b'{';
                        assert_eq!(find_byte(&hay, b'{'), Some(at), "{hay:?}");
                    }
                }
            }
            let hay = vec![b'z'; len];
            assert_eq!(find_byte(&hay, b'{'), None);
            assert_eq!(find_byte(&hay, b'}'), None);
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
