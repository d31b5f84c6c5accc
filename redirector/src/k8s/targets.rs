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
//! ```

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
};

use super::ObjectRef;
use crate::steering::TargetSpec;

/// The ConfigMap key holding the directives.
pub const KEY: &str = "targets";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Directive {
    /// A Service's ClusterIPs on `port`.
    Service { service: ObjectRef, port: u16 },
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
                let (service, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| fail(format!("`{rest}` is not NAMESPACE/NAME:PORT")))?;
                Directive::Service {
                    service: service.parse().map_err(fail)?,
                    port: parse_port(port).map_err(fail)?,
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
    /// Directives that name nothing usable yet, and why.
    pub unresolved: Vec<String>,
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let targets: Vec<String> = self.targets.iter().map(ToString::to_string).collect();
        write!(f, "targets [{}]", targets.join(", "))
    }
}

pub fn resolve(directives: &[Directive], services: &HashMap<ObjectRef, ServiceInfo>) -> Resolved {
    let mut resolved = Resolved::default();
    let mut fallback_seeds = Vec::new();
    for directive in directives {
        match directive {
            Directive::Service { service, port } => match services.get(service) {
                None => resolved
                    .unresolved
                    .push(format!("service {service} does not exist")),
                Some(info) if info.cluster_ips.is_empty() => resolved.unresolved.push(format!(
                    "service {service} is headless (no ClusterIP): declare its addresses with `address`"
                )),
                Some(info) if !info.ports.contains(port) => resolved
                    .unresolved
                    .push(format!("service {service} has no port {port}")),
                Some(info) => {
                    for ip in &info.cluster_ips {
                        resolved.targets.insert(TargetSpec {
                            addr: Some(*ip),
                            port: *port,
                        });
                        fallback_seeds.push(SocketAddr::new(*ip, *port));
                    }
                }
            },
            Directive::Address(addr) => {
                resolved.targets.insert(TargetSpec {
                    addr: Some(addr.ip()),
                    port: addr.port(),
                });
                fallback_seeds.push(*addr);
            }
            Directive::Port(port) => {
                resolved.targets.insert(TargetSpec {
                    addr: None,
                    port: *port,
                });
            }
            Directive::Seed(addr) => resolved.seeds.push(*addr),
        }
    }
    if resolved.seeds.is_empty() {
        resolved.seeds = fallback_seeds;
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
                    port: 6379
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
