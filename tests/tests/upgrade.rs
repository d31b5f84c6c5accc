//! Upgrades that drop nothing: a new `redirector run` starts beside the old
//! one, and the old one hands over on SIGTERM (`handover`), on the real
//! kernel with real phpredis clients in an enrolled pod.

use std::{
    fs::File,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use testbed::{
    daemon::{self, Daemon},
    exclusive,
    process::{Child, path_str, wait_for},
    require_kernel,
    topology::{REDIS_PORT, SERVICE_VIP, Topology, proxy_addr},
    workspace_root,
};

/// A phpredis client running in the pod until its stop file appears.
struct Load {
    mode: &'static str,
    stop: PathBuf,
    out: PathBuf,
    child: Child,
}

impl Load {
    fn start(topo: &Topology, mode: &'static str) -> Self {
        let dir = topo.workdir();
        let (stop, out) = (
            dir.join(format!("{mode}.stop")),
            dir.join(format!("{mode}.out")),
        );
        let script = workspace_root().join("tests/clients/phpredis_through_upgrade.php");
        let mut cmd = topo.pod(0).place().command("php");
        cmd.arg(&script)
            .args([mode, &SERVICE_VIP.to_string(), &REDIS_PORT.to_string()])
            .arg(&stop)
            .stdout(File::create(&out).expect("load output"))
            .stderr(Stdio::inherit());
        let child = Child::spawn(format!("phpredis {mode}"), cmd);
        Self {
            mode,
            stop,
            out,
            child,
        }
    }

    /// Stops the client and returns what it served: requests, and the
    /// proxy processes (INFO's process_id) that served it, in order.
    fn finish(mut self, logs: &[&Path]) -> (u64, Vec<String>) {
        File::create(&self.stop).expect("stop file");
        let child = &mut self.child;
        wait_for(
            &format!("phpredis {} to finish", self.mode),
            Duration::from_secs(20),
            || (!child.is_running()).then_some(()),
        );
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        if text.contains("FAIL") {
            let logs: Vec<String> = logs
                .iter()
                .map(|path| {
                    format!(
                        "--- {}\n{}",
                        path.display(),
                        std::fs::read_to_string(path).unwrap_or_default()
                    )
                })
                .collect();
            panic!(
                "phpredis {} failed a request through the upgrade:\n{text}\n{}",
                self.mode,
                logs.join("\n")
            );
        }
        let requests = text
            .lines()
            .find_map(|l| l.strip_prefix("requests: "))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("phpredis {} did not finish:\n{text}", self.mode));
        let proxies = text
            .lines()
            .filter_map(|l| l.strip_prefix("proxy: "))
            .map(str::to_string)
            .collect();
        (requests, proxies)
    }
}

