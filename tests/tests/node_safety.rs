//! redirector on a shared node, on the real kernel: it leaves other eBPF
//! programs and the pods' own Redis alone, keeps no per-connection state a
//! pod's churn could pile up, cannot be opted out of by a pod, fails open
//! the moment it dies, serves only whom it should, and shares itself fairly.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use testbed::{
    bpfprog, bpftool, daemon, exclusive,
    process::{Child, path_str, wait_for},
    redis::RedisServer,
    require_kernel,
    topology::{NODE_ADDR, PROXY_PORT, Pod, REDIS_PORT, SERVICE_VIP, Topology},
};

const VIP: IpAddr = IpAddr::V4(SERVICE_VIP);

fn sockets_py() -> PathBuf {
    testbed::workspace_root().join("tests/clients/sockets.py")
}

/// `sockets.py ARGS` run by a pod process; asserts success, returns stdout.
fn pod_sockets(pod: &Pod, args: &[&str]) -> String {
    let script = sockets_py();
    let mut full = vec!["60", "/usr/bin/python3", path_str(&script)];
    full.extend_from_slice(args);
    let out = pod.place().output("timeout", &full);
    assert!(out.status.success(), "sockets.py {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(topo: &Topology, name: &str) -> f64 {
    testbed::http::sample(&topo.metrics(), name)
}

/// The first number after `word ` in `text`.
fn number_after(text: &str, word: &str) -> Option<u32> {
    let at = text.find(&format!("{word} "))? + word.len() + 1;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A `sock_ops` program of another tool at the same cgroup (here: one
/// that sets the initial receive window, as tuning agents do) keeps its
/// effect on sockets redirector steers. The kernel discards every
/// program's reply if any program returns 0, so this fails if ours does.
#[test]
fn another_sock_ops_program_keeps_its_reply_on_steered_sockets() {
    require_kernel!();
    assert!(
        testbed::require::on_path("tcpdump"),
        "tcpdump is missing: run `cargo xtask setup`"
    );
    let _kernel = exclusive();
    let topo = Topology::running(1, &[]);
    let pod = topo.pod(0);
    topo.enroll(&pod.netns);
    const SEGMENTS: u32 = 3;
    let tuner = bpfprog::attach_rwnd_init(topo.attach_root(), "test_rwnd_init", SEGMENTS)
        .expect("attach the other sock_ops program");
    let at_root = bpftool::text(&["cgroup", "show", path_str(topo.attach_root())]);
    assert!(
        at_root.contains("redir_sockops") && at_root.contains(tuner.name()),
        "{at_root}"
    );

    // The SYN of a steered connect, on the pod's wire.
    let capture = topo.workdir().join("syn.txt");
    let capture_err = topo.workdir().join("tcpdump.err");
    let mut tcpdump = Child::spawn("tcpdump", {
        let mut cmd = pod.place().command("tcpdump");
        cmd.args(["-i", "eth0", "-n", "-l", "-v", "-c", "1"])
            .arg(format!(
                "tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0 and dst port {PROXY_PORT}"
            ))
            .stdout(std::fs::File::create(&capture).expect("capture file"))
            .stderr(std::fs::File::create(&capture_err).expect("tcpdump log"));
        cmd
    });
    wait_for("tcpdump to listen", Duration::from_secs(10), || {
        std::fs::read_to_string(&capture_err)
            .unwrap_or_default()
            .contains("listening on")
            .then_some(())
    });
    assert!(pod.through_proxy(VIP), "not steered");
    let syn = wait_for("the SYN captured", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&capture).unwrap_or_default();
        text.contains("win ").then_some(text)
    });
    tcpdump.kill();
    let window = number_after(&syn, "win").expect("window in the SYN");
    let mss = number_after(&syn, "mss").expect("MSS option in the SYN");
    assert_eq!(
        window,
        SEGMENTS * mss,
        "the other program's initial window did not stand: {syn}"
    );
}

/// The wildcard target (`:6379`) covers every address, but a pod's own
/// Redis on loopback (a sidecar cache) is never a Service: it keeps talking
/// to it, also from a socket bound to 127.0.0.1 first (which a rewrite to
/// the node address would fail with EINVAL).
#[test]
fn a_pods_own_loopback_redis_is_never_steered() {
    require_kernel!();
    let _kernel = exclusive();
    let topo = Topology::running(1, &["--redis-target", ":6379"]);
    let pod = topo.pod(0);
    topo.enroll(&pod.netns);
    let dir = topo.workdir().join("sidecar");
    std::fs::create_dir_all(&dir).expect("sidecar dir");
    let sidecar = RedisServer::start(
        &pod.place(),
        &["127.0.0.1".parse().expect("ip")],
        REDIS_PORT,
        &dir,
        &[],
    );
    let loopback = IpAddr::from([127, 0, 0, 1]);

    // Four connects from the pod to its own Redis: SET, INFO, GET (the
    // sidecar's own cli runs in the pod too) and a loopback-bound PING.
    let before = topo.counters();
    let out = pod.redis_cli(loopback, REDIS_PORT, &["SET", "sidecar:key", "local"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK", "{out:?}");
    assert_eq!(pod.try_through_proxy(loopback), Ok(false));
    assert_eq!(sidecar.cli(&["GET", "sidecar:key"]).trim(), "local");
    let reply = pod_sockets(pod, &["bound", "127.0.0.1", "6379"]);
    assert!(reply.starts_with("+PONG"), "{reply}");
    let after = topo.counters();
    assert_eq!(
        after.loopback,
        before.loopback + 4,
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.steered, before.steered);
    assert_eq!(after.errors, 0);

    // The Service is still steered, and the cluster never saw the key.
    assert!(pod.through_proxy(VIP));
    assert_eq!(pod.redis(&["EXISTS", "sidecar:key"]), "0");
}

/// A pod that opens 100k connects which never establish (dropped SYNs,
/// closed at once) leaves no per-connection state behind: pending
/// destinations live in socket storage, gone with each socket. Another
/// pod's steering and advertised address are untouched, and no steered
/// connection misses its original destination.
#[test]
fn connects_that_never_establish_leave_nothing_behind() {
    require_kernel!();
    let _kernel = exclusive();
    let topo = Topology::running(2, &[]);
    let (flooder, neighbour) = (topo.pod(0), topo.pod(1));
    topo.enroll(&flooder.netns);
    topo.enroll(&neighbour.netns);
    // The flooder's SYNs to the proxy are dropped on its own side.
    let dropped = flooder.place().output(
        "iptables",
        &[
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            &PROXY_PORT.to_string(),
            "-j",
            "DROP",
        ],
    );
    assert!(dropped.status.success(), "{dropped:?}");

    const CONNECTS: u64 = 100_000;
    let before = topo.counters();
    let said = pod_sockets(
        flooder,
        &[
            "flood",
            &SERVICE_VIP.to_string(),
            "6379",
            &CONNECTS.to_string(),
        ],
    );
    assert!(said.contains("EINPROGRESS"), "{said}");
    let after = topo.counters();
    assert_eq!(
        after.steered,
        before.steered + CONNECTS,
        "every connect was steered (and stored its destination)"
    );
    assert_eq!(after.errors, before.errors);
    assert_eq!(topo.status()["awaiting_accept"], 0);
    let orig_dst = bpftool::json(&[
        "map",
        "dump",
        "pinned",
        path_str(&topo.maps_dir().join("rdr_orig_dst")),
    ]);
    assert_eq!(orig_dst, serde_json::json!([]), "rdr_orig_dst");
    let sockets = flooder.place().output("ss", &["-Htan"]);
    assert_eq!(
        String::from_utf8_lossy(&sockets.stdout).trim(),
        "",
        "sockets left in the flooder"
    );

    // The neighbour is steered and shown the address it dialled.
    let slots = neighbour.redis_cli(VIP, REDIS_PORT, &["CLUSTER", "SLOTS"]);
    let slots = String::from_utf8_lossy(&slots.stdout);
    assert!(slots.contains(&SERVICE_VIP.to_string()), "{slots}");
    assert!(!slots.contains(&NODE_ADDR.to_string()), "{slots}");
    assert_eq!(
        metric(
            &topo,
            "redirector_client_connections_rejected_total{reason=\"not_steered\"}"
        ),
        0.0,
        "a steered connection missed its original destination"
    );
}

/// The proxy's socket mark exempts only the proxy's own sockets: a pod
/// process holding nothing but CAP_NET_RAW (which container runtimes grant
/// by default) can set it, and is steered all the same. The proxy's own
/// upstream connects, marked in its own namespace, never are (see also
/// steering.rs, `proxy_own_connects_are_never_steered`).
#[test]
fn a_pod_cannot_opt_out_by_setting_the_proxys_mark() {
    require_kernel!();
    let _kernel = exclusive();
    let topo = Topology::running(1, &[]);
    let pod = topo.pod(0);
    topo.enroll(&pod.netns);
    let mark = format!(
        "{:#x}",
        topo.status()["proxy"]["socket_mark"]
            .as_u64()
            .expect("mark")
    );

    let before = topo.counters();
    let script = sockets_py();
    let out = pod.place().output(
        "setpriv",
        &[
            "--bounding-set=-all,+net_raw",
            "--inh-caps=-all,+net_raw",
            "--ambient-caps=-all,+net_raw",
            "--",
            "timeout",
            "20",
            "/usr/bin/python3",
            path_str(&script),
            "marked",
            &SERVICE_VIP.to_string(),
            "6379",
            &mark,
        ],
    );
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        reply.contains("redirector_version"),
        "the marked pod socket was not steered: {reply}"
    );
    let after = topo.counters();
    assert_eq!(after.steered, before.steered + 1, "{before:?} -> {after:?}");
    assert_eq!(after.foreign_mark, before.foreign_mark + 1);
    // The proxy's own connects (discovery, pools) were recognised by mark
    // and namespace.
    assert!(after.proxy_own > 0, "{after:?}");
}

/// One pod holding its quota of idle connections does not stop another
/// pod's clients: quotas are per pod (network namespace), under the
/// node-wide limit.
#[test]
fn a_pod_at_its_quota_does_not_stop_another_pods_clients() {
    require_kernel!();
    let _kernel = exclusive();
    const QUOTA: usize = 20;
    let topo = Topology::running(2, &["--max-clients-per-pod", "20", "--max-clients", "100"]);
    let (greedy, other) = (topo.pod(0), topo.pod(1));
    topo.enroll(&greedy.netns);
    topo.enroll(&other.netns);

    let script = sockets_py();
    let held_out = topo.workdir().join("held.txt");
    let mut holder = Child::spawn("idle connections", {
        let mut cmd = greedy.place().command("/usr/bin/python3");
        cmd.arg(&script)
            .args(["hold", &SERVICE_VIP.to_string(), "6379"])
            .arg((QUOTA + 5).to_string())
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&held_out).expect("holder output"));
        cmd
    });
    let said = wait_for(
        "the greedy pod's connections",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&held_out).unwrap_or_default();
            text.contains("held").then_some(text)
        },
    );
    assert_eq!(said.trim(), format!("held {QUOTA} refused 5"));
    assert_eq!(
        metric(
            &topo,
            "redirector_client_connections_rejected_total{reason=\"pod_quota\"}"
        ),
        5.0
    );
    // The greedy pod is refused with Redis's words; the other pod is served.
    let refused = greedy.redis_cli(VIP, REDIS_PORT, &["PING"]);
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("max number of clients reached"),
        "{refused:?}"
    );
    for i in 0..10 {
        assert_eq!(other.redis(&["SET", &format!("other:{i}"), "v"]), "OK");
    }
    holder.kill();
}

