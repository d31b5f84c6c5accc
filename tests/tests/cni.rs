//! `redirector-cni` end to end: chained after the real `bridge` plugin (with
//! `host-local` IPAM) in a test node's network namespace, for a pod
//! namespace, talking to an agent socket served by the library's server;
//! and `redirector cni install|uninstall` on a node-like CNI config dir.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Output,
    sync::{Arc, Mutex},
    time::Duration,
};

use redirector::cni::{
    server,
    wire::{Command, Reply, Request},
};
use serde_json::{Value, json};
use testbed::{
    TempDir,
    cni::{Sandbox, compact, inject, plugin_dir, redirector_cni},
    netns::Netns,
    process::path_str,
    unique,
};

const NETWORK: &str = "rdr-test-net";
const CNI_VERSION: &str = "1.0.0";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the CNI tests create network namespaces and run the bridge plugin: run them as root"
    );
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}): stdout {:?} stderr {:?}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// The CNI error a failed plugin printed.
fn cni_error(what: &str, out: &Output) -> Value {
    assert!(
        !out.status.success(),
        "{what} succeeded: stdout {:?}",
        stdout(out)
    );
    let error: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not a CNI error ({e}): {:?}", stdout(out)));
    assert_eq!(error["cniVersion"], CNI_VERSION, "{error}");
    assert!(
        error["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{error}"
    );
    error
}

#[test]
fn chained_after_the_real_bridge_plugin() {
    require_root();
    let cni_bin = plugin_dir();
    let plugin = redirector_cni();
    let scratch = TempDir::new("rdr-cni-");
    let node = Netns::create(&unique("rdr-cni-node-"));
    let pod = Netns::create(&unique("rdr-cni-pod-"));
    let ipam_dir = scratch.path().join("ipam");

    let sandbox = Sandbox {
        container_id: unique("sandbox"),
        netns: Some(pod.path()),
        ifname: "eth0".into(),
        args: format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID=5f0c2a4e-1b2c-4d5e-8f90-0123456789ab",
            unique("sandbox")
        ),
    };
    // The pod's network: a bridge in the node namespace, an address from
    // a subnet that exists only in these two namespaces.
    let bridge_conf = json!({
        "type": "bridge",
        "bridge": "rdrcni0",
        "ipam": {
            "type": "host-local",
            "subnet": "10.78.0.0/24",
            "dataDir": path_str(&ipam_dir),
        },
    });
    let bridge = cni_bin.join("bridge");
    let added = sandbox.run(
        &node.place(),
        &bridge,
        "ADD",
        &inject(&bridge_conf, NETWORK, CNI_VERSION, None),
    );
    assert_ok("bridge ADD", &added);
    // What libcni hands the next plugin: the result, re-encoded compact.
    let prev = compact(&stdout(&added));
    let result: Value = serde_json::from_str(&prev).expect("bridge result");
    let address = result["ips"][0]["address"]
        .as_str()
        .expect("an address")
        .to_string();
    assert!(address.starts_with("10.78.0."), "{result}");
    let ip = address.split('/').next().unwrap_or_default().to_string();
    assert!(
        pod.ip(&["-4", "addr", "show", "dev", "eth0"])
            .contains(&address),
        "the bridge plugin did not set up the pod's eth0"
    );
    assert!(
        ipam_dir.join(NETWORK).join(&ip).exists(),
        "host-local did not record the lease"
    );

    let socket = scratch.path().join("run/redirector/cni.sock");
    let log_file = scratch.path().join("redirector-cni.log");
    let ours = |fail_closed: bool| {
        json!({
            "type": "redirector-cni",
            "agentSocket": path_str(&socket),
            "failClosed": fail_closed,
            "timeoutMs": 3000,
            "logFile": path_str(&log_file),
        })
    };
    let chained = |fail_closed: bool| inject(&ours(fail_closed), NETWORK, CNI_VERSION, Some(&prev));
    let run = |sandbox: &Sandbox, command: &str, config: &str| {
        sandbox.run(&node.place(), &plugin, command, config)
    };
    let expected = |command: Command, netns: Option<&Path>| Request {
        command,
        container_id: sandbox.container_id.clone(),
        netns: netns.map(Path::to_path_buf),
        pod_namespace: "shop".into(),
        pod_name: "web-0".into(),
        pod_uid: Some("5f0c2a4e-1b2c-4d5e-8f90-0123456789ab".into()),
    };

    // The agent enrolls: the result goes on byte for byte, and the agent
    // was told exactly which pod and namespace.
    {
        let agent = Agent::start(&socket, |_| Reply::Enrolled { netns_cookie: 4242 });
        for fail_closed in [false, true] {
            let out = run(&sandbox, "ADD", &chained(fail_closed));
            assert_ok("redirector-cni ADD", &out);
            assert_eq!(stdout(&out), prev, "the prevResult changed on its way");
        }
        assert_eq!(
            agent.requests(),
            vec![
                expected(Command::Add, Some(&pod.path())),
                expected(Command::Add, Some(&pod.path())),
            ]
        );
        // Not a Kubernetes pod: passed through, the agent is not asked.
        let bare = Sandbox {
            args: "IgnoreUnknown=1".into(),
            ..sandbox.clone()
        };
        let out = run(&bare, "ADD", &chained(true));
        assert_ok("ADD outside Kubernetes", &out);
        assert_eq!(stdout(&out), prev);
        // DEL reaches the agent, prints nothing.
        let out = run(&sandbox, "DEL", &chained(true));
        assert_ok("DEL", &out);
        assert_eq!(stdout(&out), "");
        assert_eq!(agent.requests().len(), 3);
        assert_eq!(
            agent.requests().last(),
            Some(&expected(Command::Del, Some(&pod.path())))
        );
        // CHECK with the result: fine.
        assert_ok("CHECK", &run(&sandbox, "CHECK", &chained(true)));
    }
    let log = std::fs::read_to_string(&log_file).expect("the plugin's log file");
    assert!(
        log.contains("ADD shop/web-0") && log.contains("enrolled (netns cookie 4242)"),
        "{log}"
    );

    // No agent (its socket is gone).
    assert!(!socket.exists());
    let out = run(&sandbox, "ADD", &chained(false));
    assert_ok("fail-open ADD with no agent", &out);
    assert_eq!(stdout(&out), prev);
    assert!(
        stderr(&out).contains("failing open"),
        "fail-open must say so where the runtime logs it: {}",
        stderr(&out)
    );
    let error = cni_error(
        "fail-closed ADD with no agent",
        &run(&sandbox, "ADD", &chained(true)),
    );
    assert_eq!(error["code"], 11, "try again later: {error}");
    assert!(
        error["details"]
            .as_str()
            .is_some_and(|d| d.contains(path_str(&socket))),
        "{error}"
    );
    // DEL must succeed with the agent down, and with the namespace gone.
    let out = run(&sandbox, "DEL", &chained(true));
    assert_ok("DEL with no agent", &out);
    assert_eq!(stdout(&out), "");
    let gone = Sandbox {
        netns: None,
        ..sandbox.clone()
    };
    assert_ok("DEL with no netns", &run(&gone, "DEL", &chained(true)));

    // The agent answers, and cannot enroll the pod.
    {
        let agent = Agent::start(&socket, |_| Reply::Failed {
            error: "cannot write rdr_enrolled: out of space".into(),
        });
        let error = cni_error(
            "fail-closed ADD refused by the agent",
            &run(&sandbox, "ADD", &chained(true)),
        );
        assert_eq!(error["code"], 100, "{error}");
        assert!(
            error["details"]
                .as_str()
                .is_some_and(|d| d.contains("out of space")),
            "{error}"
        );
        let out = run(&sandbox, "ADD", &chained(false));
        assert_ok("fail-open ADD refused by the agent", &out);
        assert_eq!(stdout(&out), prev);
        assert_eq!(agent.requests().len(), 2);
    }

    // The chain torn down in reverse, as the runtime does: ours, then the
    // bridge, which releases the lease.
    assert_ok("redirector-cni DEL", &run(&sandbox, "DEL", &chained(false)));
    let bridge_del = inject(&bridge_conf, NETWORK, CNI_VERSION, Some(&prev));
    assert_ok(
        "bridge DEL",
        &sandbox.run(&node.place(), &bridge, "DEL", &bridge_del),
    );
    assert!(
        !ipam_dir.join(NETWORK).join(&ip).exists(),
        "host-local kept the lease after DEL"
    );
    assert!(
        !pod.ip(&["link", "show"]).contains("eth0"),
        "the pod's eth0 outlived DEL"
    );
}