/// The node's `TcpExt` counter `name` (`/proc/net/netstat`, read in the
/// node's namespace).
fn tcp_ext(topo: &Topology, name: &str) -> u64 {
    let out = topo.node_place().output("cat", &["/proc/net/netstat"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no TcpExt in /proc/net/netstat: {text}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no TcpExt {name}"))
}

/// `redirector ready --file FILE`, as the exec readiness probe runs it.
fn ready(topo: &Topology, file: &Path) -> bool {
    let out = topo.node_place().output(
        path_str(&daemon::binary()),
        &["ready", "--file", path_str(file)],
    );
    out.status.success()
}

fn sigterm(daemon: &Daemon) {
    let pid = i32::try_from(daemon.pid()).expect("pid");
    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
}

fn log_since(path: &Path, offset: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.get(offset..).unwrap_or_default().to_string()
}

#[test]
fn an_upgrade_hands_over_without_a_failed_request_and_steering_never_goes_direct() {
    require_kernel!();
    let _kernel = exclusive();
    assert!(
        testbed::require::on_path("php"),
        "php is not installed (cargo xtask setup installs php-cli and php-redis)"
    );
    let mut topo = Topology::build(1);
    topo.start_service_cluster();
    let mut args = topo.daemon_args();
    args.extend(["--drain-grace".to_string(), "40s".to_string()]);
    // Each pod's own readiness, as the DaemonSet's exec probe reads it.
    let (old_ready, new_ready) = (
        topo.workdir().join("old.ready"),
        topo.workdir().join("new.ready"),
    );
    let with_ready = |file: &Path| {
        let mut args = args.clone();
        args.extend(["--ready-file".to_string(), file.display().to_string()]);
        args
    };
    topo.start_daemon(with_ready(&old_ready));
    assert!(ready(&topo, &old_ready), "the old daemon is ready");
    topo.enroll(&topo.pod(0).netns);
    assert!(
        topo.pod(0).through_proxy(IpAddr::V4(SERVICE_VIP)),
        "the pod is steered before the upgrade"
    );

    let per_request = Load::start(&topo, "per-request");
    let pipeline = Load::start(&topo, "pipeline");
    let pconnect = Load::start(&topo, "pconnect");
    std::thread::sleep(Duration::from_secs(3));
    let before = topo.counters();

    // The new daemon, same flags, beside the old one.
    let new_log = topo.workdir().join("redirector-new.log");
    let mut successor = Daemon::start(
        &topo.node_place(),
        topo.pin_dir(),
        with_ready(&new_ready),
        vec![("RUST_LOG".into(), "info".into())],
        new_log.clone(),
    );
    assert!(ready(&topo, &new_ready), "the new daemon is ready");
    std::thread::sleep(Duration::from_secs(1));

    let migrate_failures = tcp_ext(&topo, "TCPMigrateReqFailure");
    let migrated = tcp_ext(&topo, "TCPMigrateReqSuccess");
    let old_log = topo.workdir().join("redirector.log");
    let old_offset = std::fs::read_to_string(&old_log).map_or(0, |t| t.len());
    // A burst of connection-per-request clients across the SIGTERM, so
    // that connections wait in the old listeners' queues when they close.
    // (The pod's own namespace: its ports may be reused from TIME_WAIT.)
    let sysctl = topo
        .pod(0)
        .place()
        .output("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"]);
    assert!(sysctl.status.success(), "{sysctl:?}");
    let mut burst = topo.pod(0).place().command("redis-benchmark");
    burst
        .args([
            "-h",
            &SERVICE_VIP.to_string(),
            "-p",
            &REDIS_PORT.to_string(),
        ])
        .args(["-k", "0", "-c", "32", "-n", "12000", "-t", "get", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let burst = burst.spawn().expect("redis-benchmark");
    std::thread::sleep(Duration::from_millis(500));
    sigterm(topo.daemon());
    let burst = burst.wait_with_output().expect("redis-benchmark");
    assert!(
        burst.status.success(),
        "redis-benchmark -k 0 across the handover: {burst:?}"
    );
    wait_for(
        "the old daemon to turn not ready",
        Duration::from_secs(3),
        || (!ready(&topo, &old_ready)).then_some(()),
    );
    assert!(ready(&topo, &new_ready), "the new daemon stays ready");
    // The long-lived pipelining client keeps the old daemon draining.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        topo.daemon().is_running(),
        "the old daemon left before its busy client did:\n{}",
        log_since(&old_log, old_offset)
    );
    let (pipelined, pipeline_proxies) = pipeline.finish(&[&old_log, &new_log]);
    topo.daemon().wait_exit(Duration::from_secs(10));
    let old = log_since(&old_log, old_offset);
    assert!(old.contains("handing over"), "no handover:\n{old}");
    assert!(old.contains("every client has left"), "{old}");

    // The successor alone now.
    std::thread::sleep(Duration::from_secs(3));
    let (served, per_request_proxies) = per_request.finish(&[&old_log, &new_log]);
    let (pconnected, pconnect_proxies) = pconnect.finish(&[&old_log, &new_log]);
    let after = topo.counters();

    assert!(pipelined > 1000, "the pipeline ran {pipelined} commands");
    assert_eq!(
        pipeline_proxies.len(),
        1,
        "the pipelining client stays on the old daemon to its end: {pipeline_proxies:?}"
    );
    assert!(served > 100, "{served} per-request requests");
    assert!(
        per_request_proxies.len() >= 2,
        "per-request connections moved to the new daemon: {per_request_proxies:?}"
    );
    assert!(pconnected >= 5, "{pconnected} pconnect requests");
    assert_eq!(
        pconnect_proxies.len(),
        2,
        "the idle persistent connection was closed between requests and reconnected: {pconnect_proxies:?}"
    );
    assert_eq!(
        pconnect_proxies.last(),
        per_request_proxies.last(),
        "both end on the new daemon"
    );
    assert_eq!(
        pconnect_proxies[0], pipeline_proxies[0],
        "both began on the old daemon"
    );

    // Connections queued on the old listeners moved, none was reset.
    assert_eq!(
        tcp_ext(&topo, "TCPMigrateReqFailure"),
        migrate_failures,
        "a queued connection could not move to the new daemon's listener"
    );
    eprintln!(
        "connections moved from the old daemon's accept queues: {}",
        tcp_ext(&topo, "TCPMigrateReqSuccess") - migrated
    );

    // Steering never went direct: steered connects went on, none passed
    // or found the proxy down.
    assert!(
        after.steered > before.steered + 100,
        "steered {} -> {}",
        before.steered,
        after.steered
    );
    assert_eq!(after.proxy_down, before.proxy_down, "proxy_down moved");
    assert_eq!(after.passed, before.passed, "passed moved");
    assert!(successor.is_running(), "{}", successor.log());
    let new = successor.log();
    assert!(new.contains(daemon::READY), "the new daemon serves:\n{new}");
    successor.stop();
}

#[test]
fn connections_queued_on_a_closing_proxy_listener_move_to_its_successor() {
    require_kernel!();
    let _kernel = exclusive();
    // No Redis: the daemon listens at once (no predecessor to wait for).
    let mut topo = Topology::build(0);
    let args = topo.daemon_args();
    topo.start_daemon_until(args, "info", daemon::LISTENING);
    // Off, as on most nodes: the move is redir_reuseport's doing alone.
    let sysctl = topo
        .node_place()
        .output("cat", &["/proc/sys/net/ipv4/tcp_migrate_req"]);
    assert_eq!(String::from_utf8_lossy(&sysctl.stdout).trim(), "0");
    // The successor: a listener of the test's own in the same group.
    let successor = topo
        .node_place()
        .reuseport_listen(proxy_addr())
        .expect("join the proxy's SO_REUSEPORT group");
    // The old daemon stops accepting (SIGSTOP): connections wait in its
    // queue, about half of them by the kernel's hash, the rest in ours.
    let old = Pid::from_raw(i32::try_from(topo.daemon().pid()).expect("pid"));
    kill(old, Signal::SIGSTOP).expect("SIGSTOP");
    let before = tcp_ext(&topo, "TCPMigrateReqSuccess");
    const CLIENTS: usize = 64;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            topo.node_place()
                .connect(proxy_addr(), Duration::from_secs(5))
                .expect("connect: the kernel completes the handshake for a stopped listener")
        })
        .collect();
    // Its listener closes with it (SIGKILL: not even a graceful close).
    topo.daemon().kill();
    let mut accepted = 0;
    successor.set_nonblocking(true).expect("nonblocking");
    wait_for(
        "every client in the successor's queue",
        Duration::from_secs(10),
        || {
            while successor.accept().is_ok() {
                accepted += 1;
            }
            (accepted == CLIENTS).then_some(())
        },
    );
    let moved = tcp_ext(&topo, "TCPMigrateReqSuccess") - before;
    assert!(
        moved > 0,
        "no connection was queued on the old listener ({accepted} accepted by the successor)"
    );
    eprintln!("{moved} of {CLIENTS} connections moved from the killed daemon's queue");
    drop(clients);
}
