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
pub type FnvHashMap<K, V> = std::collections::HashMap<K, V, FnvBuild>;
