//! Redis's own test suite as the specification of "looks like one Redis".
//!
//! The suite is the one matching the installed `redis-server`: Debian's
//! `redis` source package for that exact version, fetched with
//! `apt-get source --download-only` through a private apt directory (a
//! `deb-src` line for each of the machine's own Debian suites), unpacked
//! with `dpkg-source -x` (Debian's patches applied) under
//! `target/conformance/`. Nothing else is downloaded.
//!
//! Each unit runs on its own (`runtest --single`) against an external
//! server (`--host/--port --cluster-mode`), in the profile Redis's CI uses
//! for servers without `DEBUG` or a replication stream. Its output is
//! parsed into passed, failed and skipped tests, and whether the unit
//! aborted on an exception.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Tags left out: what an external server may lack (`DEBUG`, a replication
/// stream), and the slow tests, as Redis's own external CI job does.
pub const TAGS: &str = "-slow -needs:debug -needs:repl";

/// The unpacked suite.
#[derive(Clone, Debug)]
pub struct Suite {
    pub dir: PathBuf,
    pub version: String,
}

/// Where the suite of the installed Redis lives (fetched or not).
pub fn suite_dir() -> Result<Suite, String> {
    let version = installed_version()?;
    let upstream = upstream_version(&version);
    let dir = crate::workspace_root()
        .join("target/conformance")
        .join(format!("redis-{upstream}"));
    Ok(Suite { dir, version })
}

/// The installed `redis-server` package's Debian version
/// (`5:7.0.15-1~deb12u10`).
pub fn installed_version() -> Result<String, String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "redis-server"])
        .output()
        .map_err(|e| format!("cannot run dpkg-query: {e}"))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || version.is_empty() {
        return Err("redis-server is not installed as a Debian package".into());
    }
    Ok(version)
}

/// `5:7.0.15-1~deb12u10` -> `7.0.15` (the source tree's name).
pub fn upstream_version(debian: &str) -> String {
    let no_epoch = debian.split_once(':').map_or(debian, |(_, v)| v);
    no_epoch
        .rsplit_once('-')
        .map_or(no_epoch, |(v, _)| v)
        .to_string()
}

/// `deb-src` entries for the machine's own Debian suites: every `deb`
/// entry of `/etc/apt/sources.list` and `/etc/apt/sources.list.d/` (one-line
/// and deb822 formats), turned into its `deb-src` twin.
pub fn deb_src_entries(one_line: &[String], deb822: &[String]) -> String {
    let mut out = String::new();
    for text in one_line {
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("deb ") {
                out.push_str(&format!("deb-src {rest}\n"));
            }
        }
    }
    let mut stanzas = String::new();
    for text in deb822 {
        for stanza in text.split("\n\n") {
            let is_deb = stanza.lines().any(|l| {
                l.trim_start()
                    .strip_prefix("Types:")
                    .is_some_and(|t| t.split_whitespace().any(|t| t == "deb"))
            });
            let disabled = stanza
                .lines()
                .any(|l| l.trim().eq_ignore_ascii_case("Enabled: no"));
            if !is_deb || disabled {
                continue;
            }
            for line in stanza.lines() {
                if line.trim_start().starts_with("Types:") {
                    stanzas.push_str("Types: deb-src\n");
                } else if !line.trim_start().starts_with('#') {
                    stanzas.push_str(line);
                    stanzas.push('\n');
                }
            }
            stanzas.push('\n');
        }
    }
    if !stanzas.is_empty() {
        out.push_str("# deb822\n");
        out.push_str(&stanzas);
    }
    out
}

impl Suite {
    pub fn is_fetched(&self) -> bool {
        self.dir.join("tests/test_helper.tcl").exists()
    }

