//! FNV-1a for the proxy's small, hot lookup tables (command names, node
//! addresses): keys are short and come from trusted sources (the command
//! table, the cluster), so SipHash's flooding resistance buys nothing and
//! costs a measurable share of a request.

use std::hash::{BuildHasherDefault, Hasher};

#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

pub type FnvBuild = BuildHasherDefault<Fnv>;

/// For keys that are one `u128` (a short name packed into a word): a
/// multiply folds it, where FNV would take a step per byte.
#[derive(Clone, Copy, Default)]
pub struct Word(u64);

impl Hasher for Word {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut fnv = Fnv::default();
        fnv.write(bytes);
        self.0 ^= fnv.finish();
    }

    fn write_u128(&mut self, word: u128) {
        let folded = (word as u64) ^ ((word >> 64) as u64).rotate_left(29);
        let product = u128::from(folded) * 0x9e37_79b9_7f4a_7c15;
        self.0 ^= (product as u64) ^ ((product >> 64) as u64);
    }
}

pub type WordHashMap<V> = std::collections::HashMap<u128, V, BuildHasherDefault<Word>>;
pub type FnvHashMap<K, V> = std::collections::HashMap<K, V, FnvBuild>;
