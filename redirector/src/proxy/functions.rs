//! What the proxy knows of the cluster's functions: which ones declare
//! `no-writes`. CLIENT PAUSE WRITE holds an FCALL unless its function
//! writes nothing, as Redis decides from the function's flags; the proxy
//! learns them from `FUNCTION LIST` when a pause first needs them, and
//! forgets them when a FUNCTION LOAD/DELETE/FLUSH/RESTORE goes through.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;

use super::{
    Shared, exec,
    script_keys::{self, ScriptKeys},
};
use crate::cluster::commands::CommandTable;
use crate::resp::{Protocol, value::Value};

#[derive(Default)]
pub struct FunctionFlags {
    /// Function name -> declares `no-writes`. `None`: not learnt yet.
    no_writes: Mutex<Option<HashMap<Bytes, bool>>>,
    learning: AtomicBool,
    /// Scripts loaded through this proxy (SCRIPT LOAD): SHA1 -> (declares
    /// `no-writes` in its shebang, for EVALSHA; its literal keys' slot).
    scripts: Mutex<HashMap<Bytes, (bool, Option<u16>)>>,
    /// Functions loaded through this proxy (FUNCTION LOAD): name -> the
    /// slot of its library's literal keys, for FCALL without keys.
    function_slots: Mutex<HashMap<Bytes, u16>>,
    /// Scripts EVAL brought that every master has been given (by a hash
    /// of their body): one Redis has one script cache, so EVALSHA and
    /// SCRIPT EXISTS see them on any shard.
    spread: Mutex<std::collections::HashSet<u64>>,
}

/// Bodies remembered as spread before the set starts over (a client that
/// generates scripts should not grow the proxy without bound).
const SPREAD_MAX: usize = 10_000;

impl FunctionFlags {
    /// Whether `name` is known to write nothing; `None` when the flags have
    /// not been learnt (the caller then asks for [`learn`]).
    pub fn no_writes(&self, name: &[u8]) -> Option<bool> {
        let known = self.no_writes.lock().unwrap_or_else(|e| e.into_inner());
        known
            .as_ref()
            .map(|map| map.get(name).copied().unwrap_or(false))
    }