    /// Fetches and unpacks the suite unless it is there already; points its
    /// `src/` at the installed binaries (some units run `src/redis-cli`).
    pub fn fetch(&self) -> Result<(), String> {
        if !self.is_fetched() {
            let work = self
                .dir
                .parent()
                .expect("the suite has a parent directory")
                .join("apt");
            fetch_source(&work, &self.version, &self.dir)?;
        }
        let src = self.dir.join("src");
        std::fs::create_dir_all(&src).map_err(|e| format!("{}: {e}", src.display()))?;
        for tool in [
            "redis-server",
            "redis-cli",
            "redis-benchmark",
            "redis-check-aof",
        ] {
            let link = src.join(tool);
            let target = Path::new("/usr/bin").join(tool);
            if !link.exists() && target.exists() {
                std::os::unix::fs::symlink(&target, &link)
                    .map_err(|e| format!("{}: {e}", link.display()))?;
            }
        }
        Ok(())
    }

    /// The units `runtest` would run, in its order (`::all_tests`).
    pub fn units(&self) -> Result<Vec<String>, String> {
        let helper = std::fs::read_to_string(self.dir.join("tests/test_helper.tcl"))
            .map_err(|e| format!("the suite's test_helper.tcl: {e}"))?;
        Ok(parse_units(&helper))
    }

