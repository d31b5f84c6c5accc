//! What eBPF programs cost, as the kernel accounts it: with run-time
//! statistics on, every program keeps its total run time and run count
//! (`run_time_ns` and `run_cnt` in `bpftool prog show`).

use std::{collections::BTreeMap, io, os::fd::OwnedFd};

use crate::{bpfprog, bpftool};

const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time statistics, on while this lives. Taken as a descriptor rather
/// than by the `kernel.bpf_stats_enabled` sysctl: the kernel turns them off
/// when the last holder closes it, even if the bench is killed. Accounting
/// costs every program two clock reads per run, so measure latency without
/// it.
pub struct RunTimeStats {
    _enabled: OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> io::Result<Self> {
        // `union bpf_attr` for BPF_ENABLE_STATS: just `type`.
        let mut attr = BPF_STATS_RUN_TIME;
        Ok(Self {
            _enabled: bpfprog::bpf(BPF_ENABLE_STATS, &mut attr)?,
        })
    }
}

/// One program's totals since it was loaded (while statistics were on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramRuns {
    pub run_time_ns: u64,
    pub run_count: u64,
}

impl ProgramRuns {
    /// What ran between `earlier` and `self`.
    #[must_use]
    pub fn since(self, earlier: Self) -> Self {
        Self {
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
            run_count: self.run_count.saturating_sub(earlier.run_count),
        }
    }
}

/// Totals of every loaded program whose name starts with `prefix`, by
/// name, read with `bpftool -j prog show` (a program that never ran while
/// statistics were on has no fields: zero).
#[must_use]
pub fn program_runs(prefix: &str) -> BTreeMap<String, ProgramRuns> {
    let mut runs = BTreeMap::new();
    for prog in bpftool::json(&["prog", "show"])
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(name) = prog["name"].as_str().filter(|n| n.starts_with(prefix)) else {
            continue;
        };
        let entry: &mut ProgramRuns = runs.entry(name.to_string()).or_default();
        entry.run_time_ns += prog["run_time_ns"].as_u64().unwrap_or(0);
        entry.run_count += prog["run_cnt"].as_u64().unwrap_or(0);
    }
    runs
}
