//! The daemon's configuration, validated once at start.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use redirector_ebpf::ProxyConfig;

use crate::{
    backend::Declared,
    proxy::{Settings, UpstreamAuth, host::SessionLoop, pool::PoolConfig},
    steering::ip_to_bytes,
};

/// Default proxy listener port on the node address.
pub const DEFAULT_PROXY_PORT: u16 = 15379;
/// Default steering target: every connect to port 6379.
pub const DEFAULT_REDIS_TARGET: &str = ":6379";
/// Default heartbeat age after which connects go direct (fail open).
pub const DEFAULT_LIVENESS: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--proxy-addr is required: the node address pods can reach, e.g. 10.0.0.5:{DEFAULT_PROXY_PORT}"
    )]
    NoProxyAddr,
    #[error(
        "--proxy-addr {0}: steered connects are rewritten to this address, so it must be a \
         concrete address the pods can reach (not unspecified, not loopback)"
    )]
    UnroutableProxyAddr(SocketAddr),
    #[error("--proxy-addr: at most one IPv4 and one IPv6 address, got {0} and {1}")]
    DuplicateFamily(SocketAddr, SocketAddr),
    #[error(transparent)]
    Backend(#[from] crate::backend::Error),
    #[error("--socket-mark must not be 0: unmarked sockets could not be told from the proxy's")]
    ZeroMark,
    #[error(
        "--cluster-seed, --backend or --backends-file is required: the Redis behind the proxy \
         (redis targets given as IP:PORT are used as cluster seeds when none is given)"
    )]
    NoSeeds,
    #[error("--kubernetes enrolls pods into steering: it cannot run with --steering off")]
    KubernetesNeedsSteering,
    #[error("--mesh-identities-from-api reads the mesh from the API: it needs --kubernetes")]
    MeshIdentitiesNeedKubernetes,
}

/// `VALUE/MASK` mark bits (`VALUE` alone: every bit of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkBits {
    pub value: u32,
    pub mask: u32,
}

impl std::str::FromStr for MarkBits {
    type Err = String;

    /// `0x539/0xfff`, `1337/4095` or `0x539`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (value, mask) = match s.split_once('/') {
            Some((value, mask)) => (parse_u32(value)?, parse_u32(mask)?),
            None => {
                let value = parse_u32(s)?;
                (value, value)
            }
        };
        if mask == 0 || value & !mask != 0 {
            return Err(format!(
                "`{s}`: the mask must be non-zero and cover every bit of the value"
            ));
        }
        Ok(Self { value, mask })
    }
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Load the eBPF programs and steer (else: only the proxy, no root).
    pub steering: bool,
    pub pin_dir: PathBuf,
    /// `None`: find or mount cgroup v2 (see `steering::fs`).
    pub cgroup_root: Option<PathBuf>,
    pub proxy_addrs: Vec<SocketAddr>,
    /// The backends declared on the command line and in the backends file,
    /// each with its targets; the first serves direct clients.
    pub backends: Vec<Declared>,
    pub socket_mark: u32,
    /// Mark bits set on steered sockets, as (value, mask): Istio ambient's
    /// ztunnel mark (0x539/0xfff) keeps its in-pod capture off them.
    pub steered_mark: Option<MarkBits>,
    /// Zero: always steer, even while the proxy is down (fail closed).
    pub liveness: Duration,
    /// On SIGTERM, how long connected clients may stay (`handover`).
    pub drain_grace: Duration,
    pub connect_timeout: Duration,
    /// Exit at start unless every backend answers within `connect_timeout`.
    pub require_backends: bool,
    pub proxy: Settings,
    pub pool: PoolConfig,
    pub upstream_auth: Option<UpstreamAuth>,
    /// The full admin endpoint (`/metrics`, `/healthz/*`, `/status`,
    /// `/dashboard`, `POST /drain`); none to disable.
    pub admin_addr: Option<SocketAddr>,
    /// A `/metrics`-only listener, e.g. on the node address for Prometheus.
    pub metrics_addr: Option<SocketAddr>,
    /// Exists while this process is ready (`redirector ready`).
    pub ready_file: Option<PathBuf>,
    pub refresh_interval: Duration,
    /// Proxy workers: threads with a runtime and listeners each.
    pub workers: usize,
    /// Which loop runs the client sessions.
    pub session_loop: SessionLoop,
    /// HBONE tunnels between nodes; `None`: every node is dialled directly.
    pub hbone: Option<HboneConfig>,
    /// The Kubernetes node agent: pods and targets from the API server.
    pub kubernetes: Option<crate::k8s::K8sConfig>,
}

