//! The Grafana dashboard (`deploy/grafana/redirector-node.json`) against a
//! live scrape: every metric a query names must be one the daemon exports.

use std::collections::BTreeSet;

/// Names a query may use: every sample's name, and for each family its
/// base name with the suffixes its type implies (a family without samples
/// yet still declares its TYPE).
pub fn exported_names(scrape: &str) -> BTreeSet<String> {
    let mut exported = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(base), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            exported.insert(base.to_string());
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[],
            };
            exported.extend(suffixes.iter().map(|s| format!("{base}{s}")));
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            exported.insert(name.to_string());
        }
    }
    exported
}

/// (panel title, metric name) for every `redirector_*` metric the
/// dashboard's queries name; panics on a query naming none.
pub fn queried_metrics() -> Vec<(String, String)> {
    let path = crate::workspace_root().join("deploy/grafana/redirector-node.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard JSON"))
            .expect("the dashboard parses");
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|word| word.starts_with("redirector_"))
                .collect();
            assert!(
                !names.is_empty(),
                "panel {} queries no redirector metric: {expr}",
                panel["title"]
            );
            queried.extend(
                names
                    .into_iter()
                    .map(|n| (panel["title"].to_string(), n.to_string())),
            );
        }
    }
    queried
}

/// The queried metrics `scrape` does not export, among those `relevant`
/// selects.
pub fn missing_from(scrape: &str, relevant: impl Fn(&str) -> bool) -> Vec<(String, String)> {
    let exported = exported_names(scrape);
    queried_metrics()
        .into_iter()
        .filter(|(_, name)| relevant(name) && !exported.contains(name))
        .collect()
}
