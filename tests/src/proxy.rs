//! The real `redirector` binary as a plain proxy (`--steering off`) on
//! 127.0.0.1, in front of a real cluster.

use std::{net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use crate::{
    TempDir,
    daemon::binary,
    ports::free_port,
    process::{Child, Place, wait_for},
};

pub struct Proxy {
    addr: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
    _dir: TempDir,
}

impl Proxy {
    /// Starts a proxy for the cluster reachable at `seeds`, with `extra`
    /// `redirector run` arguments, and waits until it is ready.
    pub fn start(seeds: &[SocketAddr], extra: &[&str]) -> Self {
        let seeds: Vec<String> = seeds.iter().map(ToString::to_string).collect();
        let mut args = vec!["--cluster-seed".to_string(), seeds.join(",")];
        args.extend(extra.iter().map(ToString::to_string));
        Self::start_with(&args)
    }

    /// Starts a proxy for a standalone `primary` (with `replicas`), as
    /// `--backend NAME=standalone:...`.
    pub fn start_standalone(primary: SocketAddr, replicas: &[SocketAddr], extra: &[&str]) -> Self {
        let addrs: Vec<String> = std::iter::once(primary)
            .chain(replicas.iter().copied())
            .map(|a| a.to_string())
            .collect();
        let mut args = vec![
            "--backend".to_string(),
            format!("sessions=standalone:{}", addrs.join(",")),
        ];
        args.extend(extra.iter().map(ToString::to_string));
        Self::start_with(&args)
    }

    /// Starts a proxy with these `redirector run` arguments (after the
    /// listener and admin addresses) and waits until it is ready.
    pub fn start_with(args: &[String]) -> Self {
        Self::start_until(args, crate::daemon::READY)
    }

    /// [`Self::start_with`], waiting for `ready_line` in the log instead
    /// (e.g. [`crate::daemon::LISTENING`] when no backend answers yet).
    pub fn start_until(args: &[String], ready_line: &str) -> Self {
        let dir = TempDir::new("rdr-proxy-");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.path().join("redirector.log");
        let mut cmd = Place::default().command(binary());
        cmd.args([
            "run",
            "--steering",
            "off",
            "--proxy-addr",
            &addr.to_string(),
        ])
        .args(["--admin-addr", &admin.to_string()])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("proxy log"));
        let mut child = Child::spawn("redirector (proxy)", cmd);
        wait_for("the proxy to be ready", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                child.is_running(),
                "redirector exited during start-up:\n{text}"
            );
            text.contains(ready_line).then_some(())
        });
        Self {
            addr,
            admin,
            log,
            child: Some(child),
            _dir: dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener (`--admin-addr`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::pid)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The Prometheus exposition from the admin endpoint.
    pub fn metrics(&self) -> String {
        self.get("/metrics")
    }

    pub fn get(&self, path: &str) -> String {
        crate::http::get_in(&crate::process::Place::default(), self.admin, path)
    }

    /// The value of one sample in the metrics (`name{labels}` exactly as
    /// exposed, or `name` alone); 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        crate::http::sample(&self.metrics(), sample)
    }

    /// Resident memory of the proxy, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proxy status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// CPU time (user + system) used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        crate::process::cpu_ticks(self.pid())
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(Child::is_running)
    }
}
