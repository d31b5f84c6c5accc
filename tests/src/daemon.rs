//! The real `redirector` binary: the daemon and its subcommands.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::process::{Child, Place, wait_for};

/// The daemon binary: `$REDIRECTOR_BIN` (set by `cargo xtask test`), else
/// the one next to the test executable's target directory.
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("REDIRECTOR_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/redirector
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("redirector"))
        .expect("test executable lives in target/<profile>/deps");
    assert!(
        candidate.exists(),
        "{} not found: build it first (`cargo xtask test` does)",
        candidate.display()
    );
    candidate
}

/// `redirector --pin-dir <pin_dir> <args>` from the host.
pub fn cli(pin_dir: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(args)
        .output()
        .expect("run redirector")
}

/// Like [`cli`], asserting success; returns stdout.
pub fn cli_ok(pin_dir: &Path, args: &[&str]) -> String {
    let out = cli(pin_dir, args);
    assert!(
        out.status.success(),
        "redirector {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn status(pin_dir: &Path) -> Value {
    serde_json::from_str(&cli_ok(pin_dir, &["status", "--json"])).expect("status --json")
}

/// What `redirector run` logs once it serves (backend discovered, first
/// heartbeat written).
pub const READY: &str = "redirector ready";
/// What it logs once its listeners are up and readiness passes, before the
/// backend answers.
pub const LISTENING: &str = "listening; waiting for the backend";

/// `redirector run`, logging to a file, stopped by PID on drop.
pub struct Daemon {
    place: Place,
    pin_dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    /// The log line `start` and `start_again` wait for.
    ready_line: &'static str,
    child: Option<Child>,
}

impl Daemon {
    pub fn start(
        place: &Place,
        pin_dir: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> Self {
        Self::start_until(place, pin_dir, args, env, log, READY)
    }

    /// [`Self::start`], waiting for `ready_line` in the log instead.
    pub fn start_until(
        place: &Place,
        pin_dir: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: PathBuf,
        ready_line: &'static str,
    ) -> Self {
        let mut daemon = Self {
            place: place.clone(),
            pin_dir: pin_dir.into(),
            args,
            env,
            log,
            ready_line,
            child: None,
        };
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        let log_offset = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let mut cmd = self.place.command(binary());
        cmd.arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("run")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = Child::spawn("redirector run", cmd);
        let log_path = self.log.clone();
        let ready_line = self.ready_line;
        wait_for(ready_line, Duration::from_secs(20), || {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let fresh = text
                .get(usize::try_from(log_offset).unwrap_or(0)..)
                .unwrap_or("");
            assert!(
                child.is_running(),
                "redirector run exited during start-up:\n{fresh}"
            );
            fresh.contains(ready_line).then_some(())
        });
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::pid)
    }

    /// Graceful stop (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = child.terminate(Duration::from_secs(10));
            assert!(
                status.is_some_and(|s| s.success()),
                "redirector did not stop cleanly: {status:?}\n{}",
                self.log()
            );
        }
    }

    /// Crash (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "daemon still running");
        self.spawn();
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(Child::is_running)
    }

    /// Waits for the daemon to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) {
        let child = self.child.as_mut().expect("daemon running");
        wait_for("redirector to exit", timeout, || {
            (!child.is_running()).then_some(())
        });
        self.child = None;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