/// A connect4 program attached before ours (as Cilium's socket load
/// balancer is when Cilium starts first) runs first and may rewrite a
/// Service address before our target match: `status` and start-up name it.
#[test]
fn status_names_connect_programs_that_run_before_ours() {
    require_kernel!();
    let _kernel = exclusive();
    let mut topo = Topology::build(1);
    topo.start_service_cluster();
    let early = bpfprog::attach_passthrough_connect4(topo.attach_root(), "cil_sock4_conn")
        .expect("attach the other connect4 program");
    topo.start_daemon(topo.daemon_args());
    let warned = topo.daemon().log();
    assert!(
        warned.contains("a program attached before redirector's runs first")
            && warned.contains(early.name()),
        "{warned}"
    );
    let status = topo.status();
    let ahead = status["programs_ahead"].as_array().expect("programs_ahead");
    assert_eq!(ahead.len(), 1, "{status}");
    assert_eq!(ahead[0]["name"], early.name());
    assert_eq!(ahead[0]["hook"], "cgroup_inet4_connect");
    let text = topo.cli(&["status"]);
    assert!(
        text.contains("WARNING") && text.contains(early.name()),
        "{text}"
    );
    // Attached after ours, it would run after ours: nothing to report.
    drop(early);
    let late = bpfprog::attach_passthrough_connect4(topo.attach_root(), "late_connect4")
        .expect("attach after ours");
    assert_eq!(topo.status()["programs_ahead"], serde_json::json!([]));
    drop(late);
}

