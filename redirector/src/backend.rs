//! Backends: the Redis deployments behind the proxy, each with a kind.
//! `--backend NAME=KIND:ADDR[,ADDR...]`:
//!
//! - `cluster:SEED,...` — a Redis Cluster, discovered from its seeds;
//! - `standalone:PRIMARY[,REPLICA...]` — one primary, replicas for reads;
//! - `tcp:` — a plain relay (no address: the connection's own original
//!   destination).
//!
//! or a `--backends-file` (TOML, one `[[backend]]` table each).
//!
//! Pure: parsing and validation, with errors that name the argument or
//! the file's line.

use std::{net::SocketAddr, path::Path, str::FromStr};

use serde::Deserialize;

use crate::{
    proxy::{AuthMode, ReadPolicy},
    steering::TargetSpec,
};

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

    /// The addresses it was declared with.
    pub fn addresses(&self) -> Vec<String> {
        match self {
            Self::Cluster { seeds } => seeds.iter().map(ToString::to_string).collect(),
            Self::Standalone { primary, replicas } => std::iter::once(primary)
                .chain(replicas)
                .map(ToString::to_string)
                .collect(),
            Self::Tcp => Vec::new(),
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
    #[error("backend `{name}`: the name must be letters, digits, `-`, `_`, `.` or `/`")]
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
    #[error("target {target} maps to two backends: {first} and {second}{sources}")]
    TargetTwice {
        target: TargetSpec,
        first: String,
        second: String,
        /// Where each was declared, when that says more than the names.
        sources: String,
    },
    #[error(
        "backend `{name}` ({source_}) has no target (give --redis-target {name}=IP:PORT, or targets = [...] in the backends file)"
    )]
    NoTarget { name: String, source_: String },
    #[error("--redis-target {target}: no backend is named `{name}`")]
    UnknownBackend { name: String, target: String },
    #[error(
        "--redis-target {target}: several backends are declared, so the target must name one (NAME={target})"
    )]
    UnnamedTarget { target: String },
    #[error("--redis-target `{0}`: {1}")]
    BadTarget(String, String),
    #[error("backends file {path}, line {line}: {message}")]
    File {
        path: String,
        line: usize,
        message: String,
    },
    #[error("cannot read the backends file {path}: {message}")]
    Read { path: String, message: String },
}

/// Per-backend settings beyond its kind; `None`: the daemon's flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub read_policy: Option<ReadPolicy>,
    pub auth: Option<AuthMode>,
    pub allow_admin_commands: Option<bool>,
    /// The proxy's own credentials for this backend (proxy auth mode,
    /// and its control connections): the user, and a file holding the
    /// password (a mounted Secret), read at start.
    pub upstream_user: Option<String>,
    pub upstream_password_file: Option<std::path::PathBuf>,
    /// Limits, as the daemon's flags of the same names.
    pub retry_window: Option<std::time::Duration>,
    pub idle_timeout: Option<std::time::Duration>,
    pub max_pipeline: Option<usize>,
    pub upstream_connections: Option<usize>,
    pub idle_leases: Option<usize>,
}

/// A backend with its targets: what the daemon serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declared {
    pub spec: BackendSpec,
    pub targets: Vec<TargetSpec>,
    pub options: Options,
    /// Where it was declared, for errors (`--backend`, `file.toml, line 3`).
    pub source: String,
}

/// A `--redis-target [NAME=]TARGET`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedTarget {
    pub backend: Option<String>,
    pub target: TargetSpec,
}

impl FromStr for NamedTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((name, target)) => Ok(Self {
                backend: Some(name.trim().to_string()),
                target: target.trim().parse()?,
            }),
            None => Ok(Self {
                backend: None,
                target: s.trim().parse()?,
            }),
        }
    }
}