    /// Runs one unit against the server at `addr`.
    pub fn run_unit(
        &self,
        unit: &str,
        addr: SocketAddr,
        timeout: Duration,
        skip: &[String],
    ) -> UnitResult {
        let started = Instant::now();
        let skips = skip.iter().flat_map(|test| ["--skiptest", test.as_str()]);
        // runtest's own test server probes ports from `--baseport - 32`
        // (binding the wildcard address, so it can pick a port another run
        // holds on 127.0.0.1): start it where this process knows both the
        // port and its +10000 twin are free.
        let probe_from = crate::ports::free_cluster_port();
        let out = Command::new("timeout")
            .arg("--kill-after=10")
            .arg(timeout.as_secs().to_string())
            .arg("tclsh")
            .arg("tests/test_helper.tcl")
            .args(["--host", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .args(["--baseport", &(probe_from + 32).to_string()])
            .args(["--cluster-mode", "--tags", TAGS, "--single", unit])
            .args(skips)
            .current_dir(&self.dir)
            .env("TERM", "dumb")
            .stdin(Stdio::null())
            .output();
        let (text, status) = match out {
            Ok(out) => (
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                out.status.code(),
            ),
            Err(e) => (format!("cannot run tclsh: {e}"), None),
        };
        let mut result = parse_output(&text);
        result.elapsed = started.elapsed();
        // `timeout` exits 124 (137 after the kill).
        result.timed_out = matches!(status, Some(124 | 137));
        if result.timed_out && result.exception.is_none() {
            result.exception = Some(format!("timed out after {timeout:?}"));
        }
        result.output = text;
        result
    }
}

fn fetch_source(work: &Path, version: &str, into: &Path) -> Result<(), String> {
    let lists = work.join("lists");
    let parts = work.join("sources.list.d");
    std::fs::create_dir_all(lists.join("partial")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&parts).map_err(|e| e.to_string())?;
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let mut one_line = vec![read(Path::new("/etc/apt/sources.list"))];
    let mut deb822 = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("list") => one_line.push(read(&path)),
                Some("sources") => deb822.push(read(&path)),
                _ => {}
            }
        }
    }
    let entries = deb_src_entries(&one_line, &deb822);
    let (list, stanzas) = match entries.split_once("# deb822\n") {
        Some((list, stanzas)) => (list.to_string(), stanzas.to_string()),
        None => (entries, String::new()),
    };
    if list.is_empty() && stanzas.is_empty() {
        return Err("no Debian `deb` source is configured to derive a `deb-src` from".into());
    }
    std::fs::write(parts.join("redirector-src.list"), list).map_err(|e| e.to_string())?;
    std::fs::write(parts.join("redirector-src.sources"), stanzas).map_err(|e| e.to_string())?;
    let apt = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("apt-get")
            .arg("-o")
            .arg("Dir::Etc::SourceList=/dev/null")
            .arg("-o")
            .arg(format!("Dir::Etc::SourceParts={}", parts.display()))
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", lists.display()))
            .args(args)
            .current_dir(work)
            .output()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "apt-get {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    };
    apt(&["update"])?;
    apt(&["source", "--download-only", &format!("redis={version}")])?;
    let dsc = std::fs::read_dir(work)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "dsc"))
        .ok_or("apt-get source left no .dsc")?;
    let _ = std::fs::remove_dir_all(into);
    let out = Command::new("dpkg-source")
        .arg("-x")
        .arg(&dsc)
        .arg(into)
        .current_dir(work)
        .output()
        .map_err(|e| format!("cannot run dpkg-source (dpkg-dev): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "dpkg-source -x: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// The `set ::all_tests { ... }` list of test_helper.tcl.
pub fn parse_units(helper: &str) -> Vec<String> {
    let Some(start) = helper.find("set ::all_tests {") else {
        return Vec::new();
    };
    let body = &helper[start + "set ::all_tests {".len()..];
    let end = body.find('}').unwrap_or(body.len());
    body[..end].split_whitespace().map(str::to_string).collect()
}

/// What one unit's run said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitResult {
    pub passed: BTreeSet<String>,
    pub failed: BTreeSet<String>,
    pub skipped: usize,
    /// The unit stopped on an exception (the rest of it never ran).
    pub exception: Option<String>,
    pub timed_out: bool,
    pub elapsed: Duration,
    pub output: String,
}

/// Parses `runtest` output (colours off): `[ok]: NAME (N ms)`,
/// `[err]: NAME in FILE` (message lines follow), `[skip]: NAME`,
/// `[ignore]: NAME`, `[exception]: ...`.
pub fn parse_output(text: &str) -> UnitResult {
    let mut result = UnitResult::default();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("[ok]: ") {
            let name = rest
                .rsplit_once(" (")
                .filter(|(_, t)| t.ends_with(" ms)"))
                .map_or(rest, |(name, _)| name);
            result.passed.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("[err]: ") {
            let name = rest
                .rsplit_once(" in tests/")
                .map_or(rest, |(name, _)| name);
            result.failed.insert(name.to_string());
        } else if line.starts_with("[skip]: ") || line.starts_with("[ignore]: ") {
            result.skipped += 1;
        } else if let Some(rest) = line.strip_prefix("[exception]: ") {
            let mut message = rest.to_string();
            while let Some(next) = lines.peek() {
                if next.starts_with('[') || message.len() > 2000 {
                    break;
                }
                message.push('\n');
                message.push_str(next);
                lines.next();
            }
            result.exception = Some(message);
        }
    }
    // A test that failed once and passed in a retry counts as failed.
    let failed = result.failed.clone();
    result.passed.retain(|name| !failed.contains(name));
    result
}

/// Tests the proxy is known not to pass, each with its reason. They still
/// count as failures; the list explains the gap.
#[derive(Clone, Debug, Default)]
pub struct KnownDifferences {
    /// (unit, test name) -> reason.
    pub entries: BTreeMap<(String, String), String>,
}

impl KnownDifferences {
    /// `unit<TAB>test name<TAB>reason` per line; `#` comments, blank lines.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let mut fields = line.splitn(3, '\t');
            let (Some(unit), Some(test), Some(reason)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(format!(
                    "line {}: expected UNIT<TAB>TEST<TAB>REASON: {line:?}",
                    n + 1
                ));
            };
            if reason.trim().is_empty() {
                return Err(format!("line {}: {test}: no reason given", n + 1));
            }
            entries.insert(
                (unit.to_string(), test.to_string()),
                reason.trim().to_string(),
            );
        }
        Ok(Self { entries })
    }

    pub fn load() -> Result<Self, String> {
        let path = crate::workspace_root().join("tests/conformance/known-differences.tsv");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text)
    }

    /// Tests of `unit` that would block the rest of it through the proxy
    /// (they wait forever for something only one Redis sends): their
    /// reason starts with `blocks:`. The proxy run skips them, so the rest
    /// of the unit runs; they still count as failures.
    pub fn blocking(&self, unit: &str) -> Vec<String> {
        self.entries
            .iter()
            .filter(|((u, _), reason)| u == unit && reason.starts_with("blocks:"))
            .map(|((_, test), _)| test.clone())
            .collect()
    }

    pub fn reason(&self, unit: &str, test: &str) -> Option<&str> {
        self.entries
            .get(&(unit.to_string(), test.to_string()))
            .map(String::as_str)
    }
}

