//! INFO as one Redis would print it: every section and field of the Redis
//! version behind the proxy, merged over the masters, with the proxy's own
//! figures where they are the proxy's (its clients, its connections) and a
//! `# Proxy` section for redirector itself. Pure: the nodes' INFO texts in,
//! the client's text out.
//!
//! Counters are summed; peaks and maxima are the largest; ratios are
//! averaged; `*_human` fields are recomputed from their summed byte
//! counts; keyspace lines are summed per database; per-command and
//! per-error statistics are summed field by field.

use std::collections::BTreeMap;

/// Sections INFO prints with no argument (and `default`).
const DEFAULT_SECTIONS: &[&str] = &[
    "server",
    "clients",
    "memory",
    "persistence",
    "stats",
    "replication",
    "cpu",
    "module_list",
    "errorstats",
    "cluster",
    "keyspace",
    "proxy",
];
/// `all`: every section but modules' own; `everything`: all of them.
const ALL_EXTRA: &[&str] = &["commandstats", "latencystats"];

/// The proxy's own figures for INFO.
#[derive(Clone, Debug, Default)]
pub struct ProxyFigures {
    pub process_id: u32,
    pub tcp_port: u16,
    pub uptime_secs: u64,
    pub connected_clients: usize,
    pub blocked_clients: usize,
    pub tracking_clients: usize,
    pub pubsub_clients: usize,
    pub maxclients: usize,
    pub total_connections: u64,
    pub rejected_connections: u64,
    /// Lines of the `# Proxy` section (`field:value`).
    pub proxy_section: Vec<(String, String)>,
    /// Errors the proxy answered itself (refusals never reach a node), by
    /// error code: added to errorstats and total_error_replies.
    pub local_errors: BTreeMap<String, u64>,
}