/// Gives the backends their `--redis-target`s: a named target to the
/// backend of that name, an unnamed one to the only backend there is.
pub fn attach_targets(declared: &mut [Declared], targets: &[NamedTarget]) -> Result<(), Error> {
    for named in targets {
        let index = match &named.backend {
            Some(name) => declared
                .iter()
                .position(|d| &d.spec.name == name)
                .ok_or_else(|| Error::UnknownBackend {
                    name: name.clone(),
                    target: named.target.to_string(),
                })?,
            None if declared.len() == 1 => 0,
            None => {
                return Err(Error::UnnamedTarget {
                    target: named.target.to_string(),
                });
            }
        };
        declared[index].targets.push(named.target);
    }
    Ok(())
}

/// Every name once, every target in one backend, every backend with a
/// target (`needs_targets`: steering is on, so targets are how a backend is
/// reached at all).
pub fn validate_declared(declared: &[Declared], needs_targets: bool) -> Result<(), Error> {
    let specs: Vec<BackendSpec> = declared.iter().map(|d| d.spec.clone()).collect();
    validate(&specs)?;
    let mut owner: std::collections::HashMap<TargetSpec, &Declared> =
        std::collections::HashMap::new();
    for backend in declared {
        if needs_targets && backend.targets.is_empty() {
            return Err(Error::NoTarget {
                name: backend.spec.name.clone(),
                source_: backend.source.clone(),
            });
        }
        for target in &backend.targets {
            if let Some(first) = owner.insert(*target, backend)
                && first.spec.name != backend.spec.name
            {
                let sources = if first.source.contains("line") || backend.source.contains("line") {
                    format!(" (declared at {} and {})", first.source, backend.source)
                } else {
                    String::new()
                };
                return Err(Error::TargetTwice {
                    target: *target,
                    first: first.spec.name.clone(),
                    second: backend.spec.name.clone(),
                    sources,
                });
            }
        }
    }
    Ok(())
}

/// One `[[backend]]` table of a backends file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    name: toml::Spanned<String>,
    kind: toml::Spanned<String>,
    #[serde(default)]
    seeds: Vec<String>,
    primary: Option<String>,
    #[serde(default)]
    replicas: Vec<String>,
    targets: Option<toml::Spanned<Vec<String>>>,
    read_policy: Option<String>,
    auth: Option<String>,
    allow_admin_commands: Option<bool>,
    upstream_user: Option<String>,
    upstream_password_file: Option<String>,
    retry_window: Option<String>,
    idle_timeout: Option<String>,
    max_pipeline: Option<usize>,
    upstream_connections: Option<usize>,
    idle_leases: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoot {
    #[serde(default)]
    backend: Vec<toml::Spanned<FileBackend>>,
}

/// Reads a backends file.
pub fn read_file(path: &Path) -> Result<Vec<Declared>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    parse_file(&path.display().to_string(), &text)
}

