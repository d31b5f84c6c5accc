//! The testbed: real network namespaces, cgroup v2, `redis-server` and the
//! real `redirector` binary, each behind an RAII guard that cleans up even
//! when a test panics. Shared by the end-to-end tests and by `cargo xtask
//! demo` / `bench`, so the demo shows exactly what the tests check.
//!
//! Network rule: every address used lives inside namespaces built here, with
//! no default route, so nothing can leave the machine even if steering fails.

pub mod bpfprog;
pub mod bpfstats;
pub mod bpftool;
pub mod browser;
pub mod cgroup;
pub mod cluster;
pub mod cni;
pub mod conformance;
pub mod container;
pub mod daemon;
pub mod differential;
pub mod grafana;
pub mod http;
pub mod idle;
pub mod kubeapi;
pub mod netns;
pub mod ports;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod require;
pub mod resp;
pub mod soak;
pub mod topology;
pub mod two_nodes;

use std::{
    path::PathBuf,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
};

/// A name no other test, or test process, uses at the same time.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}-{n}", std::process::id())
}

/// Serialises tests that attach programs: some assertions (`bpftool prog
/// list` shows exactly one set) are about the whole machine.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static KERNEL: Mutex<()> = Mutex::new(());
    KERNEL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// A per-use scratch directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
