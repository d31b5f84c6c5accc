//! Backends: the Redis deployments behind the proxy, each with a kind.
//! `--backend NAME=KIND:ADDR[,ADDR...]`:
//!
//! - `cluster:SEED,...` — a Redis Cluster, discovered from its seeds;
//! - `standalone:PRIMARY[,REPLICA...]` — one primary, replicas for reads;
//! - `tcp:` — a plain relay (no address: the connection's own original
//!   destination).
//!
//! Pure: parsing and validation, with errors that name the argument.

use std::{net::SocketAddr, str::FromStr};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Cluster {
        seeds: Vec<SocketAddr>,
    },
    Standalone {
        primary: SocketAddr,
        replicas: Vec<SocketAddr>,
    },
    Tcp,
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cluster { .. } => "cluster",
            Self::Standalone { .. } => "standalone",
            Self::Tcp => "tcp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("backend `{arg}`: expected NAME=KIND:ADDR[,ADDR...] (kinds: cluster, standalone, tcp)")]
    Syntax { arg: String },
    #[error("backend `{name}`: the name must be letters, digits, `-` or `_`")]
    BadName { name: String },
    #[error("backend `{name}`: unknown kind `{kind}` (kinds: cluster, standalone, tcp)")]
    UnknownKind { name: String, kind: String },
    #[error("backend `{name}`: `{addr}` is not an IP:PORT address")]
    BadAddress { name: String, addr: String },
    #[error("backend `{name}`: a {kind} backend needs at least one address")]
    NoAddress { name: String, kind: &'static str },
    #[error(
        "backend `{name}`: a tcp backend takes no address (it relays to where the client connected)"
    )]
    TcpAddress { name: String },
    #[error("backend `{name}` is declared twice")]
    Duplicate { name: String },
}

impl FromStr for BackendSpec {
    type Err = Error;

    fn from_str(arg: &str) -> Result<Self, Error> {
        let syntax = || Error::Syntax { arg: arg.into() };
        let (name, rest) = arg.split_once('=').ok_or_else(syntax)?;
        let (kind, addrs) = rest.split_once(':').unwrap_or((rest, ""));
        let name = name.trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::BadName { name });
        }
        let addrs = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|_| Error::BadAddress {
                    name: name.clone(),
                    addr: a.into(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let kind = match kind.trim() {
            "cluster" if addrs.is_empty() => {
                return Err(Error::NoAddress {
                    name,
                    kind: "cluster",
                });
            }
            "cluster" => Kind::Cluster { seeds: addrs },
            "standalone" => {
                let Some((&primary, replicas)) = addrs.split_first() else {
                    return Err(Error::NoAddress {
                        name,
                        kind: "standalone",
                    });
                };
                Kind::Standalone {
                    primary,
                    replicas: replicas.to_vec(),
                }
            }
            "tcp" if !addrs.is_empty() => return Err(Error::TcpAddress { name }),
            "tcp" => Kind::Tcp,
            other => {
                return Err(Error::UnknownKind {
                    name,
                    kind: other.into(),
                });
            }
        };
        Ok(Self { name, kind })
    }
}

/// Backends given on the command line: every name once.
pub fn validate(backends: &[BackendSpec]) -> Result<(), Error> {
    for (i, backend) in backends.iter().enumerate() {
        if backends[..i].iter().any(|b| b.name == backend.name) {
            return Err(Error::Duplicate {
                name: backend.name.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_kind_is_read_from_its_flag() {
        assert_eq!(
            "cart=cluster:10.0.0.1:6379,10.0.0.2:6379".parse(),
            Ok(BackendSpec {
                name: "cart".into(),
                kind: Kind::Cluster {
                    seeds: vec![addr("10.0.0.1:6379"), addr("10.0.0.2:6379")]
                }
            })
        );
        assert_eq!(
            "sessions=standalone:10.0.1.1:6379, 10.0.1.2:6379".parse(),
            Ok(BackendSpec {
                name: "sessions".into(),
                kind: Kind::Standalone {
                    primary: addr("10.0.1.1:6379"),
                    replicas: vec![addr("10.0.1.2:6379")]
                }
            })
        );
        assert_eq!(
            "legacy=tcp".parse::<BackendSpec>().map(|b| b.kind),
            Ok(Kind::Tcp)
        );
    }

    #[test]
    fn mistakes_are_named() {
        let err = |s: &str| s.parse::<BackendSpec>().unwrap_err().to_string();
        assert!(err("cart").contains("expected NAME=KIND:ADDR"));
        assert!(err("cart=memcached:1.2.3.4:1").contains("unknown kind `memcached`"));
        assert!(err("cart=cluster:").contains("needs at least one address"));
        assert!(err("cart=standalone:redis:6379").contains("`redis:6379` is not an IP:PORT"));
        assert!(err("cart=tcp:1.2.3.4:6379").contains("takes no address"));
        assert!(err("ca rt=tcp").contains("the name must be"));
        let twice = ["a=tcp".parse().unwrap(), "a=tcp".parse().unwrap()];
        assert_eq!(validate(&twice), Err(Error::Duplicate { name: "a".into() }));
    }
}