/// One unit in the comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitRow {
    pub unit: String,
    pub direct_passed: usize,
    /// Of the tests that pass direct, how many pass through the proxy.
    pub proxy_passed: usize,
    pub proxy_exception: Option<String>,
    /// Tests passing direct that fail (or never ran) through the proxy and
    /// are not on the known-differences list.
    pub unexplained: Vec<String>,
    /// Those on the list.
    pub explained: Vec<String>,
}

/// Direct against proxy, unit by unit: the denominator is what passes
/// direct in the same profile.
pub fn compare(
    units: &[String],
    direct: &BTreeMap<String, UnitResult>,
    proxy: &BTreeMap<String, UnitResult>,
    known: &KnownDifferences,
) -> Vec<UnitRow> {
    let empty = UnitResult::default();
    units
        .iter()
        .map(|unit| {
            let d = direct.get(unit).unwrap_or(&empty);
            let p = proxy.get(unit).unwrap_or(&empty);
            let mut row = UnitRow {
                unit: unit.clone(),
                direct_passed: d.passed.len(),
                proxy_passed: 0,
                proxy_exception: p.exception.clone(),
                unexplained: Vec::new(),
                explained: Vec::new(),
            };
            for test in &d.passed {
                if p.passed.contains(test) {
                    row.proxy_passed += 1;
                } else if known.reason(unit, test).is_some() {
                    row.explained.push(test.clone());
                } else {
                    row.unexplained.push(test.clone());
                }
            }
            row
        })
        .collect()
}

/// The per-unit table and totals, as markdown.
pub fn report(rows: &[UnitRow]) -> String {
    let mut out = String::from(
        "| unit | pass direct | pass through redirector | known differences | unexplained | exception |\n|---|---|---|---|---|---|\n",
    );
    let (mut direct, mut proxy) = (0, 0);
    for row in rows {
        direct += row.direct_passed;
        proxy += row.proxy_passed;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row.unit,
            row.direct_passed,
            row.proxy_passed,
            row.explained.len(),
            row.unexplained.len(),
            if row.proxy_exception.is_some() {
                "yes"
            } else {
                ""
            }
        ));
    }
    let ratio = if direct == 0 {
        0.0
    } else {
        proxy as f64 * 100.0 / direct as f64
    };
    out.push_str(&format!(
        "| **total** | **{direct}** | **{proxy}** ({ratio:.1}%) | {} | {} | {} |\n",
        rows.iter().map(|r| r.explained.len()).sum::<usize>(),
        rows.iter().map(|r| r.unexplained.len()).sum::<usize>(),
        rows.iter().filter(|r| r.proxy_exception.is_some()).count(),
    ));
    out
}

/// The direct baseline's server: one node owning every slot, as Redis's
/// own external cluster-mode CI runs it.
pub struct SingleNodeCluster {
    pub server: crate::redis::RedisServer,
    _dir: crate::TempDir,
}

