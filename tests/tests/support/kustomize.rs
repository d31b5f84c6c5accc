//! `kubectl kustomize` renders of `deploy/`, for the tests that read the
//! manifests (offline, no cluster).

use std::process::Command;

use serde_json::Value;

/// Every object `kubectl kustomize <workspace>/<dir>` renders, as JSON.
pub fn render_docs(dir: &str) -> Vec<Value> {
    let path = testbed::workspace_root().join(dir);
    let out = match Command::new("kubectl").arg("kustomize").arg(&path).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "kubectl is not on PATH: these tests render deploy/ with `kubectl kustomize` \
             (`cargo xtask setup` installs Debian's kubernetes-client)"
        ),
        Err(e) => panic!("cannot run kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("kubectl prints UTF-8");
    let docs: Vec<Value> = serde_saphyr::from_multiple::<Value>(&yaml)
        .unwrap_or_else(|e| panic!("{dir}: the render is not YAML: {e}\n{yaml}"))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect();
    assert!(!docs.is_empty(), "{dir} rendered nothing");
    docs
}
