//! `cargo xtask fuzz`: the cargo-fuzz (libFuzzer) targets in `fuzz/`, each
//! for a time (or a number of executions), from its committed seed corpus.
//!
//! All targets are built once (`cargo fuzz build`, release with debug
//! assertions and AddressSanitizer, or no sanitizer for long runs), then
//! each binary runs on its own:
//! libFuzzer adds what it finds to `target/fuzz/corpus/<target>` (the
//! committed seeds in `fuzz/corpus/<target>` stay as they are), writes a
//! crashing input under `target/fuzz/artifacts/<target>/`, and its log to
//! `target/fuzz/logs/<target>.log`. A crash fails the command with the
//! artifact's path.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo_nightly, root, run as run_cmd};

/// cargo-fuzz release known to work with this toolchain.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Each target, with the dictionary (in `fuzz/dict/`) it is run with.
pub const TARGETS: &[(&str, Option<&str>)] = &[
    ("request", Some("resp.dict")),
    ("reply", Some("resp.dict")),
    ("plan", Some("plan.dict")),
    ("scan_cursor", None),
    ("cni_conflist", Some("json.dict")),
    ("targets", Some("targets.dict")),
    ("backends", Some("targets.dict")),
    ("hbone_connect", Some("hbone.dict")),
];

/// What the targets are built with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Sanitizer {
    /// AddressSanitizer: catches memory errors in the unsafe code below
    /// (std, dependencies), at 2-3x the time per execution.
    #[default]
    Address,
    /// None: the targets and the code they reach are safe Rust, so a long
    /// run gets more executions for the same time.
    None,
}

impl Sanitizer {
    fn name(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::None => "none",
        }
    }
}

/// Seconds per target in `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 20;

/// The short run `cargo xtask test` makes of every target: without a
/// sanitizer, whose build of the whole dependency tree took about a
/// quarter of the test command on a fresh 2-core machine; the targets are
/// safe Rust, and `cargo xtask fuzz` keeps AddressSanitizer for the runs
/// that look for trouble.
pub fn smoke() -> Result<()> {
    run_until(SMOKE_SECONDS, None, &[], Sanitizer::None).map(drop)
}

/// Runs `targets` (default: all) for `seconds` each, or until `runs`
/// executions if that comes first; returns each target's figures.
pub fn run_until(
    seconds: u64,
    runs: Option<u64>,
    targets: &[String],
    sanitizer: Sanitizer,
) -> Result<Vec<Stats>> {
    let chosen = choose(targets)?;
    cargo_fuzz()?;
    build(sanitizer)?;
    let mut all = Vec::new();
    for (target, dict) in chosen {
        println!(
            "== fuzz {target}: {seconds} s{}",
            runs.map_or(String::new(), |r| format!(" or {r} executions"))
        );
        let stats = run_target(target, dict, seconds, runs, sanitizer)?;
        println!("   {stats}");
        all.push(stats);
    }
    println!("== fuzz: every target ran without a crash");
    for stats in &all {
        println!("   {stats}");
    }
    Ok(all)
}

/// The targets named (all when none), each known.
fn choose(names: &[String]) -> Result<Vec<(&'static str, Option<&'static str>)>> {
    if names.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    names
        .iter()
        .map(|name| {
            TARGETS
                .iter()
                .find(|(t, _)| t == name)
                .copied()
                .with_context(|| {
                    let known: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
                    format!("no fuzz target `{name}` (known: {})", known.join(", "))
                })
        })
        .collect()
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

fn work_dir() -> PathBuf {
    root().join("target").join("fuzz")
}

/// cargo-fuzz in `target/tools`, installed on first use like bpf-linker.
fn cargo_fuzz() -> Result<()> {
    let tools = root().join("target").join("tools");
    let installed = Command::new(tools.join("bin").join("cargo-fuzz"))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    println!("== setup: cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    run_cmd(
        Command::new("cargo")
            .args(["install", "--locked", "--root"])
            .arg(&tools)
            .args(["cargo-fuzz", "--version", CARGO_FUZZ_VERSION]),
    )
}

/// The host triple, which cargo-fuzz builds for.
fn host() -> Result<String> {
    let out = Command::new("rustc")
        .args(["+nightly", "-vV"])
        .output()
        .context("cannot run rustc +nightly")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV names no host")
}

/// Where a sanitizer's build goes: each its own directory, as the flags
/// differ for the whole dependency tree (one shared directory would
/// rebuild it all at every switch).
fn build_dir(sanitizer: Sanitizer) -> PathBuf {
    let dir = fuzz_dir().join("target");
    match sanitizer {
        Sanitizer::Address => dir,
        Sanitizer::None => dir.join("no-sanitizer"),
    }
}

/// Every target, in one cargo invocation.
fn build(sanitizer: Sanitizer) -> Result<()> {
    println!(
        "== fuzz: building the targets (nightly, sanitizer: {})",
        sanitizer.name()
    );
    run_cmd(
        cargo_nightly()
            .args(["fuzz", "build", "--debug-assertions", "--fuzz-dir"])
            .arg(fuzz_dir())
            .args(["--sanitizer", sanitizer.name(), "--target-dir"])
            .arg(build_dir(sanitizer))
            .args(["--target", &host()?]),
    )
}

fn binary(target: &str, sanitizer: Sanitizer) -> Result<PathBuf> {
    Ok(build_dir(sanitizer)
        .join(host()?)
        .join("release")
        .join(target))
}

fn run_target(
    target: &str,
    dict: Option<&str>,
    seconds: u64,
    runs: Option<u64>,
    sanitizer: Sanitizer,
) -> Result<Stats> {
    let work = work_dir();
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    let logs = work.join("logs");
    for dir in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let seeds = fuzz_dir().join("corpus").join(target);
    let mut cmd = Command::new(binary(target, sanitizer)?);
    // New inputs go to the first directory; the seeds are only read.
    cmd.arg(&corpus).arg(&seeds);
    cmd.arg(format!("-max_total_time={seconds}"));
    if let Some(runs) = runs {
        cmd.arg(format!("-runs={runs}"));
    }
    if let Some(dict) = dict {
        cmd.arg(format!(
            "-dict={}",
            fuzz_dir().join("dict").join(dict).display()
        ));
    }
    // A parser that takes 10 s over one input is a hang: a failure too.
    cmd.args(["-timeout=10", "-print_final_stats=1"]);
    cmd.arg(format!("-artifact_prefix={}/", artifacts.display()));
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let log: String = String::from_utf8_lossy(&out.stderr).into_owned();
    let log_path = logs.join(format!("{target}.log"));
    std::fs::write(&log_path, &log)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        for line in tail.iter().rev() {
            eprintln!("   | {line}");
        }
        let artifact = artifact_path(&log).unwrap_or_else(|| "(none written)".into());
        bail!(
            "fuzz target `{target}` failed ({}): crashing input: {artifact}\n\
             full log: {}\n\
             reproduce: cargo +nightly fuzz run --fuzz-dir fuzz {target} {artifact}",
            out.status,
            log_path.display()
        );
    }
    let mut stats = Stats::parse(target, &log)
        .with_context(|| format!("no final stats in {}", log_path.display()))?;
    stats.seconds = started.elapsed().as_secs_f64();
    stats.corpus = count_files(&corpus) + count_files(&seeds);
    Ok(stats)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.filter_map(Result::ok).count())
}