impl SingleNodeCluster {
    pub fn start() -> Self {
        let dir = crate::TempDir::new("rdr-conformance-");
        let port = crate::ports::free_cluster_port();
        let conf = dir.path().join("nodes.conf");
        let server = crate::redis::RedisServer::start(
            &crate::process::Place::default(),
            &[std::net::IpAddr::from([127, 0, 0, 1])],
            port,
            dir.path(),
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                crate::process::path_str(&conf),
            ],
        );
        server.cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        crate::process::wait_for("the single-node cluster", Duration::from_secs(10), || {
            server
                .cli(&["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
                .then_some(())
        });
        Self { server, _dir: dir }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_units_are_read_as_debian_and_runtest_write_them() {
        assert_eq!(upstream_version("5:7.0.15-1~deb12u10"), "7.0.15");
        assert_eq!(upstream_version("7.2.4-1"), "7.2.4");
        let helper =
            "set ::all_tests {\n    unit/printver\n    unit/type/list\n}\nset ::next_test 0\n";
        assert_eq!(parse_units(helper), ["unit/printver", "unit/type/list"]);
    }

    #[test]
    fn deb_src_twins_come_from_both_source_formats() {
        let list = "deb http://deb.debian.org/debian bookworm main\n# deb http://x y z\n";
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n\nTypes: deb\nEnabled: no\nURIs: http://other\n";
        let out = deb_src_entries(&[list.into()], &[deb822.into()]);
        assert!(out.contains("deb-src http://deb.debian.org/debian bookworm main\n"));
        assert!(out.contains("Types: deb-src\nURIs: http://deb.debian.org/debian\n"));
        assert!(!out.contains("http://other"), "disabled stanza: {out}");
        assert!(!out.contains("http://x"), "commented line: {out}");
    }

    #[test]
    fn runtest_output_is_parsed_per_test() {
        let text = "[ok]: SET and GET (1 ms)\n[ok]: Check encoding (x) (0 ms)\n[err]: LPOS basic in tests/unit/type/list.tcl\nExpected 1 got 2\n[skip]: needs debug\n[ok]: LPOS basic (2 ms)\n[exception]: Executing test client: I/O error\nwhile executing\n\"r ping\"\n[1/1 done]: unit/x (3 seconds)\n";
        let result = parse_output(text);
        assert_eq!(
            result.passed,
            BTreeSet::from(["SET and GET".to_string(), "Check encoding (x)".to_string()])
        );
        assert_eq!(result.failed, BTreeSet::from(["LPOS basic".to_string()]));
        assert_eq!(result.skipped, 1);
        let exception = result.exception.expect("exception");
        assert!(exception.starts_with("Executing test client: I/O error\nwhile executing"));
    }

    #[test]
    fn the_comparison_counts_what_passes_direct() {
        let unit = "unit/x".to_string();
        let result = |passed: &[&str]| UnitResult {
            passed: passed.iter().map(|s| s.to_string()).collect(),
            ..UnitResult::default()
        };
        let direct = BTreeMap::from([(unit.clone(), result(&["a", "b", "c", "d"]))]);
        let proxy = BTreeMap::from([(unit.clone(), result(&["a", "b", "e"]))]);
        let known = KnownDifferences::parse("# why\nunit/x\tc\tone server's own memory\n")
            .expect("known differences");
        let rows = compare(&[unit], &direct, &proxy, &known);
        assert_eq!(rows[0].direct_passed, 4);
        assert_eq!(rows[0].proxy_passed, 2, "e passes only through the proxy");
        assert_eq!(rows[0].explained, ["c"]);
        assert_eq!(rows[0].unexplained, ["d"]);
        assert!(report(&rows).contains("| **total** | **4** | **2** (50.0%) | 1 | 1 | 0 |"));
        assert!(
            KnownDifferences::parse("unit/x\tc\t\n").is_err(),
            "no reason"
        );
    }

    #[test]
    fn only_tests_marked_blocks_are_skipped_and_only_in_their_unit() {
        let known = KnownDifferences::parse(
            "unit/x\thangs\tblocks: waits for one server's eviction\nunit/x\tfails\tper-node memory\nunit/y\tother\tblocks: elsewhere\n",
        )
        .expect("known differences");
        assert_eq!(known.blocking("unit/x"), ["hangs"]);
        assert_eq!(known.blocking("unit/y"), ["other"]);
        assert!(known.blocking("unit/z").is_empty());
        assert_eq!(
            known.reason("unit/x", "hangs"),
            Some("blocks: waits for one server's eviction")
        );
    }
}