#[test]
fn plugin_binary_speaks_the_cni_protocol() {
    let plugin = redirector_cni();
    let sandbox = Sandbox {
        container_id: "c0ffee".into(),
        netns: Some("/var/run/netns/none".into()),
        ifname: "eth0".into(),
        args: String::new(),
    };
    let here = testbed::process::Place::default();

    let out = sandbox.run(&here, &plugin, "VERSION", r#"{"cniVersion":"0.4.0"}"#);
    assert_ok("VERSION", &out);
    let version: Value = serde_json::from_slice(&out.stdout).expect("VERSION JSON");
    assert_eq!(version["cniVersion"], "0.4.0");
    let supported: Vec<&str> = version["supportedVersions"]
        .as_array()
        .expect("supportedVersions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for needed in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(supported.contains(&needed), "{version}");
    }

    let out = sandbox.run(
        &here,
        &plugin,
        "ADD",
        "{\"cniVersion\": \"1.0.0\", \"name\"",
    );
    let error: Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    assert!(!out.status.success());
    assert_eq!(error["code"], 6, "decoding failure: {error}");

    // Used alone (no prevResult): an empty result of the config's version.
    let out = sandbox.run(
        &here,
        &plugin,
        "ADD",
        r#"{"cniVersion":"1.0.0","name":"n","type":"redirector-cni"}"#,
    );
    assert_ok("ADD alone", &out);
    assert_eq!(stdout(&out), r#"{"cniVersion":"1.0.0"}"#);
    for command in ["GC", "STATUS"] {
        let out = sandbox.run(
            &here,
            &plugin,
            command,
            r#"{"cniVersion":"1.1.0","name":"n","type":"redirector-cni"}"#,
        );
        assert_ok(command, &out);
    }
}

/// A node's config as flannel's DaemonSet writes it.
const FLANNEL: &str = include_str!("../../redirector/src/cni/testdata/10-flannel.conflist");

/// A single-plugin config, as kubeadm-era guides write it.
const BRIDGE_CONF: &str = r#"{
    "cniVersion": "0.4.0",
    "name": "mynet",
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": true,
    "ipMasq": true,
    "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.85.0.0/16"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
    }
}
"#;