/// Where HBONE's certificates come from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// A directory with `ca.pem`, `cert.pem` and `key.pem`, reloaded when
    /// they change (any mesh, cert-manager, `redirector certs`).
    Files(PathBuf),
    /// Istio's CA: a key in memory, certificates renewed from istiod.
    Istiod(crate::identity::istiod::Settings),
}

/// HBONE: who this node is, where it listens, and which endpoints are
/// reached through their node's tunnel listener.
#[derive(Clone, Debug)]
pub struct HboneConfig {
    /// Where the node's mTLS material comes from.
    pub certs: CertSource,
    /// The inbound listener; `None`: this node accepts no tunnels.
    pub listen: Option<SocketAddr>,
    /// The port peers' listeners use.
    pub peer_port: u16,
    /// Redis endpoints on meshed nodes (with the workload identities that
    /// answer for them, where named).
    pub meshed: Vec<crate::hbone::MeshEndpoint>,
    /// Ambient pods and Services are meshed too, with identities from the
    /// API (needs the Kubernetes agent).
    pub identities_from_api: bool,
    /// Inbound: certificates presented on these local addresses instead of
    /// the node's (fronted workloads).
    pub workload_certs: Vec<(std::net::IpAddr, PathBuf)>,
    /// The identity peer nodes must prove [default: this node's own, as
    /// every node of the DaemonSet runs as the same service account].
    pub peer_identity: Option<crate::identity::Identity>,
    /// Inbound: the trust domain allowed [default: this node's].
    pub allow_trust_domain: Option<String>,
    /// Inbound: the namespaces allowed; empty: all of the trust domain.
    pub allow_namespaces: Vec<String>,
    /// Outbound tunnels without streams this long are closed.
    pub idle_timeout: Duration,
    /// How often the certificate files are checked for changes.
    pub reload_interval: Duration,
}