/// Parses a backends file's text; errors name `path` and the line.
pub fn parse_file(path: &str, text: &str) -> Result<Vec<Declared>, Error> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let fail = |offset: usize, message: String| Error::File {
        path: path.into(),
        line: line_of(offset),
        message,
    };
    let root: FileRoot = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        fail(offset, e.message().to_string())
    })?;
    let mut out = Vec::new();
    for table in root.backend {
        let at = table.span().start;
        let b = table.into_inner();
        let name = b.name.get_ref().clone();
        let kind_at = b.kind.span().start;
        let mut addrs: Vec<String> = match b.kind.get_ref().as_str() {
            "cluster" => b.seeds.clone(),
            "standalone" => b.primary.iter().chain(&b.replicas).cloned().collect(),
            _ => Vec::new(),
        };
        if b.kind.get_ref() == "standalone" && b.primary.is_none() {
            addrs.clear();
        }
        let arg = format!("{name}={}:{}", b.kind.get_ref(), addrs.join(","));
        let spec: BackendSpec = arg
            .parse()
            .map_err(|e: Error| fail(kind_at, e.to_string()))?;
        let targets_at = b.targets.as_ref().map_or(at, |t| t.span().start);
        let targets = b
            .targets
            .as_ref()
            .map(|t| t.get_ref().as_slice())
            .unwrap_or_default()
            .iter()
            .map(|t| {
                t.parse::<TargetSpec>()
                    .map_err(|e| fail(targets_at, format!("target `{t}`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let read_policy = b
            .read_policy
            .as_deref()
            .map(|p| {
                <ReadPolicy as clap::ValueEnum>::from_str(p, true)
                    .map_err(|_| fail(at, format!("backend `{name}`: unknown read_policy `{p}` (master, prefer-master, replica, prefer-replica, any)")))
            })
            .transpose()?;
        let auth = b
            .auth
            .as_deref()
            .map(|a| {
                <AuthMode as clap::ValueEnum>::from_str(a, true).map_err(|_| {
                    fail(
                        at,
                        format!("backend `{name}`: unknown auth `{a}` (passthrough, proxy)"),
                    )
                })
            })
            .transpose()?;
        let duration = |field: &str, value: &Option<String>| {
            value
                .as_deref()
                .map(|v| {
                    crate::config::parse_duration(v)
                        .map_err(|e| fail(at, format!("backend `{name}`: {field}: {e}")))
                })
                .transpose()
        };
        out.push(Declared {
            spec,
            targets,
            options: Options {
                read_policy,
                auth,
                allow_admin_commands: b.allow_admin_commands,
                upstream_user: b.upstream_user.clone(),
                upstream_password_file: b.upstream_password_file.as_ref().map(Into::into),
                retry_window: duration("retry_window", &b.retry_window)?,
                idle_timeout: duration("idle_timeout", &b.idle_timeout)?,
                max_pipeline: b.max_pipeline,
                upstream_connections: b.upstream_connections,
                idle_leases: b.idle_leases,
            },
            source: format!("{path}, line {}", line_of(at)),
        });
    }
    // Duplicates and target conflicts, named with their lines.
    for (i, backend) in out.iter().enumerate() {
        if let Some(first) = out[..i].iter().find(|b| b.spec.name == backend.spec.name) {
            return Err(Error::File {
                path: path.into(),
                line: line_number(&backend.source),
                message: format!(
                    "backend `{}` is declared twice (first at {})",
                    backend.spec.name, first.source
                ),
            });
        }
        for target in &backend.targets {
            if let Some(first) = out[..i].iter().find(|b| b.targets.contains(target)) {
                return Err(Error::File {
                    path: path.into(),
                    line: line_number(&backend.source),
                    message: format!(
                        "target {target} maps to two backends: {} ({}) and {}",
                        first.spec.name, first.source, backend.spec.name
                    ),
                });
            }
        }
    }
    Ok(out)
}

fn line_number(source: &str) -> usize {
    source
        .rsplit_once("line ")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

impl FromStr for BackendSpec {
    type Err = Error;

    fn from_str(arg: &str) -> Result<Self, Error> {
        let syntax = || Error::Syntax { arg: arg.into() };
        let (name, rest) = arg.split_once('=').ok_or_else(syntax)?;
        let (kind, addrs) = rest.split_once(':').unwrap_or((rest, ""));
        let name = name.trim().to_string();
        // `/` and `.`: backends named for Services (`shop/cart`).
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
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

    const FILE: &str = r#"
[[backend]]
name = "cart"
kind = "cluster"
seeds = ["10.0.1.10:6379"]
targets = ["10.96.0.10:6379"]

[[backend]]
name = "sessions"
kind = "standalone"
primary = "10.0.3.7:6379"
replicas = ["10.0.3.8:6379"]
targets = ["10.96.0.20:6379"]
read_policy = "prefer-replica"
auth = "proxy"
retry_window = "2s"
upstream_connections = 2

[[backend]]
name = "tiles"
kind = "tcp"
targets = [":9851"]
"#;

    #[test]
    fn a_backends_file_declares_kinds_targets_and_settings() {
        let declared = parse_file("b.toml", FILE).unwrap();
        let names: Vec<&str> = declared.iter().map(|d| d.spec.name.as_str()).collect();
        assert_eq!(names, ["cart", "sessions", "tiles"]);
        assert_eq!(
            declared[1].spec.kind,
            Kind::Standalone {
                primary: addr("10.0.3.7:6379"),
                replicas: vec![addr("10.0.3.8:6379")]
            }
        );
        assert_eq!(
            declared[1].options.read_policy,
            Some(ReadPolicy::PreferReplica)
        );
        assert_eq!(declared[1].options.auth, Some(AuthMode::Proxy));
        assert_eq!(
            declared[1].options.retry_window,
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(declared[1].options.upstream_connections, Some(2));
        assert_eq!(declared[2].targets, vec![":9851".parse().unwrap()]);
        assert_eq!(declared[1].source, "b.toml, line 8");
        validate_declared(&declared, true).unwrap();
    }

    #[test]
    fn a_bad_backends_file_is_refused_naming_the_line() {
        let err = |text: &str| parse_file("b.toml", text).unwrap_err().to_string();
        let unknown = FILE.replace(r#"kind = "tcp""#, r#"kind = "memcached""#);
        let message = err(&unknown);
        assert!(
            message.contains("b.toml, line 21") && message.contains("unknown kind `memcached`"),
            "{message}"
        );
        let twice = FILE.replace(r#"targets = [":9851"]"#, r#"targets = ["10.96.0.10:6379"]"#);
        let message = err(&twice);
        assert!(
            message.contains("line 19")
                && message.contains("10.96.0.10:6379 maps to two backends: cart")
                && message.contains("tiles"),
            "{message}"
        );
        let typo = FILE.replace("read_policy", "read_polcy");
        assert!(err(&typo).contains("line 14"), "{}", err(&typo));
        let bad_window = FILE.replace(r#""2s""#, r#""2 parsecs""#);
        assert!(
            err(&bad_window).contains("retry_window"),
            "{}",
            err(&bad_window)
        );
        let bad_addr = FILE.replace("10.0.3.8:6379", "redis-replica:6379");
        assert!(err(&bad_addr).contains("line 10"), "{}", err(&bad_addr));
        // A backend with no target is caught when the declarations are
        // validated (steering on: targets are how it is reached).
        let untargeted = parse_file("b.toml", &FILE.replace(r#"targets = [":9851"]"#, "")).unwrap();
        assert_eq!(
            validate_declared(&untargeted, true),
            Err(Error::NoTarget {
                name: "tiles".into(),
                source_: "b.toml, line 19".into()
            })
        );
    }

    #[test]
    fn command_line_targets_go_to_the_backend_they_name() {
        let mut declared = parse_file("b.toml", FILE).unwrap();
        attach_targets(&mut declared, &["cart=10.96.0.11:6379".parse().unwrap()]).unwrap();
        assert_eq!(declared[0].targets.len(), 2);
        assert!(matches!(
            attach_targets(&mut declared, &["10.96.0.12:6379".parse().unwrap()]),
            Err(Error::UnnamedTarget { .. })
        ));
        assert!(matches!(
            attach_targets(&mut declared, &["nope=10.96.0.12:6379".parse().unwrap()]),
            Err(Error::UnknownBackend { .. })
        ));
        let mut dup = declared.clone();
        attach_targets(&mut dup, &["sessions=10.96.0.10:6379".parse().unwrap()]).unwrap();
        assert_eq!(
            validate_declared(&dup, true).unwrap_err().to_string(),
            "target 10.96.0.10:6379 maps to two backends: cart and sessions (declared at b.toml, \
             line 2 and b.toml, line 8)"
        );
    }
}
