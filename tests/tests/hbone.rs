//! HBONE between two "nodes" (network namespaces joined by a veth pair),
//! each running a redirector, with one real Redis Cluster spread over both:
//! the proxy on node A reaches node B's shards only through B's 15008
//! listener, over mTLS HTTP/2 CONNECT, and B refuses what it must refuse.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use testbed::{
    TempDir,
    cluster::{RedisCluster, key_in_slot},
    daemon::{self, Daemon},
    exclusive,
    netns::Netns,
    process::{Place, path_str, wait_for},
    require_kernel,
    resp::RespClient,
    topology::{REDIS_PORT, SERVICE_VIP, Topology},
    two_nodes::{NODE_A, NODE_B, NODE_IDENTITY, addr, certs, link_nodes, mint_node_certs},
    unique,
};

const PROXY_PORT: u16 = 7379;
const ADMIN_PORT: u16 = 15020;

/// `redirector run` arguments for a node at `ip`: proxy only (no
/// steering; the tests dial it from the node itself, an allowed direct
/// source), discovering the cluster from `ip:seed`, admin and HBONE
/// listeners on `ip`, then `extra`.
fn node_args(ip: &str, seed: u16, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--steering",
        "off",
        "--allow-direct-from",
        ip,
        "--proxy-addr",
        &format!("{ip}:{PROXY_PORT}"),
        "--cluster-seed",
        &format!("{ip}:{seed}"),
        "--admin-addr",
        &format!("{ip}:{ADMIN_PORT}"),
        "--hbone-listen",
        &format!("{ip}:15008"),
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    args.extend(extra.iter().map(ToString::to_string));
    args
}

/// Established TCP connections in `place`'s namespace: (local, peer).
fn established(place: &Place) -> Vec<(SocketAddr, SocketAddr)> {
    let out = place.output("ss", &["-Htn", "state", "established"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(fields.len().checked_sub(2)?)?.parse().ok()?;
            let peer = fields.last()?.parse().ok()?;
            Some((local, peer))
        })
        .collect()
}

/// Two node namespaces, a 3-master cluster (one master on A, two on B),
/// certificates from one CA, and a redirector on each node. A dials B's
/// shards through tunnels; B accepts tunnels from namespace `redirector`
/// only.
struct TwoNodes {
    // Field order is drop order: daemons, then Redis, then namespaces.
    _daemon_a: Daemon,
    daemon_b: Daemon,
    cluster: RedisCluster,
    a: Netns,
    b: Netns,
    dir: TempDir,
}

impl TwoNodes {
    fn start() -> Self {
        let dir = TempDir::new("rdr-hbone");
        let a = Netns::create(&unique("rdr-na"));
        let b = Netns::create(&unique("rdr-nb"));
        link_nodes(&a, &b);

        let nodes = [
            (a.place(), addr(NODE_A, 7001)),
            (b.place(), addr(NODE_B, 7002)),
            (b.place(), addr(NODE_B, 7003)),
        ];
        let cluster = RedisCluster::start_across(&a.place(), &nodes, 0, dir.path());

        mint_node_certs(dir.path());
        let pins = dir.path().join("pins");
        let daemon_b = Daemon::start(
            &b.place(),
            &pins,
            node_args(
                NODE_B,
                7002,
                &[
                    "--hbone-certs",
                    path_str(&dir.path().join("b")),
                    "--hbone-allow-namespace",
                    "redirector",
                ],
            ),
            vec![],
            dir.path().join("b.log"),
        );
        let daemon_a = Daemon::start(
            &a.place(),
            &pins,
            node_args(
                NODE_A,
                7001,
                &[
                    "--hbone-certs",
                    path_str(&dir.path().join("a")),
                    "--mesh-endpoints",
                    &format!("{NODE_B}/32"),
                ],
            ),
            vec![],
            dir.path().join("a.log"),
        );
        Self {
            _daemon_a: daemon_a,
            daemon_b,
            cluster,
            a,
            b,
            dir,
        }
    }

    fn certs_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `redirector tunnel-check` run in node A's namespace.
    fn tunnel_check(&self, certs: &Path, args: &[&str]) -> Output {
        let mut cmd = self.a.place().command(daemon::binary());
        cmd.arg("tunnel-check")
            .arg("--hbone-certs")
            .arg(certs)
            .args(args);
        cmd.output().expect("run redirector tunnel-check")
    }

    fn metrics_b(&self) -> String {
        testbed::http::get_in(&self.b.place(), addr(NODE_B, ADMIN_PORT), "/metrics")
    }
}