fn redirector(args: &[&str]) -> Output {
    std::process::Command::new(testbed::daemon::binary())
        .args(args)
        .output()
        .expect("run redirector")
}

#[test]
fn install_and_uninstall_on_a_node_conf_dir() {
    let scratch = TempDir::new("rdr-cni-install-");
    let conf_dir = scratch.path().join("net.d");
    let bin_dir = scratch.path().join("bin");
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    let flannel = conf_dir.join("10-flannel.conflist");
    let loopback = conf_dir.join("99-loopback.conf");
    let loopback_text = "{\"cniVersion\": \"0.3.1\", \"name\": \"lo\", \"type\": \"loopback\"}\n";
    std::fs::write(&flannel, FLANNEL).expect("write");
    std::fs::write(&loopback, loopback_text).expect("write");
    let dirs = [
        "--conf-dir",
        path_str(&conf_dir),
        "--bin-dir",
        path_str(&bin_dir),
    ];
    let install = |extra: &[&str]| {
        let mut args = vec!["cni", "install"];
        args.extend(dirs);
        args.extend(extra);
        redirector(&args)
    };
    let uninstall = || {
        let mut args = vec!["cni", "uninstall"];
        args.extend(dirs);
        redirector(&args)
    };

    let out = install(&["--socket", "/run/rdr/cni.sock", "--fail-closed"]);
    assert_ok("cni install", &out);
    assert!(stdout(&out).contains("chained last in"), "{}", stdout(&out));
    // The binary: a byte copy of the built plugin, executable.
    let installed = bin_dir.join("redirector-cni");
    assert_eq!(
        std::fs::read(&installed).expect("installed binary"),
        std::fs::read(redirector_cni()).expect("built binary")
    );
    let mode = std::fs::metadata(&installed)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    // The list: ours last, with what was asked; the rest as it was.
    let edited = std::fs::read_to_string(&flannel).expect("read");
    let list: Value = serde_json::from_str(&edited).expect("still JSON");
    let original: Value = serde_json::from_str(FLANNEL).expect("JSON");
    let plugins = list["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.len(), 3, "{edited}");
    assert_eq!(
        plugins[..2],
        original["plugins"].as_array().expect("plugins")[..]
    );
    assert_eq!(
        plugins[2],
        json!({"type": "redirector-cni", "agentSocket": "/run/rdr/cni.sock", "failClosed": true})
    );
    assert_eq!(list["name"], "cbr0");
    assert!(
        edited.starts_with(FLANNEL.split("\n    }\n  ]").next().expect("prefix")),
        "bytes before our entry changed:\n{edited}"
    );
    assert_eq!(
        std::fs::read_to_string(&loopback).expect("read"),
        loopback_text
    );

    // Again, same flags: nothing changes; other flags: the entry follows.
    let out = install(&["--socket", "/run/rdr/cni.sock", "--fail-closed"]);
    assert_ok("second install", &out);
    assert!(
        stdout(&out).contains("already chains it"),
        "{}",
        stdout(&out)
    );
    assert_eq!(std::fs::read_to_string(&flannel).expect("read"), edited);
    assert_ok(
        "install fail-open",
        &install(&["--socket", "/run/rdr/cni.sock"]),
    );
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(&flannel).expect("read")).expect("JSON");
    assert_eq!(list["plugins"].as_array().map(Vec::len), Some(3));
    assert_eq!(list["plugins"][2]["failClosed"], false);

    // Uninstall gives back the exact file, twice is once.
    let out = uninstall();
    assert_ok("cni uninstall", &out);
    assert_eq!(std::fs::read_to_string(&flannel).expect("read"), FLANNEL);
    assert!(!installed.exists());
    let out = uninstall();
    assert_ok("second uninstall", &out);
    assert!(
        stdout(&out).contains("nothing to uninstall"),
        "{}",
        stdout(&out)
    );

    // A single-plugin .conf becomes a .conflist, ours second, and comes back.
    std::fs::remove_file(&flannel).expect("rm");
    let single = conf_dir.join("10-mynet.conf");
    std::fs::write(&single, BRIDGE_CONF).expect("write");
    let out = install(&[]);
    assert_ok("install over a .conf", &out);
    assert!(stdout(&out).contains("converted"), "{}", stdout(&out));
    assert!(!single.exists());
    let converted = conf_dir.join("10-mynet.conflist");
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(&converted).expect("read")).expect("JSON");
    let conf: Value = serde_json::from_str(BRIDGE_CONF).expect("JSON");
    assert_eq!(list["name"], "mynet");
    assert_eq!(list["cniVersion"], "0.4.0");
    assert_eq!(list["plugins"][0], conf);
    assert_eq!(list["plugins"][1]["type"], "redirector-cni");
    assert_eq!(
        list["plugins"][1]["agentSocket"],
        "/var/run/redirector/cni.sock"
    );
    assert_eq!(list["plugins"][1]["failClosed"], false);
    // The installed binary runs.
    let out = Sandbox {
        container_id: "c".into(),
        netns: None,
        ifname: "eth0".into(),
        args: String::new(),
    }
    .run(
        &testbed::process::Place::default(),
        &installed,
        "VERSION",
        "",
    );
    assert_ok("installed plugin VERSION", &out);
    assert_ok("uninstall the converted list", &uninstall());
    assert_eq!(
        std::fs::read_to_string(&single).expect("restored"),
        BRIDGE_CONF
    );
    assert!(!converted.exists());
    assert_eq!(
        std::fs::read_to_string(&loopback).expect("read"),
        loopback_text
    );

    // No network config yet: wait for the network plugin to write one.
    let empty = scratch.path().join("empty.d");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let out = redirector(&[
        "cni",
        "install",
        "--conf-dir",
        path_str(&empty),
        "--bin-dir",
        path_str(&bin_dir),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no usable CNI network config"),
        "{}",
        stderr(&out)
    );
    let late = empty.join("10-flannel.conflist");
    let writer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(500));
        std::fs::write(late, FLANNEL).expect("write");
    });
    let out = redirector(&[
        "cni",
        "install",
        "--conf-dir",
        path_str(&empty),
        "--bin-dir",
        path_str(&bin_dir),
        "--wait",
        "10",
    ]);
    writer.join().expect("writer");
    assert_ok("install --wait", &out);
    assert!(stdout(&out).contains("chained last in"), "{}", stdout(&out));
}

/// The agent's CNI socket served in-process by the library's own server,
/// recording each request and answering with `reply`. Stopped, and its
/// socket removed, on drop.
pub struct Agent {
    runtime: Option<tokio::runtime::Runtime>,
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Agent {
    pub fn start(socket: &Path, reply: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = runtime
            .block_on(server::bind(socket))
            .unwrap_or_else(|e| panic!("bind {}: {e}", socket.display()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: server::Handler = {
            let requests = requests.clone();
            let reply = Arc::new(reply);
            Arc::new(move |request: Request| {
                let answer = reply(&request);
                requests
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(request);
                Box::pin(async move { answer })
            })
        };
        runtime.spawn(server::serve(listener, handler));
        Self {
            runtime: Some(runtime),
            socket: socket.to_path_buf(),
            requests,
        }
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
