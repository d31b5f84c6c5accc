//! `redirector-cni`: a chained CNI plugin (spec 0.3.0 to 1.1.0). It never
//! touches the pod's network; on ADD it asks the node agent to enroll the
//! pod's network namespace, then hands the previous plugin's result on
//! unchanged, so the runtime cannot start a container before enrollment.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{
    ask,
    wire::{self, Command, Reply, Request},
};

/// The spec versions this plugin speaks (it passes results through, so
/// every version with `prevResult`, 0.3.0 on, works the same).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const LATEST_VERSION: &str = "1.1.0";

/// Default `timeoutMs`: above the agent's own wait for its first API sync
/// (5 s), so a starting agent still enrolls; a dead agent fails fast anyway.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Well-known CNI error codes (spec, "Error"); 100 and up are ours.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The agent answered, and could not enroll the pod.
    pub const ENROLL_FAILED: u32 = 100;
}

/// The runtime's `CNI_*` environment.
#[derive(Clone, Debug, Default)]
pub struct Invocation {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Invocation {
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: std::env::var_os("CNI_NETNS")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
            path: var("CNI_PATH"),
        }
    }
}

/// The pod a sandbox belongs to, from `CNI_ARGS` (the kubelet's
/// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// `CNI_ARGS` ("K=V;K2=V2") as pairs; pairs without `=` are ignored, as
/// this plugin only reads and must not fail a pod over others' arguments.
pub fn parse_args(cni_args: &str) -> Vec<(&str, &str)> {
    cni_args
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

/// The pod from `CNI_ARGS`; `None` when it is not a Kubernetes pod.
pub fn pod_args(cni_args: &str) -> Option<PodArgs> {
    let args = parse_args(cni_args);
    let get = |key: &str| {
        args.iter()
            .rev()
            .find(|(k, v)| *k == key && !v.is_empty())
            .map(|(_, v)| (*v).to_string())
    };
    Some(PodArgs {
        namespace: get("K8S_POD_NAMESPACE")?,
        name: get("K8S_POD_NAME")?,
        uid: get("K8S_POD_UID"),
    })
}

/// The network config on stdin: the spec's keys this plugin reads, and its own.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf<'a> {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    /// Kept as the exact bytes the runtime sent, to hand on unchanged.
    #[serde(borrow, default)]
    pub prev_result: Option<&'a RawValue>,
    #[serde(default = "default_socket")]
    pub agent_socket: PathBuf,
    #[serde(default)]
    pub fail_closed: bool,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub log_file: Option<PathBuf>,
}

fn default_socket() -> PathBuf {
    wire::DEFAULT_SOCKET.into()
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

/// A CNI error result (spec, "Error").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniError {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// The log file only: the runtime logs the plugin's stderr.
    Info,
    /// The log file and stderr.
    Warn,
}

/// What to print, how to exit, and what to log.
#[derive(Debug, Default)]
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
    pub log: Vec<(Level, String)>,
    pub log_file: Option<PathBuf>,
}

impl Outcome {
    fn ok(stdout: String) -> Self {
        Self {
            stdout,
            success: true,
            ..Self::default()
        }
    }

    fn error(cni_version: &str, code: u32, msg: &str, details: String) -> Self {
        let error = CniError {
            cni_version: cni_version.to_string(),
            code,
            msg: msg.to_string(),
            details,
        };
        let mut outcome = Self {
            stdout: serde_json::to_string(&error).unwrap_or_default(),
            success: false,
            ..Self::default()
        };
        outcome.log(
            Level::Warn,
            format!("error {code}: {msg}: {}", error.details),
        );
        outcome
    }

    fn log(&mut self, level: Level, line: String) {
        self.log.push((level, line));
    }
}