/// What libFuzzer says of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub target: String,
    pub executions: u64,
    pub exec_per_sec: u64,
    /// Coverage points (edges) and features at the end.
    pub cov: u64,
    pub features: u64,
    pub seconds: f64,
    /// Inputs in the working corpus and the seeds.
    pub corpus: usize,
}

impl Stats {
    /// Reads libFuzzer's `-print_final_stats=1` report and its last status
    /// line; `None` without the report.
    pub fn parse(target: &str, log: &str) -> Option<Self> {
        let stat = |name: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let status = |word: &str| {
            log.lines()
                .rev()
                .filter(|l| l.starts_with('#'))
                .find_map(|l| {
                    let mut words = l.split_whitespace();
                    words.find(|w| *w == word)?;
                    words.next()?.parse::<u64>().ok()
                })
                .unwrap_or(0)
        };
        Some(Self {
            target: target.to_string(),
            executions: stat("number_of_executed_units")?,
            exec_per_sec: stat("average_exec_per_sec")?,
            cov: status("cov:"),
            features: status("ft:"),
            ..Self::default()
        })
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<14} {:>11} executions in {:>5.0} s ({:>7}/s), cov {:>5}, ft {:>6}, corpus {}",
            self.target,
            self.executions,
            self.seconds,
            self.exec_per_sec,
            self.cov,
            self.features,
            self.corpus
        )
    }
}

/// Where libFuzzer wrote the crashing input (`Test unit written to ...`).
fn artifact_path(log: &str) -> Option<String> {
    log.lines()
        .rev()
        .find_map(|l| l.split_once("Test unit written to "))
        .map(|(_, path)| path.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
INFO: Seed: 1234
#2\tINITED cov: 812 ft: 1903 corp: 40/2930b exec/s: 0 rss: 44Mb
#4096\tpulse  cov: 815 ft: 1990 corp: 44/3100b lim: 43 exec/s: 2048 rss: 45Mb
#70000\tDONE   cov: 820 ft: 2011 corp: 51/3420b lim: 4096 exec/s: 3500 rss: 52Mb
Done 70000 runs in 20 second(s)
stat::number_of_executed_units: 70000
stat::average_exec_per_sec:     3500
stat::new_units_added:          11
stat::slowest_unit_time_sec:    0
stat::peak_rss_mb:              52
";

    #[test]
    fn run_figures_are_read_from_libfuzzers_final_report() {
        let stats = Stats::parse("request", LOG).expect("stats");
        assert_eq!(
            (
                stats.executions,
                stats.exec_per_sec,
                stats.cov,
                stats.features
            ),
            (70000, 3500, 820, 2011)
        );
        assert_eq!(Stats::parse("request", "INFO: Seed: 1\n"), None);
    }

    #[test]
    fn a_crash_report_names_the_artifact() {
        let log = "==1==ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='target/fuzz/artifacts/plan/'; Test unit written to target/fuzz/artifacts/plan/crash-da39a3ee\n\
                   Base64: AAEC\n";
        assert_eq!(
            artifact_path(log).as_deref(),
            Some("target/fuzz/artifacts/plan/crash-da39a3ee")
        );
        assert_eq!(artifact_path("Done 5 runs\n"), None);
    }

    #[test]
    fn every_target_has_a_seed_corpus_and_its_dictionary() {
        for (target, dict) in TARGETS {
            let seeds = fuzz_dir().join("corpus").join(target);
            assert!(count_files(&seeds) > 0, "{} has no seeds", seeds.display());
            let source = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
            assert!(source.exists(), "{} is missing", source.display());
            if let Some(dict) = dict {
                assert!(
                    fuzz_dir().join("dict").join(dict).exists(),
                    "{dict} is missing"
                );
            }
        }
        assert!(choose(&["nope".to_string()]).is_err());
    }
}
