//! The operator's declaration of what is Redis: the `targets` key of the
//! targets ConfigMap, one directive per line.
//!
//! ```text
//! # The Redis Cluster pods dial, by Service (the agent resolves its ClusterIPs):
//! service redis/redis-cluster:6379
//! # or by address, or any address on a port:
//! address 10.96.0.50:6379
//! port 6380
//! # Where the proxy discovers the cluster (default: the services and addresses above):
//! seed 10.0.3.17:6379
//!
//! # A Service with a kind is a backend of its own, named NAMESPACE/NAME:
//! service shop/cart:6379 cluster
//! service shop/sessions:6379 standalone replicas shop/sessions-replica:6379
//! service legacy/geo:6380 tcp
//! ```
//!
//! Lines without a kind make up one Redis Cluster backend, `cluster`.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
};

use super::ObjectRef;
use crate::{
    backend::{BackendSpec, Declared, Kind},
    steering::TargetSpec,
};

/// The ConfigMap key holding the directives.
pub const KEY: &str = "targets";

/// The kind a `service` line gives its Service's own backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    Cluster,
    Standalone { replicas: Vec<(ObjectRef, u16)> },
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Directive {
    /// A Service's ClusterIPs on `port`; with a kind, a backend of its own.
    Service {
        service: ObjectRef,
        port: u16,
        kind: Option<ServiceKind>,
    },
    /// One address.
    Address(SocketAddr),
    /// Every address on a port.
    Port(u16),
    /// A cluster node to discover the cluster from.
    Seed(SocketAddr),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

pub fn parse(text: &str) -> Result<Vec<Directive>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fail = |message: String| ParseError {
            line: i + 1,
            message,
        };
        let (word, rest) = line
            .split_once(char::is_whitespace)
            .map_or((line, ""), |(w, r)| (w, r.trim()));
        let directive = match word {
            "service" => {
                let mut words = rest.split_whitespace();
                let first = words.next().unwrap_or_default();
                let (service, port) = parse_service(first).map_err(fail)?;
                let kind = match words.next() {
                    None => None,
                    Some("cluster") => Some(ServiceKind::Cluster),
                    Some("tcp") => Some(ServiceKind::Tcp),
                    Some("standalone") => {
                        let replicas = match words.next() {
                            None => Vec::new(),
                            Some("replicas") => words
                                .by_ref()
                                .map(parse_service)
                                .collect::<Result<Vec<_>, _>>()
                                .map_err(fail)?,
                            Some(other) => {
                                return Err(fail(format!(
                                    "`{other}`: expected `replicas NAMESPACE/NAME:PORT ...`"
                                )));
                            }
                        };
                        Some(ServiceKind::Standalone { replicas })
                    }
                    Some(other) => {
                        return Err(fail(format!(
                            "unknown kind `{other}` (cluster, standalone or tcp)"
                        )));
                    }
                };
                if let Some(extra) = words.next() {
                    return Err(fail(format!("unexpected `{extra}`")));
                }
                Directive::Service {
                    service,
                    port,
                    kind,
                }
            }
            "address" => Directive::Address(parse_addr(rest).map_err(fail)?),
            "port" => Directive::Port(parse_port(rest).map_err(fail)?),
            "seed" => Directive::Seed(parse_addr(rest).map_err(fail)?),
            other => {
                return Err(fail(format!(
                    "unknown directive `{other}` (service, address, port or seed)"
                )));
            }
        };
        out.push(directive);
    }
    Ok(out)
}

