//! The real `bpftool`, as operators run it.

use std::process::Command;

use serde_json::Value;

/// `bpftool <args>` as text, asserting success.
pub fn text(args: &[&str]) -> String {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `bpftool -j <args>` parsed.
pub fn json(args: &[&str]) -> Value {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let text = text(&full);
    if text.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bpftool -j {args:?}: {e}: {text}"))
}

/// (id, name) of every loaded program whose name starts with `prefix`.
pub fn programs_named(prefix: &str) -> Vec<(u64, String)> {
    json(&["prog", "list"])
        .as_array()
        .expect("prog list is an array")
        .iter()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            name.starts_with(prefix)
                .then(|| (p["id"].as_u64().unwrap_or(0), name.to_string()))
        })
        .collect()
}

/// Program ids attached directly at a cgroup.
pub fn cgroup_program_ids(cgroup: &str) -> Vec<u64> {
    json(&["cgroup", "show", cgroup])
        .as_array()
        .map(|progs| progs.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default()
}