impl RunConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if self.proxy_addrs.is_empty() {
            return Err(Error::NoProxyAddr);
        }
        for addr in &self.proxy_addrs {
            // A pod's loopback is its own: rewriting to it would never reach
            // the node proxy. Without steering, clients dial it themselves.
            let unroutable = addr.ip().is_unspecified() || addr.ip().is_loopback();
            if addr.port() == 0 || (self.steering && unroutable) {
                return Err(Error::UnroutableProxyAddr(*addr));
            }
        }
        // The node agent finds backends and targets in the targets ConfigMap.
        let from_api = self.kubernetes.is_some();
        if self.backends.is_empty() && !from_api {
            return Err(Error::NoSeeds);
        }
        crate::backend::validate_declared(&self.backends, self.steering)?;
        if let [a, b, ..] = self.proxy_addrs[..]
            && (self.proxy_addrs.len() > 2 || a.is_ipv4() == b.is_ipv4())
        {
            return Err(Error::DuplicateFamily(a, b));
        }
        if from_api && !self.steering {
            return Err(Error::KubernetesNeedsSteering);
        }
        if self.hbone.as_ref().is_some_and(|h| h.identities_from_api) && !from_api {
            return Err(Error::MeshIdentitiesNeedKubernetes);
        }
        if self.socket_mark == 0 {
            return Err(Error::ZeroMark);
        }
        Ok(())
    }

    /// How often the daemon proves it is alive to the programs.
    pub fn heartbeat_interval(&self) -> Duration {
        if self.liveness.is_zero() {
            Duration::from_secs(1)
        } else {
            (self.liveness / 4).max(Duration::from_millis(50))
        }
    }

    /// The `rdr_proxy` map entry for this configuration: the proxy in
    /// network namespace `netns_cookie`, last alive at `heartbeat_ns` (0:
    /// down), and whether it is at its client limit.
    pub fn proxy_entry(&self, heartbeat_ns: u64, netns_cookie: u64, full: bool) -> ProxyConfig {
        let mut entry = ProxyConfig {
            heartbeat_ns,
            liveness_ns: u64::try_from(self.liveness.as_nanos()).unwrap_or(u64::MAX),
            netns_cookie,
            addr6: [0; 16],
            addr4: [0; 4],
            socket_mark: self.socket_mark,
            port4: 0,
            port6: 0,
            flags: if full { redirector_ebpf::PROXY_FULL } else { 0 },
            steered_mark: self.steered_mark.map_or(0, |m| m.value),
            steered_mark_mask: self.steered_mark.map_or(0, |m| m.mask),
        };
        for addr in &self.proxy_addrs {
            match addr.ip() {
                IpAddr::V4(v4) => {
                    entry.addr4 = v4.octets();
                    entry.port4 = addr.port();
                }
                IpAddr::V6(_) => {
                    entry.addr6 = ip_to_bytes(addr.ip());
                    entry.port6 = addr.port();
                }
            }
        }
        entry
    }
}

/// Default port of the metrics-only listener.
pub const DEFAULT_METRICS_PORT: u16 = 15020;

/// `IP`, `IP:PORT` or `[IPv6]:PORT`; a bare IP (either family, as the
/// downward API's `status.hostIPs` gives it) takes `default_port`.
pub fn parse_addr_or_ip(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| format!("`{s}`: expected IP, IP:PORT or [IPv6]:PORT"))
}

/// A `--proxy-addr` entry (default port 15379).
pub fn parse_proxy_addr(s: &str) -> Result<SocketAddr, String> {
    parse_addr_or_ip(s, DEFAULT_PROXY_PORT)
}

/// A `--metrics-addr` (default port 15020).
pub fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    parse_addr_or_ip(s, DEFAULT_METRICS_PORT)
}

/// Parses `0`, `250ms`, `3s` or `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}`: expected a number with a unit, e.g. 3s or 250ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "" if n == 0 => Ok(Duration::ZERO),
        _ => Err(format!("`{s}`: unit must be ms, s or m")),
    }
}

/// Parses a decimal or `0x` hexadecimal u32 (socket marks are usually hex).
pub fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("`{s}`: {e}"))
}