/// Readiness means "programs attached, listener up": with no Redis
/// answering, the daemon is ready (a Redis outage must not stall a rolling
/// upgrade), reports the backend down, and steers nothing (so enrolled pods
/// go direct) until the backend answers.
#[test]
fn readiness_does_not_wait_for_redis() {
    require_kernel!();
    let _kernel = exclusive();
    let mut topo = Topology::build(1);
    let args = topo.daemon_args();
    topo.start_daemon_until(args, "info", daemon::LISTENING);
    topo.enroll(&topo.pod(0).netns);
    let admin = SocketAddr::from(([127, 0, 0, 1], 15020));
    let ready = testbed::http::get_in(&topo.node_place(), admin, "/healthz/ready");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert_eq!(metric(&topo, "redirector_backend_up"), 0.0);
    // `status` from the node, where the daemon's admin endpoint is.
    let status = topo.node_cli(&["status"]);
    assert!(status.contains("daemon: ready, backend DOWN"), "{status}");
    assert!(status.contains("NOT steering"), "{status}");

    // The cluster comes up: the backend is found, steering starts.
    topo.start_service_cluster();
    wait_for("the backend discovered", Duration::from_secs(20), || {
        topo.daemon()
            .log()
            .contains("redirector ready")
            .then_some(())
    });
    assert_eq!(metric(&topo, "redirector_backend_up"), 1.0);
    assert!(topo.pod(0).through_proxy(VIP));
}

