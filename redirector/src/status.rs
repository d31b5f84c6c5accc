//! `redirector status`: what the kernel is doing right now, read from the
//! pins alone, so it works whether or not the daemon is up.

use std::{
    fmt, fs,
    net::SocketAddr,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use redirector_ebpf::{Counters, program_names};
use serde::Serialize;

use crate::steering::{
    self, Error, Layout, Maps, OrigDstTable, bytes_to_ip,
    coexist::{self, ForeignProgram},
    sys,
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub programs: Vec<ProgramStatus>,
    /// Programs that run on our connect hooks before ours (they may rewrite
    /// a Service address before we see it).
    pub programs_ahead: Vec<ForeignProgram>,
    pub proxy: ProxyStatus,
    pub targets: Vec<TargetStatus>,
    pub enrolled: Vec<EnrolledStatus>,
    pub counters: CounterStatus,
    /// Established steered connections not yet accepted by the proxy.
    pub awaiting_accept: usize,
    /// The running daemon's own report (`/status` on its admin endpoint):
    /// readiness and backend health; `None` when it does not answer.
    pub daemon: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub name: &'static str,
    /// `None` when its link pin is missing: that hook is not steering.
    pub attached: Option<Attachment>,
}

#[derive(Debug, Serialize)]
pub struct Attachment {
    pub link_id: u32,
    pub prog_id: u32,
    pub tag: Option<String>,
    pub attach_type: &'static str,
    pub cgroup_id: Option<u64>,
    pub cgroup_path: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct ProxyStatus {
    pub ipv4: Option<SocketAddr>,
    pub ipv6: Option<SocketAddr>,
    pub socket_mark: u32,
    /// Age of the last heartbeat; `None` when the proxy is stopped.
    pub heartbeat_age_ms: Option<u64>,
    /// 0: always steer (fail closed).
    pub liveness_ms: u64,
    /// At its node-wide client limit: new connects go direct.
    pub full: bool,
    /// Whether connects are being steered right now (as far as the
    /// heartbeat tells: the kernel also checks the listener is open).
    pub steering: bool,
}

#[derive(Debug, Serialize)]
pub struct TargetStatus {
    pub target: String,
    pub backend_id: u32,
}

#[derive(Debug, Serialize)]
pub struct EnrolledStatus {
    pub netns_cookie: u64,
    pub netns_inode: u64,
    pub enrolled_at_unix: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct CounterStatus {
    pub steered: u64,
    pub passed: u64,
    pub proxy_own: u64,
    pub proxy_down: u64,
    pub proxy_full: u64,
    pub loopback: u64,
    pub foreign_mark: u64,
    pub errors: u64,
}

impl From<Counters> for CounterStatus {
    fn from(c: Counters) -> Self {
        Self {
            steered: c.steered,
            passed: c.passed,
            proxy_own: c.proxy_own,
            proxy_down: c.proxy_down,
            proxy_full: c.proxy_full,
            loopback: c.loopback,
            foreign_mark: c.foreign_mark,
            errors: c.errors,
        }
    }
}

/// Reads the installation under `layout`.
pub fn read(layout: &Layout) -> Result<Status, Error> {
    let maps = Maps::open(layout)?;
    let programs: Vec<ProgramStatus> = program_names::ALL
        .iter()
        .map(|name| ProgramStatus {
            name,
            attached: attachment(layout, name),
        })
        .collect();
    let programs_ahead = programs_ahead(&programs);

    let proxy = maps.proxy()?;
    let heartbeat_age_ms = (proxy.heartbeat_ns != 0)
        .then(|| steering::boottime_ns().saturating_sub(proxy.heartbeat_ns) / 1_000_000);
    let liveness_ms = proxy.liveness_ns / 1_000_000;
    let steering = match heartbeat_age_ms {
        _ if liveness_ms == 0 => true,
        Some(age) => age <= liveness_ms,
        None => false,
    };
    let proxy = ProxyStatus {
        ipv4: (proxy.port4 != 0).then(|| SocketAddr::from((proxy.addr4, proxy.port4))),
        ipv6: (proxy.port6 != 0).then(|| SocketAddr::new(bytes_to_ip(proxy.addr6), proxy.port6)),
        socket_mark: proxy.socket_mark,
        heartbeat_age_ms,
        liveness_ms,
        full: proxy.flags & redirector_ebpf::PROXY_FULL != 0,
        steering,
    };

    Ok(Status {
        pin_dir: layout.pin_dir.clone(),
        programs,
        programs_ahead,
        proxy,
        targets: maps
            .targets()?
            .into_iter()
            .map(|(target, backend_id)| TargetStatus {
                target: target.to_string(),
                backend_id,
            })
            .collect(),
        enrolled: maps
            .enrolled()?
            .into_iter()
            .map(|(cookie, e)| EnrolledStatus {
                netns_cookie: cookie,
                netns_inode: e.netns_inode,
                enrolled_at_unix: e.enrolled_at_unix,
            })
            .collect(),
        counters: maps.counters()?.into(),
        awaiting_accept: OrigDstTable::open(layout)?.len(),
        daemon: None,
    })
}

/// Foreign programs ahead of ours on the connect hooks, at the cgroup our
/// connect4 program is attached to.
fn programs_ahead(programs: &[ProgramStatus]) -> Vec<ForeignProgram> {
    let ours: Vec<(u32, u32)> = programs
        .iter()
        .filter_map(|p| p.attached.as_ref())
        .filter_map(|a| match a.attach_type {
            "cgroup_inet4_connect" => Some((sys::ATTACH_INET4_CONNECT, a.prog_id)),
            "cgroup_inet6_connect" => Some((sys::ATTACH_INET6_CONNECT, a.prog_id)),
            _ => None,
        })
        .collect();
    let Some(root) = programs
        .iter()
        .filter_map(|p| p.attached.as_ref())
        .find_map(|a| a.cgroup_path.clone())
    else {
        return Vec::new();
    };
    coexist::foreign_connect_programs(&root, &ours).unwrap_or_default()
}

fn attachment(layout: &Layout, program: &str) -> Option<Attachment> {
    let fd = sys::open_pinned(&layout.link(program)).ok()?;
    let info = sys::cgroup_link_info(&fd).ok()?;
    let tag = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == info.prog_id)
        .map(|p| format!("{:016x}", p.tag()));
    Some(Attachment {
        link_id: info.link_id,
        prog_id: info.prog_id,
        tag,
        attach_type: sys::attach_type_name(info.attach_type),
        cgroup_id: info.cgroup_id,
        cgroup_path: info.cgroup_id.and_then(steering::fs::cgroup_path),
    })
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "pins: {}", self.pin_dir.display())?;
        writeln!(f, "programs:")?;
        for p in &self.programs {
            match &p.attached {
                Some(a) => writeln!(
                    f,
                    "  {:<15} prog {:<5} link {:<5} {:<21} cgroup {}{}",
                    p.name,
                    a.prog_id,
                    a.link_id,
                    a.attach_type,
                    a.cgroup_path
                        .as_ref()
                        .map_or_else(|| "?".to_string(), |p| p.display().to_string()),
                    a.cgroup_id
                        .map(|id| format!(" (id {id})"))
                        .unwrap_or_default(),
                )?,
                None => writeln!(f, "  {:<15} NOT ATTACHED", p.name)?,
            }
        }
        for p in &self.programs_ahead {
            writeln!(
                f,
                "WARNING: program {} (id {}) runs on {} before redirector's: if it rewrites \
                 Service addresses (Cilium's socket LB), steering never matches; see \
                 deploy/README.md, \"Cilium\"",
                p.name, p.prog_id, p.hook
            )?;
        }
        let listeners: Vec<String> = [self.proxy.ipv4, self.proxy.ipv6]
            .into_iter()
            .flatten()
            .map(|a| a.to_string())
            .collect();
        let heartbeat = match self.proxy.heartbeat_age_ms {
            Some(age) => format!("heartbeat {:.1}s ago", age as f64 / 1000.0),
            None => "stopped".to_string(),
        };
        let mode = match (self.proxy.liveness_ms, self.proxy.steering) {
            (0, _) => "steering (fail closed)".to_string(),
            _ if self.proxy.full => "FULL: new connects go direct (fail open)".to_string(),
            (ms, true) => format!("steering (fails open after {:.1}s)", ms as f64 / 1000.0),
            (_, false) => "NOT steering: connects go direct (fail open)".to_string(),
        };
        writeln!(
            f,
            "proxy: {}  mark {:#x}  {heartbeat}  {mode}",
            if listeners.is_empty() {
                "-".to_string()
            } else {
                listeners.join(", ")
            },
            self.proxy.socket_mark,
        )?;
        match &self.daemon {
            Some(d) => writeln!(
                f,
                "daemon: {}, backend {}",
                if d["draining"] == true {
                    "draining"
                } else if d["ready"] == true {
                    "ready"
                } else {
                    "not ready"
                },
                if d["backend_up"] == true {
                    "up"
                } else {
                    "DOWN (steered connects for it go direct until it answers)"
                },
            )?,
            None => writeln!(f, "daemon: not answering on its admin address")?,
        }
        let backends = self
            .daemon
            .as_ref()
            .and_then(|d| d["backends"].as_array().cloned())
            .unwrap_or_default();
        if !backends.is_empty() {
            writeln!(f, "backends ({}):", backends.len())?;
            for b in &backends {
                let text = |key: &str| b[key].as_str().unwrap_or("-").to_string();
                let targets: Vec<String> = b["targets"]
                    .as_array()
                    .map(|t| {
                        t.iter()
                            .filter_map(|t| t.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                writeln!(
                    f,
                    "  {:<16} {:<10} {:<8} clients {:<5} {}  targets [{}]{}",
                    text("name"),
                    text("kind"),
                    text("state"),
                    b["clients"].as_i64().unwrap_or(0),
                    text("topology"),
                    targets.join(", "),
                    b["last_error"]
                        .as_str()
                        .map(|e| format!("  last error: {e}"))
                        .unwrap_or_default(),
                )?;
            }
        }
        writeln!(f, "redis targets ({}):", self.targets.len())?;
        for t in &self.targets {
            writeln!(f, "  {:<24} backend {}", t.target, t.backend_id)?;
        }
        writeln!(f, "enrolled namespaces ({}):", self.enrolled.len())?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for e in &self.enrolled {
            writeln!(
                f,
                "  netns cookie {:<8} inode {:<12} for {}s{}",
                e.netns_cookie,
                e.netns_inode,
                now.saturating_sub(e.enrolled_at_unix),
                netns_names(e.netns_inode)
                    .map(|n| format!("  ({n})"))
                    .unwrap_or_default(),
            )?;
        }
        let c = &self.counters;
        write!(
            f,
            "counters: steered {}  passed {}  proxy_own {}  proxy_down {}  proxy_full {}  \
             loopback {}  foreign_mark {}  errors {}\nawaiting accept: {}",
            c.steered,
            c.passed,
            c.proxy_own,
            c.proxy_down,
            c.proxy_full,
            c.loopback,
            c.foreign_mark,
            c.errors,
            self.awaiting_accept
        )
    }
}

/// Names under `/run/netns` (as `ip netns` creates them) for an inode.
fn netns_names(inode: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let names: Vec<String> = fs::read_dir("/run/netns")
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| fs::metadata(e.path()).is_ok_and(|m| m.ino() == inode))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    (!names.is_empty()).then(|| names.join(", "))
}