fn parse_service(s: &str) -> Result<(ObjectRef, u16), String> {
    let (service, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}` is not NAMESPACE/NAME:PORT"))?;
    Ok((service.parse()?, parse_port(port)?))
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("`{s}` is not a port (1-65535)")),
        Ok(port) => Ok(port),
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("`{s}` is not IP:PORT or [IPv6]:PORT"))?;
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(format!("`{s}` needs a real address and port"));
    }
    Ok(addr)
}

/// A Service as far as targets are concerned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Empty for a headless Service.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<u16>,
}

/// What the directives amount to, given the Services known now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub targets: BTreeSet<TargetSpec>,
    pub seeds: Vec<SocketAddr>,
    /// The backends the lines declare, each with its targets.
    pub backends: Vec<Declared>,
    /// Directives that name nothing usable yet, and why.
    pub unresolved: Vec<String>,
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let targets: Vec<String> = self.targets.iter().map(ToString::to_string).collect();
        write!(f, "targets [{}]", targets.join(", "))
    }
}

/// A Service's ClusterIPs on `port`, or why there are none.
fn service_ips(
    services: &HashMap<ObjectRef, ServiceInfo>,
    service: &ObjectRef,
    port: u16,
) -> Result<Vec<IpAddr>, String> {
    match services.get(service) {
        None => Err(format!("service {service} does not exist")),
        Some(info) if info.cluster_ips.is_empty() => Err(format!(
            "service {service} is headless (no ClusterIP): declare its addresses with `address`"
        )),
        Some(info) if !info.ports.contains(&port) => {
            Err(format!("service {service} has no port {port}"))
        }
        Some(info) => Ok(info.cluster_ips.clone()),
    }
}

pub fn resolve(directives: &[Directive], services: &HashMap<ObjectRef, ServiceInfo>) -> Resolved {
    let mut resolved = Resolved::default();
    let mut fallback_seeds = Vec::new();
    // Lines without a kind: the one cluster backend.
    let mut cluster_targets = Vec::new();
    for directive in directives {
        match directive {
            Directive::Service {
                service,
                port,
                kind,
            } => {
                let ips = match service_ips(services, service, *port) {
                    Ok(ips) => ips,
                    Err(why) => {
                        resolved.unresolved.push(why);
                        continue;
                    }
                };
                let targets: Vec<TargetSpec> = ips
                    .iter()
                    .map(|ip| TargetSpec {
                        addr: Some(*ip),
                        port: *port,
                    })
                    .collect();
                resolved.targets.extend(targets.iter().copied());
                let addrs: Vec<SocketAddr> =
                    ips.iter().map(|ip| SocketAddr::new(*ip, *port)).collect();
                let kind = match kind {
                    None => {
                        cluster_targets.extend(targets);
                        fallback_seeds.extend(addrs);
                        continue;
                    }
                    Some(ServiceKind::Cluster) => Kind::Cluster { seeds: addrs },
                    Some(ServiceKind::Tcp) => Kind::Tcp,
                    Some(ServiceKind::Standalone { replicas }) => Kind::Standalone {
                        primary: addrs[0],
                        replicas: replicas
                            .iter()
                            .filter_map(|(replica, port)| {
                                match service_ips(services, replica, *port) {
                                    Ok(ips) => Some(SocketAddr::new(ips[0], *port)),
                                    Err(why) => {
                                        resolved.unresolved.push(why);
                                        None
                                    }
                                }
                            })
                            .collect(),
                    },
                };
                resolved.backends.push(Declared {
                    spec: BackendSpec {
                        name: service.to_string(),
                        kind,
                    },
                    targets,
                    options: Default::default(),
                    source: format!("service {service}:{port}"),
                });
            }
            Directive::Address(addr) => {
                let target = TargetSpec {
                    addr: Some(addr.ip()),
                    port: addr.port(),
                };
                resolved.targets.insert(target);
                cluster_targets.push(target);
                fallback_seeds.push(*addr);
            }
            Directive::Port(port) => {
                let target = TargetSpec {
                    addr: None,
                    port: *port,
                };
                resolved.targets.insert(target);
                cluster_targets.push(target);
            }
            Directive::Seed(addr) => resolved.seeds.push(*addr),
        }
    }
    if resolved.seeds.is_empty() {
        resolved.seeds = fallback_seeds;
    }
    if !cluster_targets.is_empty() && !resolved.seeds.is_empty() {
        resolved.backends.insert(
            0,
            Declared {
                spec: BackendSpec {
                    name: "cluster".into(),
                    kind: Kind::Cluster {
                        seeds: resolved.seeds.clone(),
                    },
                },
                targets: cluster_targets,
                options: Default::default(),
                source: "targets ConfigMap".into(),
            },
        );
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_parse_with_line_numbers_in_errors() {
        let text = "# comment\nservice redis/redis-cluster:6379\n\naddress 10.96.0.50:6379 # inline\nport 6380\nseed [fd00::7]:6379\n";
        assert_eq!(
            parse(text).unwrap(),
            vec![
                Directive::Service {
                    service: "redis/redis-cluster".parse().unwrap(),
                    port: 6379,
                    kind: None,
                },
                Directive::Address("10.96.0.50:6379".parse().unwrap()),
                Directive::Port(6380),
                Directive::Seed("[fd00::7]:6379".parse().unwrap()),
            ]
        );
        assert_eq!(parse("port 0").unwrap_err().line, 1);
        assert_eq!(parse("\nservice redis:6379").unwrap_err().line, 2);
        assert_eq!(parse("address 0.0.0.0:6379").unwrap_err().line, 1);
        assert!(
            parse("redis 1.2.3.4:5")
                .unwrap_err()
                .message
                .contains("unknown directive")
        );
    }

    #[test]
    fn services_resolve_to_cluster_ips_and_seed_the_cluster() {
        let svc: ObjectRef = "redis/redis-cluster".parse().unwrap();
        let headless: ObjectRef = "redis/redis-headless".parse().unwrap();
        let services = HashMap::from([
            (
                svc.clone(),
                ServiceInfo {
                    cluster_ips: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
                    ports: vec![6379],
                },
            ),
            (
                headless.clone(),
                ServiceInfo {
                    cluster_ips: vec![],
                    ports: vec![6379],
                },
            ),
        ]);
        let directives = parse(
            "service redis/redis-cluster:6379\nservice redis/redis-cluster:7000\nservice redis/redis-headless:6379\nservice redis/missing:6379",
        )
        .unwrap();
        let resolved = resolve(&directives, &services);
        assert_eq!(
            resolved
                .targets
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.96.0.10:6379", "[fd00::10]:6379"]
        );
        assert_eq!(resolved.seeds.len(), 2);
        assert_eq!(resolved.unresolved.len(), 3, "{:?}", resolved.unresolved);
        // Explicit seeds win over the services' addresses.
        let with_seed = resolve(
            &parse("service redis/redis-cluster:6379\nseed 10.0.3.17:6379").unwrap(),
            &services,
        );
        assert_eq!(with_seed.seeds, vec!["10.0.3.17:6379".parse().unwrap()]);
    }
}
