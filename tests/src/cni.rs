//! CNI plugins run as a container runtime runs them: the reference plugins
//! Debian ships (`bridge`, `host-local`) and the built `redirector-cni`.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Output, Stdio},
};

use serde_json::{Value, value::RawValue};

use crate::process::Place;

/// Where the distribution's CNI plugins are (`cargo xtask setup` installs
/// Debian's containernetworking-plugins).
pub fn plugin_dir() -> PathBuf {
    let dir = ["/usr/lib/cni", "/opt/cni/bin"]
        .into_iter()
        .map(PathBuf::from)
        .find(|dir| dir.join("bridge").exists() && dir.join("host-local").exists());
    dir.unwrap_or_else(|| {
        panic!("no bridge and host-local CNI plugins in /usr/lib/cni or /opt/cni/bin (run `cargo xtask setup`)")
    })
}

/// The built `redirector-cni`, beside the `redirector` binary.
pub fn redirector_cni() -> PathBuf {
    let binary = crate::daemon::binary().with_file_name("redirector-cni");
    assert!(
        binary.exists(),
        "{} not found: `cargo build -p redirector` builds it",
        binary.display()
    );
    binary
}

/// A pod sandbox, as the runtime describes it to every plugin of a chain.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS`, as the kubelet's runtime sets it.
    pub args: String,
}

impl Sandbox {
    /// Runs `plugin` for `command` in `place` (the node's network
    /// namespace), with `config` on stdin and only the `CNI_*` environment.
    pub fn run(&self, place: &Place, plugin: &Path, command: &str, config: &str) -> Output {
        let search = std::env::join_paths([
            plugin_dir(),
            plugin.parent().map(Path::to_path_buf).unwrap_or_default(),
        ])
        .expect("CNI_PATH");
        let mut cmd = place.command(plugin);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", self.netns.as_deref().unwrap_or(Path::new("")))
            .env("CNI_IFNAME", &self.ifname)
            .env("CNI_ARGS", &self.args)
            .env("CNI_PATH", search)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", plugin.display()));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(config.as_bytes())
            .expect("write the network config");
        child.wait_with_output().expect("plugin output")
    }
}

/// A plugin's config as libcni hands it to one plugin of a list: the
/// list's `name` and `cniVersion` injected, `prevResult` added, keys in
/// Go's map order (sorted), compact.
pub fn inject(plugin: &Value, name: &str, cni_version: &str, prev_result: Option<&str>) -> String {
    let mut config: BTreeMap<String, Box<RawValue>> = plugin
        .as_object()
        .expect("a plugin config is an object")
        .iter()
        .map(|(k, v)| (k.clone(), raw(&v.to_string())))
        .collect();
    config.insert("name".into(), raw(&Value::from(name).to_string()));
    config.insert(
        "cniVersion".into(),
        raw(&Value::from(cni_version).to_string()),
    );
    if let Some(prev) = prev_result {
        config.insert("prevResult".into(), raw(prev));
    }
    serde_json::to_string(&config).expect("config")
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_string()).expect("valid JSON")
}

/// `json` without whitespace between tokens, keys left in their order (as
/// Go re-encodes a result it decoded into its structs).
pub fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}
