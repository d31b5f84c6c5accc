//! `cargo xtask bench`: figures against going direct, in one run.
//!
//! - W1-W4: the Redis Cluster proxy against `redis-benchmark --cluster` and
//!   phpredis' `RedisCluster` going direct, and W1 on a standalone backend
//!   against that `redis-server` direct ([`workloads`]);
//! - latency: added latency through the proxy at a fixed, realistic rate,
//!   open loop, against direct in the same run ([`openloop`]);
//! - connect(): what the eBPF programs cost a connect ([`connect`]);
//! - workers: `--workers 1` against 2 on W2 ([`workloads`]);
//! - idle: RSS per idle client at 10k and 50k clients ([`idle`]).
//!
//! `--only` runs some of these parts (`workloads`, `latency`, `connect`,
//! `workers`, `idle`).

mod connect;
mod idle;
mod openloop;
mod relay;
mod served;
mod slot_router;
mod workloads;

use std::path::Path;

use anyhow::Result;

pub use openloop::Params as LatencyParams;
pub use relay::Model as RelayModel;

/// The parts of the bench, for `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// W1-W4 with redis-benchmark and PHP, the tunnel and standalone figures.
    Workloads,
    /// Added latency at a fixed rate, open loop (proxy vs direct).
    Latency,
    /// connect() cost of the eBPF programs.
    Connect,
    /// `--workers 1` vs 2 on W2, the client pinned to the other CPU.
    Workers,
    /// RSS per idle client, 10k and 50k clients.
    Idle,
}

/// `cargo xtask relay-floor`: the latency part's do-nothing relay.
pub fn relay_floor(model: RelayModel, pairs: &[String]) -> Result<()> {
    let pairs = pairs
        .iter()
        .map(|pair| relay::parse_pair(pair))
        .collect::<Result<Vec<_>>>()?;
    relay::serve(model, &pairs)
}

/// Runs the parts in `only` (every part when empty).
pub fn run(bin: &Path, rounds: usize, only: &[Part], latency: LatencyParams) -> Result<()> {
    testbed::require::missing().map_or(Ok(()), |why| Err(anyhow::anyhow!(why)))?;
    // SAFETY: single-threaded here; the testbed reads it to find the daemon.
    unsafe { std::env::set_var("REDIRECTOR_BIN", bin) };
    let rounds = rounds.max(1);
    let selected = |part| only.is_empty() || only.contains(&part);
    if selected(Part::Workloads) || selected(Part::Latency) || selected(Part::Workers) {
        workloads::run(
            bin,
            rounds,
            selected(Part::Workloads),
            selected(Part::Latency).then_some(latency),
            selected(Part::Workers),
        )?;
    }
    if selected(Part::Connect) {
        connect::connect_latency(rounds)?;
    }
    if selected(Part::Idle) {
        idle::idle_clients();
    }
    Ok(())
}
