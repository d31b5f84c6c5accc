//! `cargo xtask conformance`: Redis's own test suite, direct against a
//! single-node cluster (the baseline) and through redirector in front of a
//! 3+3 cluster, one fresh server set per unit, with the per-unit table
//! (`target/conformance/report.md`) and the verdict: at least 97% of the
//! tests that pass direct pass through redirector, no unit aborts, and
//! every failing test is on `tests/conformance/known-differences.tsv`.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Result, anyhow, bail};
use testbed::{
    cluster::RedisCluster,
    conformance::{self, KnownDifferences, SingleNodeCluster, Suite, UnitResult},
    proxy::Proxy,
};

/// The share of direct passes that must pass through redirector.
const TARGET: f64 = 0.97;
/// Longest run of one unit (`CONFORMANCE_UNIT_TIMEOUT` seconds overrides
/// it, for quick iterations).
fn unit_timeout() -> Duration {
    std::env::var("CONFORMANCE_UNIT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(600), Duration::from_secs)
}

pub fn run(bin: &Path, only: &[String], reuse_direct: bool) -> Result<()> {
    testbed::require::missing().map_or(Ok(()), |why| Err(anyhow!(why)))?;
    // SAFETY: single-threaded here; the testbed reads it to find the daemon.
    unsafe { std::env::set_var("REDIRECTOR_BIN", bin) };
    let suite = fetch()?;
    let known = KnownDifferences::load().map_err(|e| anyhow!(e))?;
    let units: Vec<String> = if only.is_empty() {
        suite.units().map_err(|e| anyhow!(e))?
    } else {
        only.to_vec()
    };
    let out_dir = testbed::workspace_root().join("target/conformance/runs");
    std::fs::create_dir_all(&out_dir)?;
    println!(
        "Redis {} test suite, {} units, tags `{}`, --cluster-mode",
        suite.version,
        units.len(),
        conformance::TAGS
    );
    let (mut direct, mut proxied) = (BTreeMap::new(), BTreeMap::new());
    for unit in &units {
        let file = unit.replace('/', "_");
        let saved = out_dir.join(format!("{file}.direct.log"));
        let d = match std::fs::read_to_string(&saved) {
            Ok(text) if reuse_direct => {
                let mut saved = conformance::parse_output(&text);
                saved.output = text;
                saved
            }
            _ => run_direct(&suite, unit),
        };
        let p = run_proxied(&suite, unit, &known.blocking(unit));
        std::fs::write(out_dir.join(format!("{file}.direct.log")), &d.output)?;
        std::fs::write(out_dir.join(format!("{file}.proxy.log")), &p.output)?;
        println!(
            "  {unit:<36} direct {:>4} ok {:>3} err   redirector {:>4} ok {:>3} err{}  ({:.0?} / {:.0?})",
            d.passed.len(),
            d.failed.len(),
            p.passed.len(),
            p.failed.len(),
            if p.exception.is_some() {
                "  EXCEPTION"
            } else {
                ""
            },
            d.elapsed,
            p.elapsed
        );
        direct.insert(unit.clone(), d);
        proxied.insert(unit.clone(), p);
    }
    let rows = conformance::compare(&units, &direct, &proxied, &known);
    let table = conformance::report(&rows);
    let report = testbed::workspace_root().join("target/conformance/report.md");
    std::fs::write(&report, &table)?;
    println!("\n{table}");
    for row in &rows {
        for test in &row.unexplained {
            println!("UNEXPLAINED {}: {test}", row.unit);
        }
        if let Some(exception) = &row.proxy_exception {
            println!(
                "EXCEPTION {}: {}",
                row.unit,
                exception.lines().next().unwrap_or_default()
            );
        }
    }
    let direct_total: usize = rows.iter().map(|r| r.direct_passed).sum();
    let proxy_total: usize = rows.iter().map(|r| r.proxy_passed).sum();
    let ratio = proxy_total as f64 / direct_total.max(1) as f64;
    println!(
        "redirector passes {proxy_total} of the {direct_total} tests that pass direct: {:.1}% (target {:.0}%); report in {}",
        ratio * 100.0,
        TARGET * 100.0,
        report.display()
    );
    let exceptions = rows.iter().filter(|r| r.proxy_exception.is_some()).count();
    let unexplained: usize = rows.iter().map(|r| r.unexplained.len()).sum();
    if ratio < TARGET || exceptions > 0 || unexplained > 0 {
        bail!(
            "MISSED: {:.1}% < {:.0}%, or {exceptions} units aborted, or {unexplained} failures not on the known-differences list",
            ratio * 100.0,
            TARGET * 100.0
        );
    }
    Ok(())
}

/// The suite of the installed Redis, fetched if needed.
pub fn fetch() -> Result<Suite> {
    let suite = conformance::suite_dir().map_err(|e| anyhow!(e))?;
    if !suite.is_fetched() {
        println!(
            "fetching Redis {}'s test suite (Debian source package)...",
            suite.version
        );
    }
    suite.fetch().map_err(|e| anyhow!(e))?;
    Ok(suite)
}

fn run_direct(suite: &Suite, unit: &str) -> UnitResult {
    let server = SingleNodeCluster::start();
    suite.run_unit(unit, server.addr(), unit_timeout(), &[])
}

fn run_proxied(suite: &Suite, unit: &str, skip: &[String]) -> UnitResult {
    let cluster = RedisCluster::start_local(3, 1);
    let proxy = Proxy::start(&cluster.seeds(), &[]);
    let result = suite.run_unit(unit, proxy.addr(), unit_timeout(), skip);
    drop(proxy);
    drop(cluster);
    result
}
