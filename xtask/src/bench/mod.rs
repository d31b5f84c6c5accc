//! `cargo xtask bench`: figures against going direct, in one run.
//!
//! - connect(): what the eBPF programs cost a connect ([`connect`]);
//! - W1-W4: the Redis Cluster proxy against `redis-benchmark --cluster` and
//!   phpredis' `RedisCluster` going direct, and W1 on a standalone backend
//!   against that `redis-server` direct ([`workloads`]).

mod connect;
mod workloads;

use std::path::Path;

use anyhow::Result;

pub fn run(bin: &Path, rounds: usize) -> Result<()> {
    testbed::require::missing().map_or(Ok(()), |why| Err(anyhow::anyhow!(why)))?;
    // SAFETY: single-threaded here; the testbed reads it to find the daemon.
    unsafe { std::env::set_var("REDIRECTOR_BIN", bin) };
    let rounds = rounds.max(1);
    workloads::run(bin, rounds)?;
    connect::connect_latency(rounds)
}