/// An installation whose maps have another layout (an older release's
/// pins, straight in the pin directory) does not stall the upgrade: the
/// new daemon builds its own set, carries the enrollments over, and
/// removes the old pins.
#[test]
fn an_upgrade_across_a_map_layout_change_recreates_the_pins() {
    require_kernel!();
    let _kernel = exclusive();
    let mut topo = Topology::build(1);
    topo.start_service_cluster();
    let cookie: u64 = pod_sockets(topo.pod(0), &["cookie"])
        .trim()
        .parse()
        .expect("cookie");

    // Layout v1: maps in the pin directory itself, rdr_proxy 48 bytes.
    std::fs::create_dir_all(topo.pin_dir()).expect("pin dir");
    let pin_dir = topo.pin_dir().to_path_buf();
    let pin = |name: &str| pin_dir.join(name);
    let create = |name: &str, kind: &str, key: &str, value: &str, entries: &str| {
        bpftool::text(&[
            "map",
            "create",
            path_str(&pin(name)),
            "type",
            kind,
            "key",
            key,
            "value",
            value,
            "entries",
            entries,
            "name",
            name,
        ]);
    };
    create("rdr_enrolled", "hash", "8", "16", "16384");
    create("rdr_proxy", "array", "4", "48", "1");
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>();
    let mut update = vec!["map", "update", "pinned"];
    let enrolled_pin = pin("rdr_enrolled");
    update.push(path_str(&enrolled_pin));
    let key = hex(&cookie.to_le_bytes());
    let value = hex(&[0u8; 16]);
    update.push("key");
    update.push("hex");
    update.extend(key.iter().map(String::as_str));
    update.push("value");
    update.push("hex");
    update.extend(value.iter().map(String::as_str));
    bpftool::text(&update);

    topo.start_daemon(topo.daemon_args());
    let log = topo.daemon().log();
    assert!(
        log.contains("carried over from an older map layout"),
        "{log}"
    );
    assert!(
        log.contains("removed the map pins of an older layout"),
        "{log}"
    );
    assert!(!pin("rdr_enrolled").exists() && !pin("rdr_proxy").exists());
    assert!(topo.maps_dir().join("rdr_enrolled").exists());
    // Enrolled under the old layout, steered under the new one.
    assert_eq!(topo.status()["enrolled"][0]["netns_cookie"], cookie);
    assert!(topo.pod(0).through_proxy(VIP));
}

