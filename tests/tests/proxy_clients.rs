//! Real client software through the proxy: `redis-cli`, `redis-benchmark`,
//! redis-py (plain and cluster clients) and phpredis, each against the real
//! `redirector` binary in front of a real 3-master cluster on 127.0.0.1.
//!
//! No root needed. A missing client (`cargo xtask setup` installs them all)
//! fails the test rather than skipping it.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use testbed::{
    cluster::{RedisCluster, key_in_slot},
    process::{Place, wait_for},
    proxy::Proxy,
    workspace_root,
};

/// Debian's interpreter: `python3-redis` is installed for it, not for
/// whatever `python3` comes first on PATH.
const PYTHON: &str = "/usr/bin/python3";

/// Upper bound for any one client run, so a wedged proxy fails the test.
const CLIENT_TIMEOUT_SECS: &str = "60";

/// A cluster of 3 masters with a replica each, and the proxy in front.
/// Declare `let (cluster, proxy) = ...`: locals drop in reverse, so the
/// proxy stops before the nodes.
fn cluster_and_proxy() -> (RedisCluster, Proxy) {
    let cluster = RedisCluster::start_local(3, 1);
    let proxy = Proxy::start(&cluster.seeds(), &[]);
    (cluster, proxy)
}

fn client_script(name: &str) -> PathBuf {
    let path = workspace_root().join("tests").join("clients").join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// Runs `program args` under `timeout`, with `stdin` fed in, and returns its
/// output whatever the status.
fn run(program: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut cmd = Place::default().command("timeout");
    cmd.args(["-k", "5", CLIENT_TIMEOUT_SECS, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("run {program}: {e}"));
    let mut input = child.stdin.take().expect("piped stdin");
    let stdin = stdin.to_vec();
    // A writer thread, so a client that replies while we still write cannot
    // deadlock against a full stdout pipe.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {program}: {e}"));
    let _ = writer.join();
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// `program args` must exit 0 with nothing on stderr; returns stdout.
fn run_ok(program: &str, args: &[&str], stdin: &[u8], proxy: &Proxy) -> String {
    let out = run(program, args, stdin);
    let what = format!("`{program} {}`", args.join(" "));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}\n--- proxy log\n{}",
        describe(&what, &out),
        proxy.log()
    );
    text(&out.stdout)
}

/// `redis-cli` against the proxy, raw replies (one line each).
fn proxy_cli(proxy: &Proxy, args: &[&str]) -> String {
    let port = proxy.addr().port().to_string();
    let mut full = vec!["-h", "127.0.0.1", "-p", &port];
    full.extend_from_slice(args);
    run_ok("redis-cli", &full, b"", proxy)
}

/// `name` summed over every label set (`name{...} value` lines).
fn metric_sum(proxy: &Proxy, name: &str) -> f64 {
    proxy
        .metrics()
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// `connected_clients` summed over every node of the cluster (each `INFO`
/// connection counts itself once, the same before and after).
fn cluster_connected_clients(cluster: &RedisCluster) -> u64 {
    cluster
        .nodes()
        .iter()
        .map(|node| {
            let info = cluster.cli(*node, &["INFO", "clients"]);
            info.lines()
                .find_map(|l| l.strip_prefix("connected_clients:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("connected_clients of {node} in:\n{info}"))
        })
        .sum()
}

fn require_client(program: &str, args: &[&str], what: &str) {
    let ok = std::process::Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "{what} is not installed: run `cargo xtask setup`");
}

/// One RESP command, as `redis-cli --pipe` wants it.
fn resp_command(out: &mut Vec<u8>, args: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
}

#[test]
fn redis_cli_through_the_proxy() {
    let started = Instant::now();
    let (cluster, proxy) = cluster_and_proxy();

    // Keys in slots owned by each of the three masters.
    let keys: Vec<String> = [0, 6000, 16383].iter().map(|s| key_in_slot(*s)).collect();
    let owners: Vec<SocketAddr> = [0, 6000, 16383]
        .iter()
        .map(|s| cluster.owner_of_slot(*s))
        .collect();
    let mut distinct = owners.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        3,
        "test keys must span 3 masters: {owners:?}"
    );

    assert_eq!(proxy_cli(&proxy, &["PING"]).trim(), "PONG");
    assert_eq!(proxy_cli(&proxy, &["SET", &keys[0], "one"]).trim(), "OK");
    assert_eq!(proxy_cli(&proxy, &["GET", &keys[0]]).trim(), "one");
    assert_eq!(
        proxy_cli(
            &proxy,
            &["MSET", &keys[0], "a", &keys[1], "b", &keys[2], "c"]
        )
        .trim(),
        "OK"
    );
    let mget = proxy_cli(
        &proxy,
        &["MGET", &keys[2], "cli:absent", &keys[0], &keys[1]],
    );
    assert_eq!(
        mget.lines().collect::<Vec<_>>(),
        ["c", "", "a", "b"],
        "MGET across slots"
    );
    for want in 1..=3 {
        assert_eq!(
            proxy_cli(&proxy, &["INCR", "cli:counter"]).trim(),
            want.to_string()
        );
    }

    // 1000 SETs through `redis-cli --pipe`, then one GET each directly on
    // the cluster with `redis-cli -c` (which follows MOVED).
    const PIPED: usize = 1000;
    let mut input = Vec::new();
    for i in 0..PIPED {
        resp_command(&mut input, &["SET", &format!("pipe:{i}"), &format!("v{i}")]);
    }
    let port = proxy.addr().port().to_string();
    let piped = run_ok(
        "redis-cli",
        &["-h", "127.0.0.1", "-p", &port, "--pipe"],
        &input,
        &proxy,
    );
    assert!(
        piped.contains(&format!("errors: 0, replies: {PIPED}")),
        "redis-cli --pipe: {piped}"
    );

    let node = cluster.nodes()[0];
    let (host, node_port) = (node.ip().to_string(), node.port().to_string());
    let mut gets = String::new();
    for i in 0..PIPED {
        gets.push_str(&format!("GET pipe:{i}\n"));
    }
    for k in &keys {
        gets.push_str(&format!("GET {k}\n"));
    }
    gets.push_str("GET cli:counter\n");
    let direct = run_ok(
        "redis-cli",
        &["-c", "-h", &host, "-p", &node_port],
        gets.as_bytes(),
        &proxy,
    );
    // `redis-cli -c` notes each redirect it follows on a line of its own.
    let got: Vec<&str> = direct
        .lines()
        .filter(|l| !l.starts_with("-> Redirected"))
        .collect();
    let mut want: Vec<String> = (0..PIPED).map(|i| format!("v{i}")).collect();
    want.extend(["a", "b", "c", "3"].map(String::from));
    assert_eq!(got.len(), want.len(), "direct reads:\n{direct}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "direct read #{i} on the cluster");
    }

    // Nothing else was written: every key counted once across the masters.
    let dbsize = cluster.total_keys();
    assert_eq!(
        dbsize,
        (PIPED + keys.len() + 1) as u64,
        "keys in the cluster"
    );
    eprintln!("redis_cli_through_the_proxy: {:?}", started.elapsed());
}

/// Parses `redis-benchmark --csv` output into (test, rps) rows.
fn benchmark_rows(csv: &str) -> Vec<(String, f64)> {
    csv.lines()
        .filter_map(|l| {
            let mut fields = l.split(',').map(|f| f.trim_matches('"'));
            let test = fields.next()?.to_string();
            let rps = fields.next()?.parse::<f64>().ok()?;
            Some((test, rps))
        })
        .collect()
}

fn benchmark(proxy: &Proxy, extra: &[&str]) -> Vec<(String, f64)> {
    let port = proxy.addr().port().to_string();
    let mut args = vec!["-h", "127.0.0.1", "-p", &port];
    args.extend(["-t", "set,get", "-n", "20000", "-c", "20", "-r", "10000"]);
    args.extend(["-d", "32", "--csv", "-q"]);
    args.extend_from_slice(extra);
    let csv = run_ok("redis-benchmark", &args, b"", proxy);
    let rows = benchmark_rows(&csv);
    let tests: Vec<&str> = rows.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tests, ["SET", "GET"], "redis-benchmark {extra:?}:\n{csv}");
    for (test, rps) in &rows {
        assert!(*rps > 0.0, "{test} at {rps} rps: {csv}");
    }
    rows
}

#[test]
fn redis_benchmark_through_the_proxy() {
    let started = Instant::now();
    let (cluster, proxy) = cluster_and_proxy();
    let commands_before = metric_sum(&proxy, "redirector_commands_total") as u64;

    let plain = benchmark(&proxy, &[]);
    let pipelined = benchmark(&proxy, &["-P", "16"]);
    eprintln!("redis-benchmark -c 20: {plain:?}; with -P 16: {pipelined:?}");

    // The proxy saw every command, and none failed.
    let errors = proxy
        .metrics()
        .lines()
        .filter(|l| l.starts_with("redirector_commands_total{") && l.contains("outcome=\"error\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>();
    assert_eq!(errors, 0.0, "command errors:\n{}", proxy.metrics());
    let commands = metric_sum(&proxy, "redirector_commands_total") as u64 - commands_before;
    assert!(commands >= 80_000, "the proxy counted {commands} commands");

    // -r 10000 writes keys `key:000000000000`..: they landed in the cluster.
    let dbsize = cluster.total_keys();
    assert!(
        (1000..=10_000).contains(&dbsize),
        "{dbsize} keys in the cluster after redis-benchmark"
    );
    eprintln!("redis_benchmark_through_the_proxy: {:?}", started.elapsed());
}

#[test]
fn redis_py_plain_and_cluster_clients() {
    require_client(
        PYTHON,
        &["-c", "import redis.cluster"],
        "redis-py for /usr/bin/python3 (python3-redis)",
    );
    let started = Instant::now();
    let (cluster, proxy) = cluster_and_proxy();
    let script = client_script("redis_py.py");
    let port = proxy.addr().port().to_string();
    let out = run(
        PYTHON,
        &[script.to_str().expect("UTF-8 path"), "127.0.0.1", &port],
        b"",
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "{}\n--- proxy log\n{}",
        describe("redis_py.py", &out),
        proxy.log()
    );
    eprintln!("{stdout}");

    // What redis-py wrote is in the cluster.
    let owner = cluster.owner_of_slot(testbed::cluster::slot_of(b"py:cluster:42"));
    assert_eq!(cluster.cli(owner, &["GET", "py:cluster:42"]).trim(), "c42");
    eprintln!(
        "redis_py_plain_and_cluster_clients: {:?}",
        started.elapsed()
    );
}

#[test]
fn phpredis_connection_per_request() {
    require_client(
        "php",
        &["-r", "exit(extension_loaded('redis') ? 0 : 1);"],
        "php with the redis extension (php-cli, php-redis)",
    );
    const REQUESTS: u32 = 500;
    let started = Instant::now();
    let (cluster, proxy) = cluster_and_proxy();
    let script = client_script("phpredis_per_request.php");

    // Warm up: the proxy's first connections to the nodes are not what
    // this test measures.
    assert_eq!(proxy_cli(&proxy, &["SET", "php:warmup", "1"]).trim(), "OK");
    let opened_before = proxy.metric("redirector_client_connections_opened_total");
    let upstream_before = metric_sum(&proxy, "redirector_upstream_connections_opened_total");
    let cluster_clients_before = cluster_connected_clients(&cluster);

    let port = proxy.addr().port().to_string();
    let out = run(
        "php",
        &[
            script.to_str().expect("UTF-8 path"),
            "127.0.0.1",
            &port,
            &REQUESTS.to_string(),
        ],
        b"",
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == format!("requests: {REQUESTS}"),
        "{}\n--- proxy log\n{}",
        describe("phpredis_per_request.php", &out),
        proxy.log()
    );

    let opened = proxy.metric("redirector_client_connections_opened_total") - opened_before;
    let upstream =
        metric_sum(&proxy, "redirector_upstream_connections_opened_total") - upstream_before;
    let cluster_clients = cluster_connected_clients(&cluster);
    eprintln!(
        "{REQUESTS} requests: {opened} client connections, {upstream} upstream connections \
         opened; cluster connected_clients {cluster_clients_before} -> {cluster_clients}"
    );
    assert!(
        opened >= f64::from(REQUESTS),
        "the proxy accepted {opened} connections for {REQUESTS} requests"
    );
    assert!(
        upstream <= 20.0,
        "{upstream} upstream connections opened for {REQUESTS} client connections:\n{}",
        proxy.metrics()
    );
    assert!(
        cluster_clients < cluster_clients_before + 50,
        "cluster connected_clients grew from {cluster_clients_before} to {cluster_clients}"
    );
    // Every client connection was closed and the proxy noticed.
    wait_for(
        "the proxy to close every client connection",
        Duration::from_secs(10),
        || (proxy.metric("redirector_client_connections_active") == 0.0).then_some(()),
    );
    eprintln!("phpredis_connection_per_request: {:?}", started.elapsed());
}