/// The plugin, on one invocation: `stdin` is the network config.
pub fn run(invocation: &Invocation, stdin: &str) -> Outcome {
    let Some(command) = invocation.command.as_deref() else {
        return Outcome::error(
            &stdin_version(stdin),
            code::INVALID_ENVIRONMENT,
            "CNI_COMMAND is not set",
            String::new(),
        );
    };
    if command == "VERSION" {
        return Outcome::ok(version_info(&stdin_version(stdin)));
    }
    let conf = match serde_json::from_str::<NetConf>(stdin) {
        Ok(conf) => conf,
        Err(e) => {
            return Outcome::error(
                &stdin_version(stdin),
                code::DECODING_FAILURE,
                "cannot decode the network config",
                e.to_string(),
            );
        }
    };
    let mut outcome = match command {
        "ADD" => add(invocation, &conf),
        "DEL" => del(invocation, &conf),
        "CHECK" => match conf.prev_result {
            Some(_) => Outcome::ok(String::new()),
            None => Outcome::error(
                &conf.cni_version,
                code::INVALID_NETWORK_CONFIG,
                "CHECK without prevResult",
                "redirector-cni is a chained plugin: list it after the pod's network plugin".into(),
            ),
        },
        // Nothing held per attachment, no state to report.
        "GC" | "STATUS" => Outcome::ok(String::new()),
        other => Outcome::error(
            &conf.cni_version,
            code::INVALID_ENVIRONMENT,
            "unknown CNI_COMMAND",
            other.to_string(),
        ),
    };
    outcome.log_file = conf.log_file.clone();
    outcome
}

fn add(invocation: &Invocation, conf: &NetConf) -> Outcome {
    // Fail open by default: a version this build does not know still has
    // a result to hand on.
    let mut notes = Vec::new();
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        let details = format!(
            "cniVersion {:?}, supported: {}",
            conf.cni_version,
            SUPPORTED_VERSIONS.join(", ")
        );
        if conf.fail_closed {
            return Outcome::error(
                &conf.cni_version,
                code::INCOMPATIBLE_VERSION,
                "incompatible CNI version",
                details,
            );
        }
        notes.push(format!(
            "incompatible CNI version ({details}); passing through"
        ));
    }
    let (Some(container_id), Some(netns)) = (&invocation.container_id, &invocation.netns) else {
        return Outcome::error(
            &conf.cni_version,
            code::INVALID_ENVIRONMENT,
            "ADD needs CNI_CONTAINERID and CNI_NETNS",
            format!(
                "CNI_CONTAINERID={:?} CNI_NETNS={:?}",
                invocation.container_id, invocation.netns
            ),
        );
    };
    let mut outcome = Outcome::ok(pass_through(conf));
    for note in notes {
        outcome.log(Level::Warn, note);
    }
    let Some(pod) = invocation.args.as_deref().and_then(pod_args) else {
        outcome.log(
            Level::Info,
            format!("ADD {container_id}: not a Kubernetes pod (no K8S_POD_* in CNI_ARGS); skipped"),
        );
        return outcome;
    };
    let who = format!("ADD {}/{} ({container_id})", pod.namespace, pod.name);
    let request = Request {
        command: Command::Add,
        container_id: container_id.clone(),
        netns: Some(netns.clone()),
        pod_namespace: pod.namespace,
        pod_name: pod.name,
        pod_uid: pod.uid,
    };
    let (code, msg, details) = match ask(&conf.agent_socket, &request, timeout(conf)) {
        Ok(Reply::Enrolled { netns_cookie }) => {
            outcome.log(
                Level::Info,
                format!("{who}: enrolled (netns cookie {netns_cookie})"),
            );
            return outcome;
        }
        Ok(Reply::Skipped { reason }) => {
            outcome.log(Level::Info, format!("{who}: not enrolled: {reason}"));
            return outcome;
        }
        Ok(Reply::Failed { error }) => (
            code::ENROLL_FAILED,
            "the agent could not enroll the pod",
            error,
        ),
        Ok(other) => (
            code::TRY_AGAIN_LATER,
            "the agent sent an unexpected reply",
            format!("{other:?}"),
        ),
        Err(e) => (
            code::TRY_AGAIN_LATER,
            "the agent is unreachable",
            e.to_string(),
        ),
    };
    if conf.fail_closed {
        let mut failed = Outcome::error(&conf.cni_version, code, msg, details);
        failed
            .log
            .insert(0, (Level::Warn, format!("{who}: failing closed")));
        return failed;
    }
    outcome.log(
        Level::Warn,
        format!("{who}: {msg}: {details}; failing open, the pod starts unsteered"),
    );
    outcome
}

fn del(invocation: &Invocation, conf: &NetConf) -> Outcome {
    // DEL always succeeds: it must be idempotent, and must work with the
    // agent down and the namespace gone.
    let mut outcome = Outcome::ok(String::new());
    let Some(pod) = invocation.args.as_deref().and_then(pod_args) else {
        return outcome;
    };
    let container_id = invocation.container_id.clone().unwrap_or_default();
    let who = format!("DEL {}/{} ({container_id})", pod.namespace, pod.name);
    let request = Request {
        command: Command::Del,
        container_id,
        netns: invocation.netns.clone(),
        pod_namespace: pod.namespace,
        pod_name: pod.name,
        pod_uid: pod.uid,
    };
    match ask(&conf.agent_socket, &request, timeout(conf)) {
        Ok(Reply::Failed { error }) => {
            outcome.log(Level::Warn, format!("{who}: the agent failed: {error}"));
        }
        Ok(reply) => outcome.log(Level::Info, format!("{who}: {reply:?}")),
        Err(e) => outcome.log(Level::Warn, format!("{who}: {e}")),
    }
    outcome
}

