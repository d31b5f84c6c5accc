//! eBPF steering end to end, on the real kernel: real namespaces, cgroup v2,
//! `redis-server`, `redis-cli`, `bpftool` and the `redirector` binary.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use testbed::{
    bpftool, exclusive,
    process::{path_str, wait_for},
    require_kernel,
    topology::{REDIS_PORT, SERVICE_VIP, SERVICE_VIP6, Topology},
};

const VIP: IpAddr = IpAddr::V4(SERVICE_VIP);

/// A key the service address's node owns (it has slots 0-5460 from
/// `redis-cli --cluster create`), so direct, cluster-unaware commands on it
/// succeed without the proxy.
fn direct_key() -> String {
    testbed::cluster::key_in_slot(100)
}
const PROGRAMS: [&str; 3] = ["redir_connect4", "redir_connect6", "redir_sockops"];

fn running(pods: usize, extra_args: &[&str]) -> Topology {
    Topology::running(pods, extra_args)
}

/// Program ids attached at the topology's cgroup, by name.
fn attached(topo: &Topology) -> Vec<(String, u64)> {
    let root = path_str(topo.attach_root());
    let mut out: Vec<(String, u64)> = bpftool::json(&["cgroup", "show", root])
        .as_array()
        .expect("cgroup show")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["id"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn enrolled_pod_is_steered_and_others_go_direct() {
    require_kernel!();
    let _kernel = exclusive();
    let topo = running(2, &[]);
    let (pod_a, pod_b) = (topo.pod(0), topo.pod(1));
    // Enroll by PID, as an agent that knows a pod's process would.
    let mut sleeper = testbed::process::Child::spawn("sleep", {
        let mut cmd = pod_a.place().command("sleep");
        cmd.arg("60");
        cmd
    });
    let out = topo.cli(&["enroll", "--pid", &sleeper.pid().to_string()]);
    assert!(out.starts_with("enrolled pid"), "{out}");
    sleeper.kill();

    // Pod A: the command works and is served by the node proxy, and the
    // kernel counted one steered connect per connection.
    let before = topo.counters();
    assert_eq!(pod_a.redis(&["SET", "k", "v"]), "OK");
    assert!(pod_a.through_proxy(VIP), "pod A reached Redis directly");
    let after = topo.counters();
    assert_eq!(after.steered, before.steered + 2, "{before:?} -> {after:?}");
    assert_eq!(after.errors, 0);
    // The same counters, read from the maps at scrape time, in /metrics.
    let metrics = topo.metrics();
    let sample = |name: &str| testbed::http::sample(&metrics, name);
    assert_eq!(
        sample("redirector_steering_connects_total{outcome=\"steered\"}"),
        after.steered as f64,
        "{metrics}"
    );
    assert_eq!(
        sample("redirector_steering_connects_total{outcome=\"proxy_own\"}"),
        after.proxy_own as f64
    );
    assert_eq!(sample("redirector_steering_enrolled_namespaces"), 1.0);
    assert_eq!(
        topo.status()["enrolled"][0]["netns_inode"].as_u64(),
        Some(
            std::fs::metadata(pod_a.netns.path())
                .map(|m| {
                    use std::os::unix::fs::MetadataExt as _;
                    m.ino()
                })
                .expect("stat netns")
        )
    );

    // Slot-routed: keys written by the cluster-unaware pod land on their
    // owners across the shards, and come back in one MGET.
    let keys = [
        "user:1",
        "user:2",
        "user:3",
        "cart:7",
        "session:abc",
        "page:home",
    ];
    let mut mset = vec!["MSET"];
    for key in keys {
        mset.extend([key, key]);
    }
    assert_eq!(pod_a.redis(&mset), "OK");
    let mut owners = std::collections::BTreeSet::new();
    for key in keys {
        let owner = topo
            .cluster()
            .owner_of_slot(testbed::cluster::slot_of(key.as_bytes()));
        assert_eq!(topo.cluster().cli(owner, &["GET", key]).trim(), key);
        owners.insert(owner);
    }
    assert!(
        owners.len() >= 2,
        "keys did not spread over shards: {owners:?}"
    );
    let mut mget = vec!["MGET"];
    mget.extend(keys);
    assert_eq!(pod_a.redis(&mget), keys.join("\n"));

    // aya-log records from the connect program reached the daemon's tracing.
    let log_line = wait_for("an eBPF log record", Duration::from_secs(5), || {
        let log = topo.daemon.as_ref().expect("daemon").log();
        log.lines()
            .find(|l| l.contains("redirector_ebpf") && l.contains("steered socket"))
            .map(str::to_string)
    });
    assert!(log_line.contains("DEBUG"), "{log_line}");

    // Pod B is not enrolled: same command, direct, steered counter still.
    let before = topo.counters();
    let key = direct_key();
    assert_eq!(pod_b.redis(&["SET", &key, "v2"]), "OK");
    assert!(!pod_b.through_proxy(VIP), "pod B went through the proxy");
    let after = topo.counters();
    assert_eq!(after.steered, before.steered);
    assert_eq!(after.passed, before.passed + 2);

    // Redis' own CLIENT LIST, while each pod holds a blocked connection:
    // pod A's arrives from the node (the proxy), pod B's from pod B.
    let list_key = "{blocked}list";
    let owner = topo
        .cluster()
        .owner_of_slot(testbed::cluster::slot_of(list_key.as_bytes()));
    let waiters: Vec<_> = [pod_a, pod_b]
        .iter()
        .map(|pod| {
            let mut cmd = pod.place().command("redis-cli");
            cmd.args(["-h", &SERVICE_VIP.to_string(), "-p", "6379"])
                .args(["BLPOP", list_key, "3"])
                .stdout(std::process::Stdio::null());
            testbed::process::Child::spawn("blpop", cmd)
        })
        .collect();
    let clients = wait_for("both BLPOPs to block", Duration::from_secs(5), || {
        let list = topo.cluster().cli(owner, &["CLIENT", "LIST"]);
        (list.matches("cmd=blpop").count() == 2).then_some(list)
    });
    drop(waiters);
    let blocked: Vec<&str> = clients
        .lines()
        .filter(|l| l.contains("cmd=blpop"))
        .collect();
    assert!(
        blocked
            .iter()
            .any(|l| l.contains(&format!("addr={}:", pod_b.ip))),
        "pod B's direct connection is missing:\n{clients}"
    );
    assert!(
        !clients.contains(&format!("addr={}:", pod_a.ip)),
        "pod A reached Redis directly:\n{clients}"
    );
    assert!(
        blocked.iter().any(|l| l.contains("addr=10.96.0.")),
        "no connection from the node proxy:\n{clients}"
    );

    // Unenrolled, pod A goes direct again.
    topo.unenroll(&pod_a.netns);
    let before = topo.counters();
    assert!(!pod_a.through_proxy(VIP));
    assert_eq!(pod_a.redis(&["GET", &key]), "v2");
    assert_eq!(topo.counters().steered, before.steered);

    // status reflects it all.
    let status = topo.status();
    assert_eq!(status["enrolled"].as_array().map(Vec::len), Some(0));
    for (i, name) in PROGRAMS.iter().enumerate() {
        assert_eq!(status["programs"][i]["name"], *name);
        assert!(status["programs"][i]["attached"].is_object(), "{status}");
    }
    assert_eq!(status["proxy"]["steering"], true);
}

#[test]
fn ipv6_connects_are_steered_by_connect6() {
    require_kernel!();
    let _kernel = exclusive();
    let topo = running(1, &[]);
    let pod = topo.pod(0);
    topo.enroll(&pod.netns);
    let vip6 = IpAddr::V6(SERVICE_VIP6);

    let before = topo.counters();
    let out = pod.redis_cli(vip6, REDIS_PORT, &["SET", "k6", "v6"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK", "{out:?}");
    let out = pod.redis_cli(vip6, REDIS_PORT, &["INFO", "server"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("redirector_version"),
        "not served by the proxy over IPv6: {out:?}"
    );
    assert_eq!(topo.counters().steered, before.steered + 2);
}

#[test]
fn proxy_own_connects_are_never_steered() {
    require_kernel!();
    let _kernel = exclusive();
    let mut topo = running(1, &[]);
    // Enrolling the proxy's own namespace is what would make it loop: its
    // upstream connects to the service match every steering rule but one,
    // the socket mark. Restart it so that every connection it opens
    // (discovery, pooled and leased connections) starts out enrolled.
    topo.enroll(&topo.node);
    topo.enroll(&topo.pod(0).netns);
    topo.daemon().stop();
    let before = topo.counters();
    topo.daemon().start_again();

    assert_eq!(topo.pod(0).redis(&["SET", "loop", "no"]), "OK");
    let after = topo.counters();
    assert_eq!(after.steered, before.steered + 1, "{before:?} -> {after:?}");
    assert!(
        after.proxy_own > before.proxy_own,
        "the proxy's upstream connects were not recognised: {after:?}"
    );
    assert_eq!(after.errors, 0);

    // An unmarked client in the (enrolled) node namespace is steered, and
    // the proxy serves it without looping.
    let before = topo.counters();
    let out = topo.node_place().output(
        "timeout",
        &[
            "20",
            "redis-cli",
            "-h",
            &SERVICE_VIP.to_string(),
            "GET",
            "loop",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no", "{out:?}");
    let after = topo.counters();
    assert_eq!(after.steered, before.steered + 1);
    assert_eq!(after.errors, 0);
}

#[test]
fn restart_readopts_pins_and_fails_open_while_down() {
    require_kernel!();
    let _kernel = exclusive();
    let mut topo = running(1, &[]);
    topo.enroll(&topo.pod(0).netns);
    let key = direct_key();
    assert!(topo.pod(0).through_proxy(VIP));
    let programs = attached(&topo);
    assert_eq!(programs.len(), 3, "{programs:?}");

    // Graceful stop: the heartbeat is cleared, connects go direct at once
    // instead of to a dead listener; the programs stay attached.
    topo.daemon().stop();
    let before = topo.counters();
    assert_eq!(topo.pod(0).redis(&["SET", &key, "direct"]), "OK");
    assert!(!topo.pod(0).through_proxy(VIP));
    assert_eq!(topo.counters().proxy_down, before.proxy_down + 2);
    assert_eq!(attached(&topo), programs);

    // Restart: the same programs are adopted, not loaded again.
    topo.daemon().start_again();
    assert!(topo.daemon().log().contains("outcome=Adopted"));
    assert_eq!(attached(&topo), programs);
    // Besides the three cgroup programs, the daemon's listeners hold one
    // redir_reuseport of their own (the old daemon's went with its group).
    let ours: Vec<_> = bpftool::programs_named("redir_");
    let reuseport = ours.iter().filter(|(_, n)| n == "redir_reuseport").count();
    assert_eq!(
        (ours.len() - reuseport, reuseport),
        (3, 1),
        "bpftool prog list shows more than one set: {ours:?}"
    );
    assert!(topo.pod(0).through_proxy(VIP), "not steered after restart");
    assert_eq!(topo.pod(0).redis(&["GET", &key]), "direct");

    // Crash: the kernel drops the dead listener from rdr_listener when the
    // process goes, so the very next connect goes direct (no ECONNREFUSED),
    // while the last heartbeat is still fresh (3 s liveness). Steering
    // resumes with a new daemon.
    topo.daemon().kill();
    let killed = std::time::Instant::now();
    connects_go_direct_while_the_crashed_beat_is_fresh(&topo, killed, 5, "after the crash");
    topo.daemon().start_again();
    assert!(topo.pod(0).through_proxy(VIP));
    assert_eq!(attached(&topo), programs);
}

/// After a crash the last heartbeat stays fresh for the liveness window;
/// a daemon started in it must not let that beat steer clients to its
/// listener while its backend is not up: they go direct (served), not to
/// a proxy that could only answer with an error.
#[test]
fn a_daemon_restarted_after_a_crash_steers_nothing_until_its_backend_is_up() {
    require_kernel!();
    let _kernel = exclusive();
    let mut topo = running(1, &[]);
    topo.enroll(&topo.pod(0).netns);
    assert!(topo.pod(0).through_proxy(VIP));
    topo.daemon().kill();
    topo.daemon = None;
    let killed = std::time::Instant::now();
    // The new daemon's backend never comes up: its seed refuses.
    let mut args = topo.daemon_args();
    args.extend(["--cluster-seed".into(), "127.0.0.1:1".into()]);
    topo.start_daemon_until(args, "info", testbed::daemon::LISTENING);
    connects_go_direct_while_the_crashed_beat_is_fresh(
        &topo,
        killed,
        3,
        "beside a listening daemon without a backend",
    );
}

/// `count` connects from pod 0 all go direct (each counted `proxy_down`),
/// soon enough after the crash at `killed` that its last beat is still
/// fresh (3 s liveness): what they prove holds only then.
fn connects_go_direct_while_the_crashed_beat_is_fresh(
    topo: &Topology,
    killed: std::time::Instant,
    count: u64,
    when: &str,
) {
    let before = topo.counters();
    for attempt in 0..count {
        assert_eq!(
            topo.pod(0).try_through_proxy(VIP),
            Ok(false),
            "connect {attempt} {when}"
        );
    }
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "too slow to prove anything (the crashed daemon's beat has aged out): {:?}",
        killed.elapsed()
    );
    assert_eq!(topo.counters().proxy_down, before.proxy_down + count);
}

#[test]
fn uninstall_leaves_nothing_behind() {
    require_kernel!();
    let _kernel = exclusive();
    let mut topo = running(1, &[]);
    topo.enroll(&topo.pod(0).netns);
    let prog_ids: Vec<u64> = attached(&topo).into_iter().map(|(_, id)| id).collect();
    // This installation's maps, by their pins (other installations on the
    // host have maps of the same names).
    let map_ids: Vec<u64> = std::fs::read_dir(topo.maps_dir())
        .expect("maps dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| {
            let pin = e.path();
            bpftool::json(&["map", "show", "pinned", path_str(&pin)])["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("no map id for {}", pin.display()))
        })
        .collect();
    // Eight rdr_ maps and aya-log's ring buffer.
    assert_eq!(map_ids.len(), 9, "{map_ids:?}");

    // uninstall while the daemon runs: it notices and exits.
    let out = topo.cli(&["uninstall"]);
    assert!(out.contains("detached 3 programs"), "{out}");
    topo.daemon().wait_exit(Duration::from_secs(5));

    let root = path_str(topo.attach_root()).to_string();
    assert!(bpftool::cgroup_program_ids(&root).is_empty());
    let tree = bpftool::text(&["cgroup", "tree", &root]);
    assert!(!tree.contains("redir_"), "{tree}");
    let left = || {
        let programs: Vec<_> = bpftool::json(&["prog", "list"])
            .as_array()
            .expect("prog list")
            .iter()
            .filter(|p| {
                p["id"].as_u64().is_some_and(|id| prog_ids.contains(&id))
                    || p["name"].as_str().is_some_and(|n| n.starts_with("redir_"))
            })
            .cloned()
            .collect();
        let maps: Vec<_> = bpftool::json(&["map", "list"])
            .as_array()
            .expect("map list")
            .iter()
            .filter_map(|m| m["id"].as_u64())
            .filter(|id| map_ids.contains(id))
            .collect();
        (programs, maps)
    };
    // The exited daemon's listeners held redir_reuseport through their
    // reuseport group, which the kernel frees after an RCU grace period,
    // not at exit: under load that took a moment (seen in CI).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (programs, maps) = loop {
        let (programs, maps) = left();
        if (programs.is_empty() && maps.is_empty()) || std::time::Instant::now() > deadline {
            break (programs, maps);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(programs.is_empty(), "programs left: {programs:?}");
    assert!(maps.is_empty(), "maps left: {maps:?}");
    assert!(!topo.pin_dir().exists(), "pin dir left behind");

    // The pod now simply goes direct, and a second uninstall is a no-op.
    assert!(!topo.pod(0).through_proxy(VIP));
    let out = topo.cli(&["uninstall"]);
    assert!(out.contains("nothing to uninstall"), "{out}");
}

/// The README's bpftool section, run as written (with this topology's pin
/// directory and cgroup), prints the enrolled cookie and named fields.
#[test]
fn readme_bpftool_commands_show_cookie_and_fields() {
    require_kernel!();
    let _kernel = exclusive();
    let topo = running(1, &[]);
    topo.enroll(&topo.pod(0).netns);
    assert_eq!(topo.pod(0).redis(&["PING"]), "PONG");
    let cookie = topo.status()["enrolled"][0]["netns_cookie"]
        .as_u64()
        .expect("enrolled cookie");

    let readme =
        std::fs::read_to_string(testbed::workspace_root().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Inspecting with bpftool"))
        .expect("README has an `## Inspecting with bpftool` section");
    let commands: Vec<&str> = section
        .lines()
        .filter_map(|l| l.trim().strip_prefix("$ "))
        .filter(|l| l.starts_with("bpftool "))
        .collect();
    assert!(
        commands.len() >= 5,
        "too few bpftool commands: {commands:?}"
    );

    let mut outputs = String::new();
    for command in &commands {
        let command = command
            .replace("/sys/fs/bpf/redirector", path_str(topo.pin_dir()))
            .replace("/sys/fs/cgroup", path_str(topo.attach_root()));
        let out = std::process::Command::new("sh")
            .args(["-c", &command])
            .output()
            .expect("run bpftool");
        assert!(out.status.success(), "`{command}` failed: {out:?}");
        outputs.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    for expected in [
        format!("\"netns_cookie\": {cookie}"),
        "\"netns_inode\"".to_string(),
        "\"steered\"".to_string(),
        "\"proxy_own\"".to_string(),
        "\"socket_mark\"".to_string(),
        format!("\"port\": {REDIS_PORT}"),
        // The port bitmap's word for the Redis port, with the port's bit.
        format!("\"value\": {}", redirector_ebpf::port_bit(REDIS_PORT)),
        "redir_connect4".to_string(),
        "redir_sockops".to_string(),
        "multi".to_string(),
    ] {
        assert!(outputs.contains(&expected), "no {expected} in:\n{outputs}");
    }
}

/// With no cgroup v2 mounted where asked, the daemon mounts it: the
/// programs then sit at the real root of the hierarchy, over every process,
/// and still only touch the enrolled namespace.
#[test]
fn mounts_cgroup2_and_attaches_at_the_real_root() {
    require_kernel!();
    let _kernel = exclusive();
    let mut topo = Topology::build(2);
    topo.start_service_cluster();
    let mount_point = topo.workdir().join("fresh-cgroup-root");
    let _unmount = testbed::cgroup::UnmountOnDrop(mount_point.clone());
    let mut args = topo.daemon_args();
    let at = args
        .iter()
        .position(|a| a == "--cgroup-root")
        .expect("flag");
    args[at + 1] = path_str(&mount_point).into();
    topo.start_daemon(args);

    let root_ino = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&mount_point).expect("mounted").ino()
    };
    assert_eq!(root_ino, 1, "cgroup v2 root has cgroup id 1");
    let status = topo.status();
    assert_eq!(status["programs"][0]["attached"]["cgroup_id"], 1);

    topo.enroll(&topo.pod(0).netns);
    assert!(topo.pod(0).through_proxy(VIP));
    assert!(!topo.pod(1).through_proxy(VIP));

    topo.daemon().stop();
    topo.cli(&["uninstall"]);
    // The kernel frees a program after its last reference goes, through
    // RCU: under load it can still be listed for a moment.
    let mut left = Vec::new();
    let released = (0..100).any(|_| {
        left = bpftool::programs_named("redir_");
        left.is_empty() || {
            std::thread::sleep(Duration::from_millis(50));
            false
        }
    });
    assert!(
        released,
        "programs still loaded 5 s after uninstall: {left:?}"
    );
}

/// A steered client is shown the cluster at the address it dialled (its
/// original destination), so a cluster-aware client keeps being steered; a
/// client that dials the proxy itself is served only from an allowed
/// source, and is shown the proxy's address. Any other unsteered client is
/// refused: steering, not reachability, decides who uses the proxy's
/// upstream credentials.
#[test]
fn only_steered_and_allowed_clients_are_served() {
    require_kernel!();
    let _kernel = exclusive();
    // Pod 1's subnet may dial the proxy; pod 2's may not.
    let topo = running(3, &["--allow-direct-from", "127.0.0.0/8,10.200.2.0/24"]);
    topo.enroll(&topo.pod(0).netns);
    let slots = |out: std::process::Output| String::from_utf8_lossy(&out.stdout).to_string();

    let steered = slots(
        topo.pod(0)
            .redis_cli(VIP, REDIS_PORT, &["CLUSTER", "SLOTS"]),
    );
    assert!(steered.contains(&SERVICE_VIP.to_string()), "{steered}");
    assert!(steered.contains(&REDIS_PORT.to_string()), "{steered}");

    let proxy: SocketAddr = testbed::topology::proxy_addr();
    let out = topo
        .pod(1)
        .redis_cli(proxy.ip(), proxy.port(), &["CLUSTER", "SLOTS"]);
    let direct = slots(out);
    assert!(direct.contains(&proxy.ip().to_string()), "{direct}");
    assert!(direct.contains(&proxy.port().to_string()), "{direct}");
    assert!(direct.contains("16383"), "{direct}");

    let rejected = |topo: &Topology| {
        testbed::http::sample(
            &topo.metrics(),
            "redirector_client_connections_rejected_total{reason=\"not_steered\"}",
        )
    };
    assert_eq!(rejected(&topo), 0.0);
    // Not enrolled, not allowed: refused, with Redis-style words, and
    // counted. The node's own address is not an allowed source either (a
    // hostNetwork pod would dial from it).
    let refused = slots(topo.pod(2).redis_cli(proxy.ip(), proxy.port(), &["PING"]));
    assert!(refused.contains("DENIED"), "{refused}");
    assert!(!refused.contains("PONG"), "{refused}");
    let from_node = topo.node_place().output(
        "timeout",
        &[
            "10",
            "redis-cli",
            "-h",
            &proxy.ip().to_string(),
            "-p",
            &proxy.port().to_string(),
            "PING",
        ],
    );
    assert!(
        String::from_utf8_lossy(&from_node.stdout).contains("DENIED"),
        "{from_node:?}"
    );
    assert_eq!(rejected(&topo), 2.0);
    // The steered pod still gets through.
    assert_eq!(topo.pod(0).redis(&["PING"]), "PONG");
}

/// Every metric the Grafana dashboard queries is one the running daemon
/// (steering on, after some traffic) really exports.
#[test]
fn dashboard_queries_name_exported_metrics() {
    require_kernel!();
    let _kernel = exclusive();
    let topo = running(1, &[]);
    let pod = topo.pod(0);
    topo.enroll(&pod.netns);
    assert_eq!(pod.redis(&["SET", "dash", "board"]), "OK");
    let scrape = topo.metrics();

    // The agent's own metrics (`redirector_k8s_*`) exist only with
    // --kubernetes: tests/k8s.rs checks the dashboard against an agent.
    let missing =
        testbed::grafana::missing_from(&scrape, |name| !name.starts_with("redirector_k8s_"));
    assert!(
        missing.is_empty(),
        "dashboard queries metrics the daemon does not export: {missing:?}\n{scrape}"
    );
    // The scrape itself passes Prometheus' own linter.
    let body = scrape
        .split_once("\r\n\r\n")
        .map_or(scrape.as_str(), |(_, b)| b);
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs Debian's prometheus)");
    {
        use std::io::Write as _;
        let mut stdin = promtool.stdin.take().expect("stdin");
        stdin.write_all(body.as_bytes()).expect("feed promtool");
    }
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // The steering panels show real figures: the pod's connects counted.
    assert!(
        testbed::http::sample(
            &scrape,
            "redirector_steering_connects_total{outcome=\"steered\"}"
        ) >= 1.0
    );
}

/// The built-in `/dashboard` page, loaded in headless Chromium against a
/// daemon under steered traffic, shows non-zero live figures. The
/// screenshot stays under `target/dashboard/` (a CI artifact).
#[test]
fn dashboard_page_renders_live_figures_in_chromium() {
    require_kernel!();
    let _kernel = exclusive();
    let browser = testbed::browser::Chromium::new();
    let topo = running(1, &[]);
    let pod = topo.pod(0);
    topo.enroll(&pod.netns);
    // Steered traffic for as long as the page is watched.
    let mut traffic = testbed::process::Child::spawn("redis-benchmark", {
        let mut cmd = pod.place().command("redis-benchmark");
        cmd.args([
            "-h",
            &VIP.to_string(),
            "-p",
            "6379",
            "-c",
            "4",
            "-n",
            "50000000",
        ])
        .args(["-r", "1000", "-t", "set,get", "-q"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        cmd
    });
    std::thread::sleep(Duration::from_secs(1));

    let out_dir = testbed::workspace_root().join("target/dashboard");
    std::fs::create_dir_all(&out_dir).expect("target/dashboard");
    let screenshot = out_dir.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    // The node namespace has no route out: Chromium reaches only the
    // daemon, whatever it tries in the background.
    let url = "http://127.0.0.1:15020/dashboard";
    let dom = browser.dom(&topo.node_place(), url);
    let shot = browser.load(
        &topo.node_place(),
        url,
        &[&format!("--screenshot={}", path_str(&screenshot))],
    );
    traffic.kill();
    assert!(
        dom.contains("data-refreshed"),
        "the page never read /metrics:\n{dom}"
    );
    // No agent on this node: its figures stay hidden.
    assert!(dom.contains("id=\"agent\" hidden"), "{dom}");
    let value = |id: &str| testbed::browser::data_value(&dom, id);
    let figures: Vec<(&str, f64)> = [
        "steered",
        "enrolled",
        "clients",
        "clients-opened",
        "commands-total",
        "p50",
        "p99",
    ]
    .iter()
    .map(|id| (*id, value(id)))
    .collect();
    println!("dashboard figures: {figures:?}");
    for (id, v) in &figures {
        assert!(*v > 0.0, "#{id} shows {v}, not a live non-zero figure");
    }
    assert!(
        std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000),
        "no screenshot: {shot:?}"
    );
}

/// `enroll --pod-uid`: a pod's namespace is found through the kubelet-style
/// cgroup its processes run in (cgroupfs driver layout), as the node agent
/// will find pods it learns of from the API.
#[test]
fn a_pod_is_enrolled_by_its_uid_through_its_cgroup() {
    require_kernel!();
    let _kernel = exclusive();
    const UID: &str = "0c9e4d52-7a1b-4f3e-9d2c-5b6a7e8f9012";
    let topo = running(1, &[]);
    let pod = topo.pod(0);
    let kubelet = testbed::topology::Kubelet::new(&topo);
    let app = kubelet.start_pod(&topo, 0, UID);

    assert!(
        !pod.through_proxy(VIP),
        "the pod is steered before it is enrolled"
    );
    let out = topo.cli(&["enroll", "--pod-uid", UID]);
    assert!(out.contains(&format!("pid {}", app.pid())), "{out}");
    assert!(
        pod.through_proxy(VIP),
        "the pod enrolled by UID is not steered"
    );

    // A pod with no process here is a clear error, not a silent no-op.
    let other = testbed::daemon::cli(
        topo.pin_dir(),
        &[
            "enroll",
            "--pod-uid",
            "11111111-2222-3333-4444-555555555555",
        ],
    );
    assert!(!other.status.success());
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("no process of pod"),
        "{other:?}"
    );
}

#[test]
fn drain_sends_new_connects_direct_and_waits_for_clients() {
    require_kernel!();
    let _kernel = exclusive();
    let topo = running(1, &[]);
    let pod = topo.pod(0);
    topo.enroll(&pod.netns);
    assert!(pod.through_proxy(VIP));
    let admin = SocketAddr::from(([127, 0, 0, 1], 15020));
    let ready = || testbed::http::get_in(&topo.node_place(), admin, "/healthz/ready");
    assert!(ready().starts_with("HTTP/1.1 200"), "{}", ready());
    let active = || testbed::http::sample(&topo.metrics(), "redirector_client_connections_active");

    // A client of the proxy that stays while the node drains: blocked in
    // BLPOP until a value arrives.
    let key = "{drain}queue";
    let blocked_out = topo.workdir().join("blpop.out");
    let mut blocked = testbed::process::Child::spawn("redis-cli BLPOP", {
        let mut cmd = pod.place().command("redis-cli");
        cmd.args([
            "-h",
            &SERVICE_VIP.to_string(),
            "-p",
            &REDIS_PORT.to_string(),
        ])
        .args(["BLPOP", key, "0"])
        .stdout(std::fs::File::create(&blocked_out).expect("BLPOP output"));
        cmd
    });
    wait_for(
        "the blocked client at the proxy",
        Duration::from_secs(5),
        || (active() >= 1.0).then_some(()),
    );

    let out = topo.workdir().join("drain.out");
    let mut drain = testbed::process::Child::spawn("redirector drain", {
        let mut cmd = topo.node_place().command(testbed::daemon::binary());
        cmd.args(["drain", "--timeout", "60s"])
            .stdout(std::fs::File::create(&out).expect("drain output"));
        cmd
    });
    wait_for(
        "readiness fails while draining",
        Duration::from_secs(5),
        || ready().starts_with("HTTP/1.1 503").then_some(()),
    );
    wait_for("new connects go direct", Duration::from_secs(5), || {
        (!pod.through_proxy(VIP)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        drain.is_running(),
        "drain returned with a client still connected: {}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );
    // The client already at the proxy is still served: its BLPOP gets the
    // value pushed to the key's master, and it leaves.
    let owner = topo
        .cluster()
        .owner_of_slot(testbed::cluster::slot_of(key.as_bytes()));
    assert_eq!(
        topo.cluster().cli(owner, &["LPUSH", key, "done"]).trim(),
        "1"
    );
    wait_for(
        "the blocked client served and gone",
        Duration::from_secs(10),
        || (!blocked.is_running()).then_some(()),
    );
    let served = std::fs::read_to_string(&blocked_out).unwrap_or_default();
    assert!(served.contains("done"), "BLPOP said {served:?}");
    wait_for(
        "drain returns once the client left",
        Duration::from_secs(10),
        || (!drain.is_running()).then_some(()),
    );
    let said = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        said.contains("drained: no client connections left"),
        "{said}"
    );
}