fn metric(text: &str, sample: &str) -> f64 {
    testbed::http::sample(text, sample)
}

/// Keys whose slots node B's masters own.
fn keys_on_b(cluster: &RedisCluster, count: usize) -> Vec<String> {
    let b_masters: Vec<SocketAddr> = cluster
        .masters()
        .into_iter()
        .filter(|m| m.ip().to_string() == NODE_B)
        .collect();
    assert_eq!(b_masters.len(), 2, "node B runs two masters");
    // A coarse stride over all slots, so both of B's masters get keys.
    let keys: Vec<String> = (0..16384u16)
        .step_by(211)
        .filter(|slot| b_masters.contains(&cluster.owner_of_slot(*slot)))
        .take(count)
        .map(key_in_slot)
        .collect();
    assert_eq!(keys.len(), count, "slots on node B");
    keys
}

#[test]
fn shards_on_another_node_are_reached_only_through_the_tunnel() {
    require_kernel!();
    let _kernel = exclusive();
    let nodes = TwoNodes::start();
    let keys = keys_on_b(&nodes.cluster, 40);
    let proxy = addr(NODE_A, PROXY_PORT);

    let mut client = RespClient::connect_in(&nodes.a.place(), proxy).expect("connect to A's proxy");
    for (i, key) in keys.iter().enumerate() {
        let reply = client
            .call_str(&["SET", key, &format!("v{i}")])
            .expect("SET");
        assert_eq!(reply, "+OK\r\n", "SET {key} through A");
    }
    for (i, key) in keys.iter().enumerate() {
        let value = format!("v{i}");
        let reply = client.call_str(&["GET", key]).expect("GET");
        assert_eq!(
            reply,
            format!("${}\r\n{value}\r\n", value.len()),
            "GET {key} through A"
        );
    }
    // Read back on B itself: the writes landed on B's shards.
    for (i, key) in keys.iter().enumerate().take(5) {
        let owner = nodes
            .cluster
            .owner_of_slot(testbed::cluster::slot_of(key.as_bytes()));
        assert_eq!(owner.ip().to_string(), NODE_B);
        assert_eq!(
            nodes.cluster.cli(owner, &["GET", key]).trim(),
            format!("v{i}")
        );
    }

    // On B: the proxy's traffic arrives on 15008 from A, and nothing from A
    // reaches B's Redis client ports directly (the cluster bus, port+10000,
    // is Redis' own and not proxied).
    let connections = established(&nodes.b.place());
    let from_a = |(local, peer): &&(SocketAddr, SocketAddr)| {
        peer.ip().to_string() == NODE_A && local.ip().to_string() == NODE_B
    };
    let tunnels: Vec<_> = connections
        .iter()
        .filter(from_a)
        .filter(|(l, _)| l.port() == 15008)
        .collect();
    let direct: Vec<_> = connections
        .iter()
        .filter(from_a)
        .filter(|(l, _)| [7002, 7003].contains(&l.port()))
        .collect();
    println!("B's connections from A: tunnels {tunnels:?}, direct to Redis {direct:?}");
    assert_eq!(
        tunnels.len(),
        1,
        "one TLS connection carries A's streams to B"
    );
    assert!(
        direct.is_empty(),
        "A reached B's Redis ports directly: {direct:?}"
    );

    let metrics = nodes.metrics_b();
    let opened = metric(
        &metrics,
        "redirector_hbone_tunnels_opened_total{direction=\"inbound\"}",
    );
    let ok = metric(
        &metrics,
        "redirector_hbone_connect_responses_total{status=\"200\"}",
    );
    let bytes_in = metric(&metrics, "redirector_hbone_received_bytes_total");
    println!("B: tunnels opened {opened}, CONNECT 200s {ok}, bytes received {bytes_in}");
    assert!(opened >= 1.0 && ok >= 2.0, "B's tunnel metrics: {metrics}");
    // 40 SETs with their keys and values crossed as stream bytes.
    assert!(
        bytes_in > 40.0 * 20.0,
        "bytes received through tunnels: {bytes_in}"
    );
    // The TLS really is TLS: a plaintext HTTP/2 preface is refused.
    let mut plain =
        testbed::http::connect_in(&nodes.a.place(), addr(NODE_B, 15008)).expect("connect 15008");
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .expect("send preface");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    // An HTTP/2 server would answer with a SETTINGS frame (type 4 at byte 3).
    assert!(
        answer.get(3) != Some(&4) || answer.first() == Some(&0x15),
        "plaintext HTTP/2 got an HTTP/2 answer: {answer:x?}"
    );
    wait_for(
        "B to count the plaintext attempt",
        Duration::from_secs(5),
        || {
            let failures = metric(
                &nodes.metrics_b(),
                "redirector_hbone_tls_handshake_failures_total{reason=\"not_tls\"}",
            );
            (failures >= 1.0).then_some(())
        },
    );
}