/// The sections `args` (INFO's arguments, lowercase) ask for, in Redis's
/// order; `None` for every section (`all`/`everything`).
pub fn requested(args: &[String]) -> Vec<String> {
    if args.is_empty() {
        return DEFAULT_SECTIONS.iter().map(ToString::to_string).collect();
    }
    let mut out: Vec<String> = Vec::new();
    for arg in args {
        let names: Vec<&str> = match arg.as_str() {
            "default" => DEFAULT_SECTIONS.to_vec(),
            "all" | "everything" => DEFAULT_SECTIONS.iter().chain(ALL_EXTRA).copied().collect(),
            other => vec![other],
        };
        for name in names {
            if !out.iter().any(|n| n == name) {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// What to ask the nodes for: the requested sections but the proxy's own.
pub fn node_args(sections: &[String]) -> Vec<String> {
    sections
        .iter()
        .filter(|s| s.as_str() != "proxy")
        .cloned()
        .collect()
}

/// A section: its name (lowercase) and its `field:value` lines.
type Section = (String, Vec<(String, String)>);

/// One node's INFO text as sections.
fn parse(text: &str) -> Vec<Section> {
    let mut sections: Vec<Section> = Vec::new();
    for line in text.lines().map(str::trim_end) {
        if let Some(title) = line.strip_prefix("# ") {
            sections.push((title.to_ascii_lowercase(), Vec::new()));
        } else if let Some((field, value)) = line.split_once(':')
            && let Some((_, fields)) = sections.last_mut()
        {
            fields.push((field.to_string(), value.to_string()));
        }
    }
    sections
}

/// Section titles as Redis writes them.
fn title(section: &str) -> String {
    match section {
        "cpu" => "CPU".into(),
        "module_list" => "Modules".into(),
        "commandstats" => "Commandstats".into(),
        "errorstats" => "Errorstats".into(),
        "latencystats" => "Latencystats".into(),
        other => {
            let mut chars = other.chars();
            chars.next().map_or_else(String::new, |c| {
                c.to_uppercase().collect::<String>() + chars.as_str()
            })
        }
    }
}

/// The merged text, sections in the order asked for.
pub fn merge(sections: &[String], nodes: &[String], proxy: &ProxyFigures) -> String {
    let parsed: Vec<Vec<Section>> = nodes.iter().map(|t| parse(t)).collect();
    let mut out = String::new();
    for section in sections {
        let fields: Vec<&Vec<(String, String)>> = parsed
            .iter()
            .filter_map(|node| node.iter().find(|(s, _)| s == section).map(|(_, f)| f))
            .collect();
        let merged = match section.as_str() {
            "proxy" => Some(proxy.proxy_section.clone()),
            _ if fields.is_empty() => None,
            "keyspace" => Some(keyspace(&fields)),
            "commandstats" | "latencystats" => Some(per_field_stats(section, &fields)),
            "errorstats" => Some(errorstats(&fields, &proxy.local_errors)),
            _ => Some(plain(section, &fields, proxy)),
        };
        let Some(merged) = merged else { continue };
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        out.push_str(&format!("# {}\r\n", title(section)));
        for (field, value) in merged {
            out.push_str(&format!("{field}:{value}\r\n"));
        }
    }
    out
}

/// The proxy's own value of a field, where the field is about the server
/// the client talks to.
fn proxy_value(section: &str, field: &str, proxy: &ProxyFigures) -> Option<String> {
    Some(match (section, field) {
        ("server", "process_id") => proxy.process_id.to_string(),
        ("server", "tcp_port") => proxy.tcp_port.to_string(),
        ("server", "uptime_in_seconds") => proxy.uptime_secs.to_string(),
        ("server", "uptime_in_days") => (proxy.uptime_secs / 86_400).to_string(),
        ("clients", "connected_clients") => proxy.connected_clients.to_string(),
        ("clients", "blocked_clients") => proxy.blocked_clients.to_string(),
        ("clients", "tracking_clients") => proxy.tracking_clients.to_string(),
        ("clients", "pubsub_clients") => proxy.pubsub_clients.to_string(),
        ("clients", "maxclients") => proxy.maxclients.to_string(),
        ("clients", "cluster_connections") => "0".into(),
        ("stats", "total_connections_received") => proxy.total_connections.to_string(),
        ("stats", "rejected_connections") => proxy.rejected_connections.to_string(),
        ("replication", "role") => "master".into(),
        _ => return None,
    })
}

/// Sections of `field:value` lines.
fn plain(
    section: &str,
    nodes: &[&Vec<(String, String)>],
    proxy: &ProxyFigures,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let first = nodes[0];
    for (field, value) in first {
        // A node's own replicas are its own business.
        if section == "replication"
            && field.starts_with("slave")
            && field[5..].chars().all(|c| c.is_ascii_digit())
        {
            continue;
        }
        if let Some(own) = proxy_value(section, field, proxy) {
            out.push((field.clone(), own));
            continue;
        }
        // Who answers, right under the Redis version it speaks for: tools
        // that read only `INFO server` still see the proxy.
        if section == "server" && field == "redis_version" {
            out.push((field.clone(), value.clone()));
            out.extend(
                proxy
                    .proxy_section
                    .iter()
                    .find(|(f, _)| f == "redirector_version")
                    .cloned(),
            );
            continue;
        }
        let values: Vec<&str> = nodes
            .iter()
            .filter_map(|n| n.iter().find(|(f, _)| f == field).map(|(_, v)| v.as_str()))
            .collect();
        out.push((field.clone(), combine(section, field, value, &values)));
    }
    if section == "stats"
        && let Some((_, total)) = out.iter_mut().find(|(f, _)| f == "total_error_replies")
    {
        let local: u64 = proxy.local_errors.values().sum();
        *total = (total.parse::<u64>().unwrap_or(0) + local).to_string();
    }
    // `*_human` after their byte counts are known.
    let snapshot = out.clone();
    for (field, value) in &mut out {
        if let Some(base) = field.strip_suffix("_human")
            && let Some((_, bytes)) = snapshot.iter().find(|(f, _)| f == base)
            && let Ok(bytes) = bytes.parse::<u64>()
        {
            *value = bytes_to_human(bytes);
        }
    }
    out
}

/// One field over the nodes.
fn combine(section: &str, field: &str, first: &str, values: &[&str]) -> String {
    if values.iter().all(|v| v == &first) && !is_counter(section, field) {
        return first.to_string();
    }
    let numbers: Option<Vec<f64>> = values
        .iter()
        .map(|v| v.trim_end_matches('%').parse::<f64>().ok())
        .collect();
    let Some(numbers) = numbers else {
        // Status words: ok unless a node says otherwise.
        if field.ends_with("_status") {
            return values
                .iter()
                .find(|v| **v != "ok")
                .unwrap_or(&first)
                .to_string();
        }
        return first.to_string();
    };
    let integer = values.iter().all(|v| v.parse::<i64>().is_ok());
    let percent = first.ends_with('%');
    let kind = rule(field);
    let result = match kind {
        Rule::Max => numbers.iter().copied().fold(f64::MIN, f64::max),
        Rule::Min => numbers.iter().copied().fold(f64::MAX, f64::min),
        Rule::Average => numbers.iter().sum::<f64>() / numbers.len().max(1) as f64,
        Rule::Sum => numbers.iter().sum(),
        Rule::First => return first.to_string(),
    };
    if percent {
        format!("{result:.2}%")
    } else if integer && kind != Rule::Average {
        format!("{}", result as i64)
    } else {
        format!("{result:.2}")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    Sum,
    Max,
    Min,
    Average,
    First,
}

fn rule(field: &str) -> Rule {
    let latest = (field.contains("_last_") && field.ends_with("_sec"))
        || field.ends_with("_time_sec")
        || field == "lru_clock"
        || field == "server_time_usec";
    // Every master tracks the same BCAST prefixes (the proxy registers
    // them on each shard), and holds the same scripts and functions (the
    // proxy loads them everywhere) in a Lua VM of its own: one Redis has
    // them once. Copies, not partitions: the largest, not the sum.
    if field.contains("peak")
        || field.contains("max")
        || field == "tracking_total_prefixes"
        || field == "number_of_cached_scripts"
        || field == "number_of_functions"
        || field == "number_of_libraries"
        || field.starts_with("used_memory_lua")
        || field.starts_with("used_memory_vm_")
        || field.starts_with("used_memory_scripts")
        || field == "used_memory_functions"
        || field.ends_with("_in_progress")
        || field == "loading"
        || latest
    {
        Rule::Max
    } else if field.contains("last_save_time") || field == "rdb_last_cow_size" {
        Rule::Min
    } else if field.ends_with("_ratio") || field.ends_with("_perc") {
        Rule::Average
    } else if field.ends_with("_id")
        || field.contains("replid")
        || field == "hz"
        || field == "configured_hz"
        || field == "arch_bits"
        || field == "tcp_port"
    {
        Rule::First
    } else {
        Rule::Sum
    }
}

/// Fields that must be summed even when every node has the same value.
fn is_counter(section: &str, field: &str) -> bool {
    (matches!(section, "stats" | "cpu" | "memory" | "persistence") && rule(field) == Rule::Sum)
        || (section, field) == ("replication", "connected_slaves")
}

/// `db0:keys=N,expires=M,avg_ttl=T`, summed per database (avg_ttl
/// weighted by keys with a TTL).
fn keyspace(nodes: &[&Vec<(String, String)>]) -> Vec<(String, String)> {
    let mut dbs: Vec<(String, u64, u64, u128)> = Vec::new();
    for node in nodes {
        for (db, value) in node.iter() {
            let get = |name: &str| {
                value
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let (keys, expires, ttl) = (get("keys"), get("expires"), get("avg_ttl"));
            match dbs.iter_mut().find(|(d, ..)| d == db) {
                Some((_, k, e, weighted)) => {
                    *k += keys;
                    *e += expires;
                    *weighted += u128::from(ttl) * u128::from(expires);
                }
                None => dbs.push((
                    db.clone(),
                    keys,
                    expires,
                    u128::from(ttl) * u128::from(expires),
                )),
            }
        }
    }
    dbs.sort_by(|a, b| a.0.cmp(&b.0));
    dbs.into_iter()
        .map(|(db, keys, expires, weighted)| {
            let avg = if expires == 0 {
                0
            } else {
                weighted / u128::from(expires)
            };
            (db, format!("keys={keys},expires={expires},avg_ttl={avg}"))
        })
        .collect()
}

/// `cmdstat_get:calls=1,usec=2,usec_per_call=2.00,rejected_calls=0,failed_calls=0`
/// summed per field (per-call figures recomputed); latency percentiles:
/// the worst node's.
fn per_field_stats(section: &str, nodes: &[&Vec<(String, String)>]) -> Vec<(String, String)> {
    let mut rows: Vec<(String, Vec<(String, f64)>)> = Vec::new();
    for node in nodes {
        for (name, value) in node.iter() {
            let fields: Vec<(String, f64)> = value
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect();
            match rows.iter_mut().find(|(n, _)| n == name) {
                Some((_, acc)) => {
                    for (k, v) in fields {
                        match acc.iter_mut().find(|(ak, _)| *ak == k) {
                            Some((_, av)) if section == "latencystats" => *av = av.max(v),
                            Some((_, av)) => *av += v,
                            None => acc.push((k, v)),
                        }
                    }
                }
                None => rows.push((name.clone(), fields)),
            }
        }
    }
    rows.into_iter()
        .map(|(name, mut fields)| {
            let get =
                |k: &str, f: &[(String, f64)]| f.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
            if let (Some(calls), Some(usec)) = (get("calls", &fields), get("usec", &fields))
                && let Some((_, per)) = fields.iter_mut().find(|(k, _)| k == "usec_per_call")
            {
                *per = if calls > 0.0 { usec / calls } else { 0.0 };
            }
            let value = fields
                .iter()
                .map(|(k, v)| {
                    if k == "usec_per_call" || section == "latencystats" {
                        format!("{k}={v:.3}")
                    } else {
                        format!("{k}={}", *v as i64)
                    }
                })
                .collect::<Vec<_>>()
                .join(",");
            (name, fix_per_call(&value))
        })
        .collect()
}

/// usec_per_call as Redis prints it (two decimals).
fn fix_per_call(value: &str) -> String {
    value
        .split(',')
        .map(|kv| match kv.split_once('=') {
            Some(("usec_per_call", v)) => {
                format!("usec_per_call={:.2}", v.parse::<f64>().unwrap_or(0.0))
            }
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `errorstat_ERR:count=N` summed, plus the proxy's own refusals.
fn errorstats(
    nodes: &[&Vec<(String, String)>],
    local: &BTreeMap<String, u64>,
) -> Vec<(String, String)> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for node in nodes {
        for (name, value) in node.iter() {
            let n = value
                .strip_prefix("count=")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            *counts.entry(name.clone()).or_default() += n;
        }
    }
    for (code, n) in local {
        *counts.entry(format!("errorstat_{code}")).or_default() += n;
    }
    counts
        .into_iter()
        .map(|(name, n)| (name, format!("count={n}")))
        .collect()
}

/// Redis's `bytesToHuman`.
pub fn bytes_to_human(n: u64) -> String {
    let n = n as f64;
    const K: f64 = 1024.0;
    if n < K {
        format!("{}B", n as u64)
    } else if n < K * K {
        format!("{:.2}K", n / K)
    } else if n < K * K * K {
        format!("{:.2}M", n / (K * K))
    } else if n < K * K * K * K {
        format!("{:.2}G", n / (K * K * K))
    } else if n < K * K * K * K * K {
        format!("{:.2}T", n / (K * K * K * K))
    } else {
        format!("{:.2}P", n / (K * K * K * K * K))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "# Server\r\nredis_version:7.0.15\r\nprocess_id:11\r\ntcp_port:7000\r\nuptime_in_seconds:100\r\n\r\n# Clients\r\nconnected_clients:3\r\nblocked_clients:0\r\nmaxclients:10000\r\n\r\n# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\nused_memory_peak:2000000\r\nmem_fragmentation_ratio:2.00\r\n\r\n# Stats\r\ntotal_connections_received:9\r\ntotal_commands_processed:100\r\nkeyspace_hits:4\r\ntotal_error_replies:1\r\n\r\n# Replication\r\nrole:master\r\nconnected_slaves:1\r\nslave0:ip=10.0.0.4,port=7003,state=online,offset=1,lag=0\r\n\r\n# Errorstats\r\nerrorstat_ERR:count=1\r\n\r\n# Keyspace\r\ndb0:keys=10,expires=2,avg_ttl=1000\r\n";
    const B: &str = "# Server\r\nredis_version:7.0.15\r\nprocess_id:12\r\ntcp_port:7001\r\nuptime_in_seconds:50\r\n\r\n# Clients\r\nconnected_clients:5\r\nblocked_clients:1\r\nmaxclients:10000\r\n\r\n# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\nused_memory_peak:3000000\r\nmem_fragmentation_ratio:1.00\r\n\r\n# Stats\r\ntotal_connections_received:7\r\ntotal_commands_processed:50\r\nkeyspace_hits:6\r\ntotal_error_replies:2\r\n\r\n# Replication\r\nrole:master\r\nconnected_slaves:1\r\n\r\n# Errorstats\r\nerrorstat_ERR:count=2\r\nerrorstat_WRONGTYPE:count=1\r\n\r\n# Keyspace\r\ndb0:keys=20,expires=6,avg_ttl=3000\r\n";

    fn figures() -> ProxyFigures {
        ProxyFigures {
            process_id: 42,
            tcp_port: 15379,
            uptime_secs: 5,
            connected_clients: 2,
            blocked_clients: 1,
            maxclients: 10000,
            total_connections: 3,
            proxy_section: vec![("redirector_version".into(), "0.1.0".into())],
            local_errors: BTreeMap::from([("CROSSSLOT".into(), 2)]),
            ..ProxyFigures::default()
        }
    }

    #[test]
    fn fields_merge_as_one_redis() {
        let text = merge(&requested(&[]), &[A.into(), B.into()], &figures());
        for expected in [
            "# Server\r\nredis_version:7.0.15\r\nredirector_version:0.1.0\r\nprocess_id:42\r\ntcp_port:15379\r\nuptime_in_seconds:5\r\n",
            "connected_clients:2\r\nblocked_clients:1\r\n",
            "used_memory:2097152\r\nused_memory_human:2.00M\r\nused_memory_peak:3000000\r\nmem_fragmentation_ratio:1.50\r\n",
            "total_connections_received:3\r\ntotal_commands_processed:150\r\nkeyspace_hits:10\r\ntotal_error_replies:5\r\n",
            "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\r\n",
            "errorstat_CROSSSLOT:count=2\r\nerrorstat_ERR:count=3\r\nerrorstat_WRONGTYPE:count=1\r\n",
            "db0:keys=30,expires=8,avg_ttl=2500\r\n",
            "# Proxy\r\nredirector_version:0.1.0\r\n",
        ] {
            assert!(text.contains(expected), "no {expected:?} in\n{text}");
        }
        assert!(!text.contains("slave0"), "{text}");
    }

    #[test]
    fn sections_are_chosen_as_redis_chooses_them() {
        assert_eq!(
            requested(&["memory".into(), "server".into()]),
            ["memory", "server"]
        );
        assert!(requested(&["everything".into()]).contains(&"commandstats".to_string()));
        assert!(!requested(&[]).contains(&"commandstats".to_string()));
        assert_eq!(
            node_args(&requested(&["proxy".into()])),
            Vec::<String>::new()
        );
        let only = merge(&requested(&["keyspace".into()]), &[A.into()], &figures());
        assert_eq!(only, "# Keyspace\r\ndb0:keys=10,expires=2,avg_ttl=1000\r\n");
    }

    #[test]
    fn command_statistics_sum_per_field() {
        let a = "# Commandstats\r\ncmdstat_get:calls=2,usec=10,usec_per_call=5.00,rejected_calls=0,failed_calls=1\r\n";
        let b = "# Commandstats\r\ncmdstat_get:calls=3,usec=20,usec_per_call=6.67,rejected_calls=1,failed_calls=0\r\n";
        let text = merge(&["commandstats".into()], &[a.into(), b.into()], &figures());
        assert_eq!(
            text,
            "# Commandstats\r\ncmdstat_get:calls=5,usec=30,usec_per_call=6.00,rejected_calls=1,failed_calls=1\r\n"
        );
    }

    #[test]
    fn human_sizes_print_as_redis() {
        assert_eq!(bytes_to_human(512), "512B");
        assert_eq!(bytes_to_human(1536), "1.50K");
        assert_eq!(bytes_to_human(3 * 1024 * 1024 * 1024), "3.00G");
    }
}