/// Istio ambient captures a pod's outbound TCP in the pod itself: istio-cni
/// writes iptables rules that send every connect not to loopback, unless it
/// carries ztunnel's own mark (0x539 under 0xfff), to ztunnel on port 15001.
/// Those rules see a steered connect's new destination, the node proxy, so
/// ztunnel would dial the proxy from a socket of its own, for which the
/// kernel recorded no original destination: refused. With
/// `--steered-socket-mark 0x539/0xfff` (the ambient overlay) the steered
/// socket carries ztunnel's mark: Redis goes to the node proxy, everything
/// else to ztunnel as before.
#[test]
fn ambient_capture_leaves_steered_connects_to_the_node_proxy() {
    use std::{
        io::Write as _,
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    };
    require_kernel!();
    let _kernel = exclusive();
    let mut topo = Topology::build(1);
    topo.start_service_cluster();
    let pod = topo.pod(0);
    // istio-cni's in-pod capture (its nat OUTPUT rule).
    let captured = pod.place().output(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "!",
            "-d",
            "127.0.0.1/32",
            "-p",
            "tcp",
            "-m",
            "mark",
            "!",
            "--mark",
            "0x539/0xfff",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
    );
    assert!(captured.status.success(), "{captured:?}");
    // A stand-in ztunnel: answers every connection it catches.
    let ztunnel = pod
        .place()
        .listen(SocketAddr::from(([0, 0, 0, 0], 15001)))
        .expect("ztunnel's port");
    ztunnel.set_nonblocking(true).expect("nonblocking");
    let (caught, stop) = (AtomicUsize::new(0), AtomicBool::new(false));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                match ztunnel.accept() {
                    Ok((mut stream, _)) => {
                        caught.fetch_add(1, Ordering::Relaxed);
                        let _ = stream.write_all(b"-ERR caught by ztunnel\r\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let ping = |topo: &Topology| {
                let out = topo.pod(0).redis_cli(VIP, REDIS_PORT, &["PING"]);
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            };
            // Without the mark: steered by us, then caught by ztunnel.
            let args = topo.daemon_args();
            topo.start_daemon(args.clone());
            topo.enroll(&topo.pod(0).netns);
            assert_eq!(ping(&topo), "ERR caught by ztunnel");
            assert_eq!(caught.load(Ordering::Relaxed), 1);
            assert_eq!(topo.counters().steered, 1);
            topo.daemon().stop();
            topo.daemon = None;

            // With ztunnel's mark on steered sockets: Redis reaches the node
            // proxy, which knows where the pod meant to go.
            let mut marked = args;
            marked.extend(["--steered-socket-mark".into(), "0x539/0xfff".into()]);
            topo.start_daemon(marked);
            assert_eq!(ping(&topo), "PONG");
            assert!(topo.pod(0).through_proxy(VIP));
            let slots = topo
                .pod(0)
                .redis_cli(VIP, REDIS_PORT, &["CLUSTER", "SLOTS"]);
            assert!(
                String::from_utf8_lossy(&slots.stdout).contains(&SERVICE_VIP.to_string()),
                "{slots:?}"
            );
            assert_eq!(
                caught.load(Ordering::Relaxed),
                1,
                "a steered connect was captured"
            );
            // Everything else is still ztunnel's.
            let other = topo.pod(0).redis_cli(VIP, 8080, &["PING"]);
            assert_eq!(
                String::from_utf8_lossy(&other.stdout).trim(),
                "ERR caught by ztunnel"
            );
            assert_eq!(caught.load(Ordering::Relaxed), 2);
        }));
        stop.store(true, Ordering::Relaxed);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
}