#[test]
fn many_clients_share_a_handful_of_tls_connections() {
    require_kernel!();
    let _kernel = exclusive();
    let nodes = TwoNodes::start();
    let keys = keys_on_b(&nodes.cluster, 20);
    let proxy = addr(NODE_A, PROXY_PORT);
    // 500 client connections open at once, each with a command in flight to
    // one of B's shards.
    let mut clients: Vec<RespClient> = (0..500)
        .map(|_| RespClient::connect_in(&nodes.a.place(), proxy).expect("connect to A's proxy"))
        .collect();
    for (i, client) in clients.iter_mut().enumerate() {
        let key = &keys[i % keys.len()];
        client.send(&[b"INCR", key.as_bytes()]).expect("send INCR");
    }
    for client in &mut clients {
        client.read_reply().expect("INCR reply");
    }
    let total: i64 = keys
        .iter()
        .map(|k| {
            let owner = nodes
                .cluster
                .owner_of_slot(testbed::cluster::slot_of(k.as_bytes()));
            nodes
                .cluster
                .cli(owner, &["GET", k])
                .trim()
                .parse::<i64>()
                .expect("counter")
        })
        .sum();
    assert_eq!(total, 500, "every INCR landed once");
    let tls = established(&nodes.b.place())
        .iter()
        .filter(|(l, p)| l.port() == 15008 && p.ip().to_string() == NODE_A)
        .count();
    println!("500 clients through A: {tls} TLS connection(s) to B");
    // The proxy multiplexes all clients onto one shared upstream connection
    // per shard (two streams here), and the pool puts every stream to one
    // peer on one h2 connection: exactly one, and never one per client.
    assert_eq!(tls, 1, "TLS connections from A to B for 500 clients");
    drop(clients);
}

#[test]
fn the_listener_refuses_what_it_must() {
    require_kernel!();
    let _kernel = exclusive();
    let nodes = TwoNodes::start();
    let own = nodes.certs_dir("a");
    let ca = nodes.certs_dir("ca");
    let check = |certs: &Path, args: &[&str]| {
        let out = nodes.tunnel_check(certs, args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };

    // Accepted: a PING crosses and PONG comes back.
    let (ok, text) = check(
        &own,
        &[
            "--send",
            "*1\\r\\n$4\\r\\nPING\\r\\n",
            &format!("{NODE_B}:7002"),
        ],
    );
    assert!(ok && text.contains("+PONG"), "{text}");

    // 400: an address that is not B's own, asked of B.
    let (ok, text) = check(
        &own,
        &["--via", &format!("{NODE_B}:15008"), "10.77.0.9:7002"],
    );
    assert!(!ok && text.contains("400"), "{text}");
    // 503: B's address, but nothing listens there.
    let (ok, text) = check(&own, &[&format!("{NODE_B}:7999")]);
    assert!(!ok && text.contains("503"), "{text}");

    // 401: the right CA, a namespace B does not allow.
    let intruder = nodes.certs_dir("intruder");
    certs(&[
        "issue",
        "--ca",
        path_str(&ca),
        "--identity",
        "spiffe://cluster.local/ns/intruder/sa/app",
        "--out",
        path_str(&intruder),
    ]);
    let (ok, text) = check(
        &intruder,
        &[
            "--hbone-peer-identity",
            NODE_IDENTITY,
            &format!("{NODE_B}:7002"),
        ],
    );
    assert!(!ok && text.contains("401"), "{text}");

    // Another CA: the client trusts B (both CAs in its bundle), B does not
    // trust the client, and says why in its metrics.
    let other_ca = nodes.certs_dir("other-ca");
    let other = nodes.certs_dir("other");
    certs(&["ca", "--dir", path_str(&other_ca)]);
    certs(&[
        "issue",
        "--ca",
        path_str(&other_ca),
        "--identity",
        NODE_IDENTITY,
        "--out",
        path_str(&other),
    ]);
    let mut bundle = std::fs::read_to_string(other.join("ca.pem")).expect("bundle");
    bundle.push_str(&std::fs::read_to_string(ca.join("ca.pem")).expect("ca"));
    std::fs::write(other.join("ca.pem"), bundle).expect("write bundle");
    let (ok, text) = check(&other, &[&format!("{NODE_B}:7002")]);
    assert!(!ok, "a certificate from another CA was accepted: {text}");
    let metrics = nodes.metrics_b();
    assert!(
        metric(
            &metrics,
            "redirector_hbone_tls_handshake_failures_total{reason=\"unknown_ca\"}"
        ) >= 1.0,
        "B did not count the foreign CA: {metrics}"
    );
    for (status, at_least) in [("200", 1.0), ("400", 1.0), ("401", 1.0), ("503", 1.0)] {
        let seen = metric(
            &metrics,
            &format!("redirector_hbone_connect_responses_total{{status=\"{status}\"}}"),
        );
        assert!(seen >= at_least, "CONNECT {status} answers: {seen}");
    }
}

/// Writes and reads B's keys through A's proxy from a thread until told to
/// stop; records when each operation failed.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<TrafficReport>>,
}

