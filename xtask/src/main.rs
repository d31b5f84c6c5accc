//! `cargo xtask`: every command a newcomer or CI needs, each doing its own
//! setup first (idempotently), so each works on a fresh machine.

mod bench;
mod conformance;
mod demo;
mod differential;
mod fuzz;
mod interop;
mod setup;
mod soak;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "redirector's project commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Set up the toolchain, then build the eBPF programs, the daemon and
    /// redirector-cni (the test packages are not needed to build: the
    /// container image build uses this).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// rustfmt and clippy (-D warnings) for userspace and the eBPF crate.
    Lint,
    /// Set up, lint, build, and run every test.
    Test,
    /// Steering end to end in network namespaces on this machine.
    Demo {
        /// Exit after printing instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Redis's own test suite, direct and through redirector, unit by unit
    /// (long: not part of `test`).
    Conformance {
        /// Only these units (e.g. unit/type/list); default: all.
        #[arg(long = "unit")]
        units: Vec<String>,
        /// Reuse the direct results of an earlier run where they exist
        /// (the baseline does not change with redirector's code).
        #[arg(long)]
        reuse_direct: bool,
    },
    /// Differential fuzzing: random command sequences through redirector
    /// and against one standalone Redis, every reply compared (`test` runs
    /// fixed seeds briefly).
    Differential {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// First seed (then seed+1, ...); default: from the clock.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// The cargo-fuzz targets (nightly, libFuzzer), each for a time from
    /// its seed corpus, printing executions and coverage per target; then
    /// the differential fuzzer against one Redis.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Stop a target after this many executions, if sooner.
        #[arg(long)]
        runs: Option<u64>,
        /// Only these targets (repeat); default: all.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// The sanitizer the targets are built with (`none`: faster, for
        /// long runs; each has its own build directory).
        #[arg(long, value_enum, default_value_t = fuzz::Sanitizer::Address)]
        sanitizer: fuzz::Sanitizer,
        /// Seconds of differential fuzzing after the targets (0: none;
        /// skipped when --target names targets).
        #[arg(long, default_value_t = 600)]
        differential_seconds: u64,
    },
    /// Benchmarks (release build); prints ratios against going direct.
    Bench {
        /// Alternating rounds per comparison (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Only these parts (repeat or comma-separate); default: all.
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<bench::Part>,
        /// Latency part: requests per second over all its connections.
        #[arg(long, default_value_t = bench::LatencyParams::default().rate)]
        latency_rate: u32,
        /// Latency part: connections per target.
        #[arg(long, default_value_t = bench::LatencyParams::default().connections)]
        latency_connections: usize,
        /// Latency part: measured seconds per target, split over the rounds.
        #[arg(long, default_value_t = bench::LatencyParams::default().seconds)]
        latency_seconds: f64,
    },
    /// redirector against a real ztunnel (Istio ambient's node proxy) in
    /// network namespaces, both directions of HBONE, certificates from
    /// ztunnel's FAKE_CA test root; one line per direction (not in CI:
    /// ztunnel is not packaged).
    Interop {
        /// The ztunnel binary, built with `--features testing` (FAKE_CA
        /// needs it), e.g. `cargo build --no-default-features --features
        /// tls-ring,testing` in its checkout.
        #[arg(long, value_name = "PATH")]
        ztunnel: PathBuf,
        /// ztunnel's fake CA: the directory with its test root
        /// `root-cert.pem` and key `ca-key.pem` [default: src/tls of the
        /// ztunnel checkout --ztunnel was built in].
        #[arg(long, value_name = "DIR")]
        ztunnel_ca: Option<PathBuf>,
        /// Redis round trips (alternating SET and GET) per direction.
        #[arg(long, default_value_t = 2000)]
        round_trips: usize,
    },
    /// The latency bench's floor: a relay that only copies bytes (started
    /// by `bench`, not for use on its own).
    #[command(hide = true)]
    RelayFloor {
        /// LISTEN=UPSTREAM, e.g. 127.0.0.1:7390=127.0.0.1:7000 (repeat).
        #[arg(long = "pair", required = true)]
        pairs: Vec<String>,
        #[arg(long, value_enum)]
        model: bench::RelayModel,
    },
    /// The chaos soak: mixed load through the proxy into a 3+3 cluster in
    /// network namespaces while faults arrive; every acknowledged write is
    /// checked at the end (long: `test` runs a 2-minute one).
    Soak {
        /// Minutes of load (a fault cycle every two minutes).
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Soak a release build of the daemon (default: debug, as the test).
        #[arg(long)]
        release: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => {
            setup::all()?;
            conformance::fetch().map(drop)
        }
        Cmd::Build { release } => {
            setup::toolchain()?;
            build(Profile::from_release(release)).map(drop)
        }
        Cmd::Lint => {
            setup::toolchain()?;
            setup::cargo_deny()?;
            lint()
        }
        Cmd::Test => test(),
        Cmd::RelayFloor { pairs, model } => bench::relay_floor(model, &pairs),
        Cmd::Demo { once } => {
            setup::all()?;
            let bin = build(Profile::Debug)?;
            demo::run(&bin, once)
        }
        Cmd::Conformance {
            units,
            reuse_direct,
        } => {
            setup::all()?;
            let bin = build(Profile::Release)?;
            conformance::run(&bin, &units, reuse_direct)
        }
        Cmd::Differential { seconds, seed } => {
            setup::all()?;
            let bin = build(Profile::Debug)?;
            differential::run(&bin, seconds, seed)
        }
        Cmd::Fuzz {
            seconds,
            runs,
            targets,
            sanitizer,
            differential_seconds,
        } => {
            setup::all()?;
            fuzz::run_until(seconds, runs, &targets, sanitizer)?;
            if targets.is_empty() && differential_seconds > 0 {
                let bin = build(Profile::Debug)?;
                differential::run(&bin, differential_seconds, None)?;
            }
            Ok(())
        }
        Cmd::Bench {
            rounds,
            only,
            latency_rate,
            latency_connections,
            latency_seconds,
        } => {
            setup::all()?;
            let bin = build(Profile::Release)?;
            let latency = bench::LatencyParams {
                rate: latency_rate,
                connections: latency_connections,
                seconds: latency_seconds,
            };
            bench::run(&bin, rounds, &only, latency)
        }
        Cmd::Interop {
            ztunnel,
            ztunnel_ca,
            round_trips,
        } => {
            let ztunnel = interop::Ztunnel::find(&ztunnel, ztunnel_ca)?;
            setup::all()?;
            let bin = build(Profile::Debug)?;
            interop::run(&bin, &ztunnel, round_trips)
        }
        Cmd::Soak { minutes, release } => {
            setup::all()?;
            let bin = build(Profile::from_release(release))?;
            soak::run(&bin, minutes)
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    fn from_release(release: bool) -> Self {
        if release { Self::Release } else { Self::Debug }
    }

    fn dir(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Release => "release",
        }
    }
}

pub fn root() -> PathBuf {
    testbed::workspace_root()
}

/// `cargo` for the workspace, with the project's tools on PATH.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root())
        .env("PATH", setup::path_with_tools());
    cmd
}