/// `--hbone-workload-certs IP=DIR`.
pub fn parse_workload_certs(s: &str) -> Result<(std::net::IpAddr, PathBuf), String> {
    let (ip, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected IP=DIR"))?;
    let ip = ip
        .parse()
        .map_err(|_| format!("`{s}`: `{ip}` is not an IP address"))?;
    if dir.is_empty() {
        return Err(format!("`{s}`: no directory"));
    }
    Ok((ip, dir.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(addrs: &[&str]) -> RunConfig {
        RunConfig {
            steering: true,
            backends: vec![Declared {
                spec: "cluster=cluster:10.96.0.10:6379".parse().unwrap(),
                targets: vec![DEFAULT_REDIS_TARGET.parse().unwrap()],
                options: Default::default(),
                source: "test".into(),
            }],
            require_backends: false,
            proxy: Settings::default(),
            pool: PoolConfig {
                shared_per_node: 2,
                idle_leases_per_node: 8,
            },
            upstream_auth: None,
            admin_addr: None,
            metrics_addr: None,
            ready_file: None,
            refresh_interval: Duration::from_secs(5),
            workers: 1,
            session_loop: SessionLoop::default(),
            hbone: None,
            kubernetes: None,
            pin_dir: "/sys/fs/bpf/redirector".into(),
            cgroup_root: None,
            proxy_addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            socket_mark: crate::steering::DEFAULT_SOCKET_MARK,
            steered_mark: Some("0x539/0xfff".parse().unwrap()),
            liveness: DEFAULT_LIVENESS,
            drain_grace: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn proxy_addresses_must_be_reachable_from_pods() {
        assert!(config(&["10.0.0.5:15379"]).validate().is_ok());
        assert!(
            config(&["10.0.0.5:15379", "[fd00::5]:15379"])
                .validate()
                .is_ok()
        );
        for bad in [
            "127.0.0.1:15379",
            "0.0.0.0:15379",
            "[::1]:15379",
            "10.0.0.5:0",
        ] {
            assert!(
                matches!(
                    config(&[bad]).validate(),
                    Err(Error::UnroutableProxyAddr(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            config(&["10.0.0.5:1", "10.0.0.6:1"]).validate(),
            Err(Error::DuplicateFamily(..))
        ));
        assert!(matches!(config(&[]).validate(), Err(Error::NoProxyAddr)));
        let mut proxy_only = config(&["127.0.0.1:7000"]);
        proxy_only.steering = false;
        assert!(proxy_only.validate().is_ok());
        proxy_only.backends.clear();
        assert!(matches!(proxy_only.validate(), Err(Error::NoSeeds)));
    }

    #[test]
    fn proxy_entry_carries_both_families() {
        let entry = config(&["10.0.0.5:15379", "[fd00::5]:15380"]).proxy_entry(42, 4096, true);
        assert_eq!(entry.addr4, [10, 0, 0, 5]);
        assert_eq!(entry.netns_cookie, 4096);
        assert_eq!(
            (entry.steered_mark, entry.steered_mark_mask),
            (0x539, 0xfff)
        );
        assert_eq!(entry.flags, redirector_ebpf::PROXY_FULL);
        assert_eq!(entry.port4, 15379);
        assert_eq!(entry.port6, 15380);
        assert_eq!(entry.addr6[0], 0xfd);
        assert_eq!(entry.heartbeat_ns, 42);
        assert_eq!(entry.liveness_ns, 3_000_000_000);
    }

    #[test]
    fn node_addresses_parse_with_or_without_a_port() {
        assert_eq!(
            parse_proxy_addr("10.0.0.5"),
            Ok("10.0.0.5:15379".parse().unwrap())
        );
        // What $(NODE_IP) gives on an IPv6-only node: no brackets.
        assert_eq!(
            parse_proxy_addr("fd00::5"),
            Ok("[fd00::5]:15379".parse().unwrap())
        );
        assert_eq!(
            parse_proxy_addr("[fd00::5]:7000"),
            Ok("[fd00::5]:7000".parse().unwrap())
        );
        assert_eq!(
            parse_metrics_addr("10.0.0.5"),
            Ok("10.0.0.5:15020".parse().unwrap())
        );
        assert!(parse_proxy_addr("node-1:15379").is_err());
    }

    #[test]
    fn durations_and_marks_parse() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("3").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(parse_u32("0x6379"), Ok(0x6379));
        assert_eq!(parse_u32("25465"), Ok(25465));
        assert!(parse_u32("0xzz").is_err());
        assert_eq!(
            "0x539/0xfff".parse(),
            Ok(MarkBits {
                value: 0x539,
                mask: 0xfff
            })
        );
        assert_eq!(
            "0x1000".parse(),
            Ok(MarkBits {
                value: 0x1000,
                mask: 0x1000
            })
        );
        assert!(
            "0x539/0xff".parse::<MarkBits>().is_err(),
            "value outside the mask"
        );
        assert!("0/0".parse::<MarkBits>().is_err());
    }
}
