//! eBPF connect steering: installing the kernel programs, and reading and
//! writing the pinned maps that drive them.
//!
//! Everything lives under one bpffs pin directory, so any process (the
//! daemon, `redirector enroll`, `bpftool`) works on the same state, and a
//! daemon restart changes nothing for the kernel:
//!
//! ```text
//! <pin-dir>/maps-v3/rdr_enrolled, rdr_targets, rdr_redis_ports, rdr_proxy,
//!                   rdr_pending, rdr_orig_dst, rdr_counters, rdr_listener
//!                                            maps of map ABI v3 (see ARCHITECTURE.md)
//! <pin-dir>/links/redir_connect4, ...        cgroup links, one per program
//! ```
//!
//! Maps live in a directory named for their layout version
//! (`redirector_ebpf::ABI_VERSION`), so an upgrade across a layout change
//! builds a new set beside the old one, swaps the programs over, and then
//! removes the old set.

pub mod coexist;
pub mod fs;
mod install;
mod maps;
pub mod metrics;
pub mod sys;

use std::{
    io,
    path::{Path, PathBuf},
};

pub use install::{Installed, ProgramOutcome, Removed, ReuseportProgram, install, uninstall};
pub use maps::{
    Listeners, Maps, OrigDstTable, TargetSpec, bytes_to_ip, ip_to_bytes, orig_dst_addr,
};

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/redirector";

/// Default `SO_MARK` of the proxy's own sockets: bit 12 alone. It stays
/// clear of kube-proxy's masquerade and drop bits (0x4000, 0x8000, also
/// used by flannel), Cilium's magic nibble (0x0F00) and identity bits
/// (0xFFFF0000), Calico's default mask (0xFFFF0000), and Istio ambient's
/// marks (0x539/0x111 under mask 0xFFF), so no other component's rule
/// matches the proxy's upstream packets.
pub const DEFAULT_SOCKET_MARK: u32 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redirector is not installed: {path} does not exist (start `redirector run` first)")]
    NotInstalled { path: PathBuf },
    #[error("cannot open pinned map {path}: {source}")]
    OpenMap {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error(
        "pinned map {path} does not match this build ({detail}); \
         run `redirector uninstall` to remove the old installation first"
    )]
    IncompatibleMap { path: PathBuf, detail: String },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("link of program {program}: {source}")]
    Link {
        program: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("program {program} is missing from the eBPF object")]
    MissingProgram { program: &'static str },
    #[error("cannot pin the link of {program} at {path}: {source}")]
    PinLink {
        program: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error(transparent)]
    Fs(#[from] fs::Error),
}

impl Error {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Where the pins are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub pin_dir: PathBuf,
}

impl Layout {
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        Self {
            pin_dir: pin_dir.into(),
        }
    }

    /// The directory of this build's maps.
    pub fn maps_dir(&self) -> PathBuf {
        self.maps_dir_of(redirector_ebpf::ABI_VERSION)
    }

    fn maps_dir_of(&self, abi_version: u32) -> PathBuf {
        self.pin_dir.join(format!("maps-v{abi_version}"))
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Map directories of other layout versions found under the pin
    /// directory, with the version; version 1 kept its maps in the pin
    /// directory itself.
    pub fn other_map_sets(&self) -> Vec<(u32, PathBuf)> {
        let mut found = Vec::new();
        if self
            .pin_dir
            .join(redirector_ebpf::map_names::PROXY)
            .exists()
        {
            found.push((1, self.pin_dir.clone()));
        }
        let Ok(entries) = std::fs::read_dir(&self.pin_dir) else {
            return found;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let version = name
                .to_str()
                .and_then(|n| n.strip_prefix("maps-v"))
                .and_then(|v| v.parse::<u32>().ok());
            if let Some(version) = version
                && version != redirector_ebpf::ABI_VERSION
            {
                found.push((version, entry.path()));
            }
        }
        found.sort();
        found
    }

    pub fn links_dir(&self) -> PathBuf {
        self.pin_dir.join("links")
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    /// Whether an installation exists: the proxy map stands for the set
    /// (every map is created by the same load, and uninstall removes them
    /// all).
    pub fn is_installed(&self) -> bool {
        Path::new(&self.map(redirector_ebpf::map_names::PROXY)).exists()
    }
}

impl Default for Layout {
    fn default() -> Self {
        Self::new(DEFAULT_PIN_DIR)
    }
}

/// CLOCK_BOOTTIME in nanoseconds: the clock `bpf_ktime_get_boot_ns()` reads,
/// so heartbeats compare across user and kernel space (and across suspend).
pub fn boottime_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .expect("CLOCK_BOOTTIME is always available on Linux");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}