fn timeout(conf: &NetConf) -> Duration {
    Duration::from_millis(conf.timeout_ms)
}

/// The previous plugin's result, byte for byte; alone (no `prevResult`),
/// an empty result of the config's version.
fn pass_through(conf: &NetConf) -> String {
    match conf.prev_result {
        Some(raw) => raw.get().to_string(),
        None => format!(
            "{{\"cniVersion\":{}}}",
            serde_json::to_string(&conf.cni_version).unwrap_or_else(|_| "\"\"".into())
        ),
    }
}

/// `cniVersion` from a config that may not decode as ours.
fn stdin_version(stdin: &str) -> String {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Version {
        cni_version: String,
    }
    serde_json::from_str::<Version>(stdin)
        .map(|v| v.cni_version)
        .ok()
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string())
}

fn version_info(cni_version: &str) -> String {
    serde_json::json!({
        "cniVersion": cni_version,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// The `redirector-cni` binary: env and stdin in, result or error out.
pub fn main() -> ExitCode {
    let mut stdin = String::new();
    let outcome = match std::io::stdin().read_to_string(&mut stdin) {
        Ok(_) => run(&Invocation::from_env(), &stdin),
        Err(e) => Outcome::error(
            LATEST_VERSION,
            code::DECODING_FAILURE,
            "cannot read the network config from stdin",
            e.to_string(),
        ),
    };
    write_log(&outcome);
    let mut stdout = std::io::stdout().lock();
    // The runtime reads the result from stdout; nothing else goes there.
    let printed = stdout
        .write_all(outcome.stdout.as_bytes())
        .and_then(|()| stdout.flush());
    if outcome.success && printed.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn write_log(outcome: &Outcome) {
    if outcome.log.is_empty() {
        return;
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let stamp = format!("{}.{:03}", now.as_secs(), now.subsec_millis());
    let mut all = String::new();
    for (level, line) in &outcome.log {
        let level_name = match level {
            Level::Info => "info",
            Level::Warn => "warn",
        };
        let _ = writeln!(all, "{stamp} redirector-cni {level_name}: {line}");
        if *level == Level::Warn {
            eprintln!("redirector-cni: {line}");
        }
    }
    if let Some(path) = &outcome.log_file {
        // Best effort: a log that cannot be written must not fail a pod.
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(all.as_bytes()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation(command: &str, args: Option<&str>) -> Invocation {
        Invocation {
            command: Some(command.into()),
            container_id: Some("c0ffee".into()),
            netns: Some("/var/run/netns/cni-1".into()),
            ifname: Some("eth0".into()),
            args: args.map(Into::into),
            path: Some("/opt/cni/bin".into()),
        }
    }

    const KUBELET_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1b2c";

    #[test]
    fn cni_args_from_the_kubelet() {
        assert_eq!(
            pod_args(KUBELET_ARGS),
            Some(PodArgs {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: Some("1b2c".into()),
            })
        );
        // No UID (older kubelets), stray separators, a pair without `=`.
        assert_eq!(
            pod_args(";K8S_POD_NAME=a;;junk;K8S_POD_NAMESPACE=b;K8S_POD_UID="),
            Some(PodArgs {
                namespace: "b".into(),
                name: "a".into(),
                uid: None,
            })
        );
        // Not a Kubernetes pod.
        assert_eq!(pod_args("IgnoreUnknown=1;K8S_POD_NAME=a"), None);
        assert_eq!(pod_args(""), None);
        assert_eq!(
            parse_args("A=1;B==2; C = 3"),
            vec![("A", "1"), ("B", "=2"), ("C", "3")]
        );
    }

    #[test]
    fn prev_result_is_passed_through_byte_for_byte() {
        // Odd spacing and key order, which a re-encode would change.
        let prev = "{ \"ips\":[{\"address\":\"10.1.0.5/24\"}] ,\"cniVersion\":\"1.0.0\",\"interfaces\":[]}";
        let stdin = format!(
            "{{\"cniVersion\":\"1.0.0\",\"name\":\"k8s\",\"type\":\"redirector-cni\",\"prevResult\":{prev}}}"
        );
        // Not a pod: no agent is asked.
        let out = run(&invocation("ADD", Some("IgnoreUnknown=1")), &stdin);
        assert!(out.success, "{out:?}");
        assert_eq!(out.stdout, prev);
    }

    #[test]
    fn alone_add_prints_an_empty_result() {
        let out = run(
            &invocation("ADD", None),
            r#"{"cniVersion":"0.4.0","name":"n","type":"redirector-cni"}"#,
        );
        assert!(out.success);
        assert_eq!(out.stdout, r#"{"cniVersion":"0.4.0"}"#);
    }

    #[test]
    fn bad_config_is_a_decoding_failure() {
        let out = run(&invocation("ADD", Some(KUBELET_ARGS)), "{\"cniVersion\":");
        assert!(!out.success);
        let error: CniError = serde_json::from_str(&out.stdout).expect("error JSON");
        assert_eq!(error.code, code::DECODING_FAILURE);
        assert_eq!(error.cni_version, LATEST_VERSION);
    }

    #[test]
    fn agent_down_fails_open_or_closed() {
        let conf = |fail_closed: bool| {
            format!(
                r#"{{"cniVersion":"1.0.0","name":"n","type":"redirector-cni","agentSocket":"/nonexistent/redirector.sock","failClosed":{fail_closed},"prevResult":{{"cniVersion":"1.0.0"}}}}"#
            )
        };
        let open = run(&invocation("ADD", Some(KUBELET_ARGS)), &conf(false));
        assert!(open.success);
        assert_eq!(open.stdout, r#"{"cniVersion":"1.0.0"}"#);
        assert!(
            open.log
                .iter()
                .any(|(l, m)| *l == Level::Warn && m.contains("failing open")),
            "{open:?}"
        );

        let closed = run(&invocation("ADD", Some(KUBELET_ARGS)), &conf(true));
        assert!(!closed.success);
        let error: CniError = serde_json::from_str(&closed.stdout).expect("error JSON");
        assert_eq!(error.code, code::TRY_AGAIN_LATER);
        assert_eq!(error.cni_version, "1.0.0");
        assert!(
            error.details.contains("/nonexistent/redirector.sock"),
            "{error:?}"
        );

        // DEL never fails, and prints nothing.
        let del = run(&invocation("DEL", Some(KUBELET_ARGS)), &conf(true));
        assert!(del.success);
        assert_eq!(del.stdout, "");
    }

    #[test]
    fn version_check_gc_status_and_unknown_commands() {
        let version = run(&invocation("VERSION", None), r#"{"cniVersion":"0.4.0"}"#);
        assert!(version.success);
        let info: serde_json::Value = serde_json::from_str(&version.stdout).expect("JSON");
        assert_eq!(info["cniVersion"], "0.4.0");
        assert_eq!(info["supportedVersions"][4], "1.1.0");
        let version = run(&invocation("VERSION", None), "");
        assert!(version.stdout.contains(r#""cniVersion":"1.1.0""#));

        let chained = r#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{}}"#;
        let alone = r#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#;
        assert!(run(&invocation("CHECK", None), chained).success);
        let check = run(&invocation("CHECK", None), alone);
        assert!(!check.success);
        assert!(check.stdout.contains("\"code\":7"), "{}", check.stdout);
        for command in ["GC", "STATUS"] {
            let out = run(&invocation(command, None), alone);
            assert!(out.success && out.stdout.is_empty(), "{command}: {out:?}");
        }
        let unknown = run(&invocation("FROB", None), alone);
        assert!(!unknown.success);
        assert!(unknown.stdout.contains("\"code\":4"));
        let unset = run(&Invocation::default(), alone);
        assert!(unset.stdout.contains("\"code\":4"));
    }

    #[test]
    fn unknown_version_fails_open_unless_closed() {
        let conf = |fail_closed: bool| {
            format!(
                r#"{{"cniVersion":"9.9.9","name":"n","type":"t","failClosed":{fail_closed},"prevResult":{{"x":1}}}}"#
            )
        };
        let open = run(&invocation("ADD", None), &conf(false));
        assert!(open.success);
        assert_eq!(open.stdout, r#"{"x":1}"#);
        let closed = run(&invocation("ADD", None), &conf(true));
        assert!(closed.stdout.contains("\"code\":1"), "{}", closed.stdout);
    }
}