    /// A script SCRIPT LOAD stored under `sha`, with the slot its literal
    /// keys name (see `script_keys`).
    pub fn script_loaded(&self, sha: &[u8], no_writes: bool, slot: Option<u16>) {
        self.scripts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                Bytes::copy_from_slice(&sha.to_ascii_lowercase()),
                (no_writes, slot),
            );
    }

    /// Where EVALSHA of `sha` without keys runs, when its literal keys say.
    pub fn script_slot(&self, sha: &[u8]) -> Option<u16> {
        self.scripts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sha.to_ascii_lowercase()[..])
            .and_then(|(_, slot)| *slot)
    }

    /// A library FUNCTION LOAD loaded: its functions run, without keys,
    /// where its literal keys live.
    pub fn library_loaded(&self, code: &[u8], table: &CommandTable) {
        let names = script_keys::registered_functions(code);
        let mut slots = self
            .function_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for name in names {
            match script_keys::script_keys(code, table) {
                ScriptKeys::Slot(slot) => slots.insert(name, slot),
                ScriptKeys::None | ScriptKeys::Unknown => slots.remove(&name),
            };
        }
    }

    /// Where FCALL of `function` without keys runs, when its library's
    /// literal keys say.
    pub fn function_slot(&self, function: &[u8]) -> Option<u16> {
        self.function_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(function)
            .copied()
    }

    /// Whether the script `sha` declares no-writes (unknown: it may write).
    pub fn script_no_writes(&self, sha: &[u8]) -> bool {
        self.scripts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sha.to_ascii_lowercase()[..])
            .is_some_and(|(no_writes, _)| *no_writes)
    }

    /// Functions changed: learn them again when next needed.
    pub fn forget(&self) {
        *self.no_writes.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether `body` (run by EVAL) must first be loaded on every master:
    /// true the first time it is seen.
    pub fn first_eval(&self, body: &[u8]) -> bool {
        use std::hash::{BuildHasher as _, RandomState};
        static KEYS: std::sync::LazyLock<RandomState> = std::sync::LazyLock::new(RandomState::new);
        let hash = KEYS.hash_one(body);
        let mut spread = self.spread.lock().unwrap_or_else(|e| e.into_inner());
        if spread.len() >= SPREAD_MAX {
            spread.clear();
        }
        spread.insert(hash)
    }

    /// SCRIPT FLUSH emptied every node's cache.
    pub fn scripts_flushed(&self) {
        self.spread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.scripts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// FUNCTION FLUSH/RESTORE replaced every library.
    pub fn forget_libraries(&self) {
        self.function_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Learns the functions' flags from a master, once at a time; wakes the
/// clients a pause holds, so a held FCALL is looked at again.
pub fn learn(shared: &Arc<Shared>) {
    if shared.functions.learning.swap(true, Ordering::AcqRel) {
        return;
    }
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let masters: Vec<_> = shared.topology.view().masters().take(1).collect();
        let payload = Bytes::from_static(b"*2\r\n$8\r\nFUNCTION\r\n$4\r\nLIST\r\n");
        let replies = exec::broadcast(&shared, Protocol::Resp2, &masters, &payload, true).await;
        let learnt = replies
            .first()
            .and_then(|r| Value::decode(&r.raw, Protocol::Resp2))
            .map(parse_function_list)
            .unwrap_or_default();
        *shared
            .functions
            .no_writes
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(learnt);
        shared.functions.learning.store(false, Ordering::Release);
        shared.clients.wake_held();
    });
}

/// `FUNCTION LIST`: libraries, each with `functions`: `[name, description,
/// flags]` maps.
fn parse_function_list(list: Value) -> HashMap<Bytes, bool> {
    let mut out = HashMap::new();
    for library in list.into_items().unwrap_or_default() {
        let Some(fields) = library.into_pairs() else {
            continue;
        };
        let functions = fields
            .into_iter()
            .find(|(k, _)| k.as_bytes() == Some(b"functions"))
            .and_then(|(_, v)| v.into_items())
            .unwrap_or_default();
        for function in functions {
            let Some(fields) = function.into_pairs() else {
                continue;
            };
            let field = |name: &[u8]| {
                fields
                    .iter()
                    .find(|(k, _)| k.as_bytes() == Some(name))
                    .map(|(_, v)| v.clone())
            };
            let Some(name) = field(b"name").and_then(|n| n.as_bytes().map(Bytes::copy_from_slice))
            else {
                continue;
            };
            let no_writes = field(b"flags")
                .and_then(Value::into_items)
                .unwrap_or_default()
                .iter()
                .any(|f| f.as_bytes() == Some(b"no-writes"));
            out.insert(name, no_writes);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_list_flags_are_read() {
        let raw = Bytes::from_static(
            b"*1\r\n*6\r\n$12\r\nlibrary_name\r\n$2\r\nf1\r\n$6\r\nengine\r\n$3\r\nLUA\r\n$9\r\nfunctions\r\n*2\r\n*6\r\n$4\r\nname\r\n$2\r\nro\r\n$11\r\ndescription\r\n$-1\r\n$5\r\nflags\r\n*1\r\n$9\r\nno-writes\r\n*6\r\n$4\r\nname\r\n$2\r\nrw\r\n$11\r\ndescription\r\n$-1\r\n$5\r\nflags\r\n*0\r\n",
        );
        let flags = parse_function_list(Value::decode(&raw, Protocol::Resp2).unwrap());
        assert_eq!(flags.get(&b"ro"[..]), Some(&true));
        assert_eq!(flags.get(&b"rw"[..]), Some(&false));
    }
}