/// `cargo +nightly`, for the eBPF crate.
fn cargo_nightly() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly")
        .current_dir(root())
        .env("PATH", setup::path_with_tools())
        // The outer (stable) cargo's choices must not leak into nightly.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    cmd
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds the daemon (and, through its build script, the eBPF programs).
fn build(profile: Profile) -> Result<PathBuf> {
    let mut cmd = cargo();
    // Both binaries: the daemon and the CNI plugin it installs on nodes.
    cmd.args([
        "build",
        "--package",
        "redirector",
        "--bin",
        "redirector",
        "--bin",
        "redirector-cni",
    ]);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let bin = root().join("target").join(profile.dir()).join("redirector");
    if !bin.exists() {
        bail!("{} was not built", bin.display());
    }
    Ok(bin)
}

fn lint() -> Result<()> {
    println!("== rustfmt");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    // The fuzz crate is a workspace of its own.
    run(cargo().args([
        "fmt",
        "--manifest-path",
        "fuzz/Cargo.toml",
        "--all",
        "--check",
    ]))?;
    println!("== clippy (userspace, tests, xtask)");
    run(cargo().args([
        "clippy",
        "--package",
        "redirector",
        "--package",
        "redirector-tests",
        "--package",
        "xtask",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    println!("== clippy (eBPF programs, bpfel-unknown-none)");
    run(cargo_nightly()
        .args([
            "clippy",
            "--package",
            "redirector-ebpf",
            "--features",
            "programs",
        ])
        .args([
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"]))?;
    println!("== clippy (shared map ABI, host)");
    run(cargo().args([
        "clippy",
        "--package",
        "redirector-ebpf",
        "--features",
        "user",
        "--lib",
        "--tests",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Offline (--frozen): what needs no network. Advisories need the
    // RustSec database; README.md says how to check them. cargo deny reads
    // every platform's packages (windows-sys too), which a build for this
    // one never downloads: fetched first, from the registry, or a fresh
    // machine fails here.
    println!("== cargo fetch (every platform's packages, for cargo deny)");
    run(cargo().args(["fetch", "--locked"]))?;
    println!("== cargo deny (licenses, duplicate versions, sources; deny.toml)");
    run(cargo().args(["deny", "--frozen", "check", "licenses", "bans", "sources"]))
}

/// The integration tests run a second time on `--session-loop task`, the
/// loop that is not the default: every one whose proxy serves clients, and
/// steering's, for steered connections accepted by a task (not the CNI,
/// agent or HBONE ones, whose proxies' sessions these already cover).
const SESSION_LOOP_TESTS: &[&str] = &[
    "acl",
    "backends",
    "conformance",
    "differential",
    "idle_clients",
    "one_redis",
    "output_limits",
    "proxy_clients",
    "proxy_commands",
    "proxy_failover",
    "proxy_hostile",
    "proxy_reshard",
    "proxy_scan",
    "standalone",
    "steering",
    "upstream_batching",
];

fn test() -> Result<()> {
    setup::all()?;
    if std::env::var_os("CI").is_some() && !nix::unistd::geteuid().is_root() {
        bail!("CI must run `cargo xtask test` as root: the kernel tests cannot be skipped there");
    }
    lint()?;
    // Redis's own suite, for the conformance subset among the tests.
    conformance::fetch()?;
    let bin = build(Profile::Debug)?;
    println!("== tests");
    run(cargo().args([
        "test",
        "--package",
        "redirector-ebpf",
        "--features",
        "user",
        "--lib",
    ]))?;
    run(cargo()
        .args([
            "test",
            "--package",
            "redirector",
            "--package",
            "redirector-tests",
        ])
        .args(["--package", "xtask"])
        .env("REDIRECTOR_BIN", &bin)
        // Kernel tests fail instead of skipping when they cannot run.
        .env(testbed::require::REQUIRED_ENV, "1"))?;
    // A session per tokio task (`--session-loop task`) is still built, the
    // earlier default: the tests of what a client sees run on it too,
    // through the variable every proxy they start reads.
    println!("== client-facing tests on --session-loop task");
    let mut on_tasks = cargo();
    on_tasks.args(["test", "--package", "redirector-tests"]);
    for test in SESSION_LOOP_TESTS {
        on_tasks.args(["--test", test]);
    }
    run(on_tasks
        .env("REDIRECTOR_BIN", &bin)
        .env(testbed::require::REQUIRED_ENV, "1")
        .env("REDIRECTOR_SESSION_LOOP", "task"))?;
    println!("== fuzz smoke ({} s per target)", fuzz::SMOKE_SECONDS);
    fuzz::smoke()?;
    println!("== all tests passed");
    Ok(())
}