#[derive(Debug, Default)]
struct TrafficReport {
    ok: u64,
    /// When each failed operation ended, and why.
    errors: Vec<(std::time::Instant, String)>,
    last_ok: Option<std::time::Instant>,
    /// The longest time between two successful operations: how long
    /// clients went without service.
    longest_stall: Duration,
    /// Keys written (value = key), to read back afterwards.
    written: Vec<String>,
}

impl Traffic {
    fn start(place: Place, proxy: SocketAddr, keys: Vec<String>) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut report = TrafficReport::default();
            let mut client: Option<RespClient> = None;
            let mut i = 0usize;
            while !flag.load(Ordering::Relaxed) {
                // The hash tag keeps each key in its base key's slot (on B).
                let key = format!("{{{}}}:{i}", keys[i % keys.len()]);
                i += 1;
                let result = (|| -> Result<(), String> {
                    if client.is_none() {
                        client =
                            Some(RespClient::connect_in(&place, proxy).map_err(|e| e.to_string())?);
                    }
                    let c = client.as_mut().expect("connected");
                    let set = c
                        .call_str(&["SET", &key, &key])
                        .map_err(|e| e.to_string())?;
                    if set != "+OK\r\n" {
                        return Err(format!("SET {key}: {set:?}"));
                    }
                    let got = c.call_str(&["GET", &key]).map_err(|e| e.to_string())?;
                    if got != format!("${}\r\n{key}\r\n", key.len()) {
                        return Err(format!("GET {key}: {got:?}"));
                    }
                    Ok(())
                })();
                match result {
                    Ok(()) => {
                        report.ok += 1;
                        let now = std::time::Instant::now();
                        if let Some(previous) = report.last_ok {
                            report.longest_stall = report.longest_stall.max(now - previous);
                        }
                        report.last_ok = Some(now);
                        report.written.push(key);
                    }
                    Err(e) => {
                        // A client whose connection broke reconnects, as apps do.
                        client = None;
                        report.errors.push((std::time::Instant::now(), e));
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            report
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the traffic and returns what it saw.
    fn finish(mut self) -> TrafficReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .take()
            .expect("running")
            .join()
            .expect("traffic thread")
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The serial number of the certificate B serves on 15008, read with
/// openssl's TLS client (presenting A's certificate, as B requires).
fn served_serial(nodes: &TwoNodes) -> String {
    let a = nodes.certs_dir("a");
    let out = nodes.a.place().output(
        "sh",
        &[
            "-c",
            &format!(
                "openssl s_client -connect {NODE_B}:15008 -alpn h2 -cert {cert} -key {key} \
                 -CAfile {ca} </dev/null 2>/dev/null | openssl x509 -noout -serial",
                cert = path_str(&a.join("cert.pem")),
                key = path_str(&a.join("key.pem")),
                ca = path_str(&a.join("ca.pem")),
            ),
        ],
    );
    let serial = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        serial.starts_with("serial="),
        "openssl read no certificate from B: {out:?}"
    );
    serial
}

fn file_serial(cert: &Path) -> String {
    let out = Place::default().output(
        "openssl",
        &["x509", "-noout", "-serial", "-in", path_str(cert)],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn certificate_rotation_needs_no_restart_and_drops_no_stream() {
    require_kernel!();
    let _kernel = exclusive();
    let nodes = TwoNodes::start();
    let b_certs = nodes.certs_dir("b");
    let before = file_serial(&b_certs.join("cert.pem"));
    assert_eq!(served_serial(&nodes), before, "B serves its certificate");

    let traffic = Traffic::start(
        nodes.a.place(),
        addr(NODE_A, PROXY_PORT),
        keys_on_b(&nodes.cluster, 10),
    );
    std::thread::sleep(Duration::from_millis(500));
    let tunnels_before = metric(
        &nodes.metrics_b(),
        "redirector_hbone_tunnels_opened_total{direction=\"inbound\"}",
    );
    // Rotate: a new certificate for the same identity, from the same CA.
    certs(&[
        "issue",
        "--ca",
        path_str(&nodes.certs_dir("ca")),
        "--identity",
        NODE_IDENTITY,
        "--out",
        path_str(&b_certs),
    ]);
    let after = file_serial(&b_certs.join("cert.pem"));
    assert_ne!(before, after, "the rotation issued a new certificate");
    wait_for(
        "B to serve the new certificate",
        Duration::from_secs(10),
        || (served_serial(&nodes) == after).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(500));
    let report = traffic.finish();
    let tunnels_after = metric(
        &nodes.metrics_b(),
        "redirector_hbone_tunnels_opened_total{direction=\"inbound\"}",
    );
    println!(
        "rotation: {} operations ok, {} errors; B's inbound tunnels opened {tunnels_before} -> {tunnels_after} \
         (the openssl probes count as TLS handshakes, not tunnels)",
        report.ok,
        report.errors.len()
    );
    assert!(
        report.errors.is_empty(),
        "errors during rotation: {:?}",
        report.errors
    );
    assert!(
        report.ok > 20,
        "traffic ran through the rotation: {}",
        report.ok
    );
    // The proxy's tunnel from before the rotation carried on: no new one.
    assert_eq!(
        tunnels_before, tunnels_after,
        "the existing tunnel was replaced"
    );
    // New tunnels are made with the new certificate and still admitted.
    let out = nodes.tunnel_check(
        &nodes.certs_dir("a"),
        &[
            "--send",
            "*1\\r\\n$4\\r\\nPING\\r\\n",
            &format!("{NODE_B}:7002"),
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("+PONG"),
        "a new tunnel after rotation: {out:?}"
    );
}

#[test]
fn a_peer_restart_is_recovered_without_help() {
    require_kernel!();
    let _kernel = exclusive();
    let mut nodes = TwoNodes::start();
    let traffic = Traffic::start(
        nodes.a.place(),
        addr(NODE_A, PROXY_PORT),
        keys_on_b(&nodes.cluster, 10),
    );
    std::thread::sleep(Duration::from_secs(1));
    let killed = std::time::Instant::now();
    nodes.daemon_b.kill();
    std::thread::sleep(Duration::from_secs(1));
    nodes.daemon_b.start_again();
    let restarted = std::time::Instant::now();
    // Recovered: operations succeed again, through a new tunnel.
    std::thread::sleep(Duration::from_secs(3));
    let report = traffic.finish();
    let down = restarted - killed;
    println!(
        "B killed and restarted after {down:?}: {} operations ok, {} errors, clients went at most {:?} \
         without a reply; errors: {:?}",
        report.ok,
        report.errors.len(),
        report.longest_stall,
        report
            .errors
            .iter()
            .take(3)
            .map(|(_, e)| e)
            .collect::<Vec<_>>()
    );
    let last_ok = report.last_ok.expect("some operations succeeded");
    assert!(
        report.errors.last().is_none_or(|(at, _)| last_ok > *at),
        "operations still failing at the end: {:?}",
        report.errors.last()
    );
    // Service came back within 3 s of B's return, with no help.
    assert!(
        report.longest_stall < down + Duration::from_secs(3),
        "clients waited {:?} for B (down {down:?})",
        report.longest_stall
    );
    // Only commands in flight at the kill may fail (their outcome is unknown).
    assert!(report.errors.len() <= 5, "errors: {:?}", report.errors);
    // Nothing acknowledged was lost: every key written reads back on B.
    for key in report.written.iter().rev().take(50) {
        let owner = nodes
            .cluster
            .owner_of_slot(testbed::cluster::slot_of(key.as_bytes()));
        assert_eq!(
            nodes.cluster.cli(owner, &["GET", key]).trim(),
            key.as_str(),
            "{key}"
        );
    }
    let opened = metric(
        &nodes.metrics_b(),
        "redirector_hbone_tunnels_opened_total{direction=\"inbound\"}",
    );
    assert!(opened >= 1.0, "the restarted B took a new tunnel: {opened}");
}

/// A steered pod on node A (the eBPF path of the foundation), a cluster
/// whose service address is on A and whose other two masters are on B.
/// The pod has no route to B at all: keys on B's shards can only come back
/// through A's proxy and the tunnel.
#[test]
fn a_steered_pod_reaches_shards_on_another_node_through_the_tunnel() {
    require_kernel!();
    let _kernel = exclusive();
    // Drop order: B's daemon, the cluster, B's namespace, then node A's
    // topology (its daemon, pods, cgroups, namespace).
    struct Rig {
        _daemon_b: Daemon,
        cluster: RedisCluster,
        b: Netns,
        topo: Topology,
        _dir: TempDir,
    }
    let dir = TempDir::new("rdr-hbone-pod");
    let mut topo = Topology::build(1);
    let b = Netns::create(&unique("rdr-nb"));
    link_nodes(&topo.node, &b);
    // The cluster bus: B's nodes reach the service node on A's loopback.
    b.ip(&["route", "add", "10.96.0.0/16", "via", NODE_A]);
    let service = SocketAddr::new(SERVICE_VIP.into(), REDIS_PORT);
    let nodes = [
        (topo.node_place(), service),
        (b.place(), addr(NODE_B, 7002)),
        (b.place(), addr(NODE_B, 7003)),
    ];
    let cluster = RedisCluster::start_across(&topo.node_place(), &nodes, 0, dir.path());
    mint_node_certs(dir.path());
    let daemon_b = Daemon::start(
        &b.place(),
        &dir.path().join("pins-b"),
        node_args(
            NODE_B,
            7002,
            &["--hbone-certs", path_str(&dir.path().join("b"))],
        ),
        vec![],
        dir.path().join("b.log"),
    );
    let mut args = topo.daemon_args();
    args.extend(
        [
            "--hbone-listen",
            &format!("{NODE_A}:15008"),
            "--hbone-certs",
            path_str(&dir.path().join("a")),
            "--mesh-endpoints",
            NODE_B,
        ]
        .iter()
        .map(ToString::to_string),
    );
    topo.start_daemon(args);
    let rig = Rig {
        _daemon_b: daemon_b,
        cluster,
        b,
        topo,
        _dir: dir,
    };
    let pod = rig.topo.pod(0);
    rig.topo.enroll(&pod.netns);

    // The pod cannot reach node B by itself.
    let unreachable = pod.redis_cli(NODE_B.parse().expect("ip"), 7002, &["PING"]);
    assert!(
        !String::from_utf8_lossy(&unreachable.stdout).contains("PONG"),
        "the pod reached B directly: {unreachable:?}"
    );

    let keys = keys_on_b(&rig.cluster, 20);
    for key in &keys {
        assert_eq!(
            pod.redis(&["SET", key, &format!("pod-{key}")]),
            "OK",
            "SET {key} from the pod"
        );
    }
    for key in &keys {
        assert_eq!(
            pod.redis(&["GET", key]),
            format!("pod-{key}"),
            "GET {key} from the pod"
        );
        let owner = rig
            .cluster
            .owner_of_slot(testbed::cluster::slot_of(key.as_bytes()));
        assert_eq!(owner.ip().to_string(), NODE_B);
        assert_eq!(
            rig.cluster.cli(owner, &["GET", key]).trim(),
            format!("pod-{key}")
        );
    }
    let metrics = testbed::http::get_in(&rig.b.place(), addr(NODE_B, ADMIN_PORT), "/metrics");
    let bytes_in = metric(&metrics, "redirector_hbone_received_bytes_total");
    println!("B received {bytes_in} bytes through tunnels from the steered pod's proxy");
    assert!(bytes_in > 20.0 * 20.0, "B's tunnel bytes: {metrics}");
    // From B's side: A's traffic came in on 15008, never to the Redis ports.
    let connections = established(&rig.b.place());
    let direct: Vec<_> = connections
        .iter()
        .filter(|(local, peer)| {
            local.ip().to_string() == NODE_B
                && (7000..7010).contains(&local.port())
                && peer.ip().to_string() == NODE_A
        })
        .collect();
    assert!(
        direct.is_empty(),
        "A reached B's Redis ports directly: {direct:?}"
    );
    assert!(
        connections
            .iter()
            .any(|(local, _)| *local == addr(NODE_B, 15008)),
        "no tunnel on B: {connections:?}"
    );
}
