//! Typed access to the pinned maps.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    str::FromStr,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, SockMap};
use redirector_ebpf::{
    Counters, Enrollment, LISTENER_IPV4, LISTENER_IPV6, NetnsKey, OrigDst, PORT_WORDS, ProxyConfig,
    SockTuple, Target, TargetKey, ipv4_mapped, map_names, port_bitmap,
};

use super::{Error, Layout};
use crate::netns::Netns;

fn open(layout: &Layout, name: &'static str) -> Result<Map, Error> {
    let path = layout.map(name);
    if !path.exists() {
        return Err(Error::NotInstalled { path });
    }
    let data = MapData::from_pin(&path).map_err(|source| Error::OpenMap {
        path: path.clone(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| Error::OpenMap { path, source })
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    layout: &Layout,
    name: &'static str,
) -> Result<T, Error> {
    let map = open(layout, name)?;
    T::try_from(map).map_err(|source| Error::IncompatibleMap {
        path: layout.map(name),
        detail: source.to_string(),
    })
}

/// A Redis service to steer: `ip:port`, or any address on `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetSpec {
    /// `None` matches every destination address.
    pub addr: Option<IpAddr>,
    pub port: u16,
}

impl TargetSpec {
    fn key(&self) -> TargetKey {
        TargetKey {
            addr: self.addr.map_or([0; 16], ip_to_bytes),
            port: self.port,
            _pad: 0,
        }
    }

    fn from_key(key: &TargetKey) -> Self {
        Self {
            addr: (key.addr != [0; 16]).then(|| bytes_to_ip(key.addr)),
            port: key.port,
        }
    }
}

impl FromStr for TargetSpec {
    type Err = String;

    /// `10.96.0.10:6379`, `[fd00::10]:6379`, `:6379` or `6379`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port_only = s.strip_prefix(':').unwrap_or(s);
        if let Ok(port) = port_only.parse::<u16>() {
            return Self::checked(None, port);
        }
        let addr: SocketAddr = s
            .parse()
            .map_err(|_| format!("`{s}` is neither IP:PORT, [IPv6]:PORT nor a port"))?;
        if addr.ip().is_unspecified() {
            return Self::checked(None, addr.port());
        }
        Self::checked(Some(addr.ip()), addr.port())
    }
}

impl TargetSpec {
    fn checked(addr: Option<IpAddr>, port: u16) -> Result<Self, String> {
        if port == 0 {
            return Err("port 0 cannot be a Redis target".into());
        }
        Ok(Self { addr, port })
    }
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            None => write!(f, "*:{}", self.port),
            Some(addr) => write!(f, "{}", SocketAddr::new(addr, self.port)),
        }
    }
}

/// A port bitmap word to write: its index and value.
pub type PortWord = (u32, u64);

/// How to take the port bitmap from `current` to `wanted` without a moment
/// where a port of a target in either set is missing: the words to write
/// before the targets change (each `current | wanted`), then the words to
/// write after (`wanted`). Words that do not change are not written.
pub fn port_word_updates(current: &[u64], wanted: &[u64]) -> (Vec<PortWord>, Vec<PortWord>) {
    let (mut first, mut last) = (Vec::new(), Vec::new());
    for (index, (&now, &then)) in (0u32..).zip(current.iter().zip(wanted)) {
        let both = now | then;
        if both != now {
            first.push((index, both));
        }
        if then != both {
            last.push((index, then));
        }
    }
    (first, last)
}

/// IPv4 becomes IPv4-mapped, as in every map key.
pub fn ip_to_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn bytes_to_ip(bytes: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(bytes).to_canonical()
}

/// The maps the control plane reads and writes.
pub struct Maps {
    enrolled: HashMap<MapData, NetnsKey, Enrollment>,
    targets: HashMap<MapData, TargetKey, Target>,
    redis_ports: Array<MapData, u64>,
    proxy: Array<MapData, ProxyConfig>,
    counters: PerCpuArray<MapData, Counters>,
}

impl Maps {
    pub fn open(layout: &Layout) -> Result<Self, Error> {
        Ok(Self {
            enrolled: typed(layout, map_names::ENROLLED)?,
            targets: typed(layout, map_names::TARGETS)?,
            redis_ports: typed(layout, map_names::REDIS_PORTS)?,
            proxy: typed(layout, map_names::PROXY)?,
            counters: typed(layout, map_names::COUNTERS)?,
        })
    }

    /// Enrolls a namespace; re-enrolling keeps the original timestamp.
    /// Returns whether it was newly enrolled.
    pub fn enroll(&mut self, netns: Netns) -> Result<bool, Error> {
        let key = NetnsKey {
            netns_cookie: netns.cookie,
        };
        if self.enrolled.get(&key, 0).is_ok() {
            return Ok(false);
        }
        let enrollment = Enrollment {
            netns_inode: netns.inode,
            enrolled_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        self.enrolled
            .insert(key, enrollment, 0)
            .map_err(|source| Error::Map {
                map: map_names::ENROLLED,
                source,
            })?;
        Ok(true)
    }

    /// Returns whether the namespace was enrolled.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<bool, Error> {
        match self.enrolled.remove(&NetnsKey { netns_cookie }) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(source) => Err(Error::Map {
                map: map_names::ENROLLED,
                source,
            }),
        }
    }

    pub fn enrolled(&self) -> Result<Vec<(u64, Enrollment)>, Error> {
        let mut out = self
            .enrolled
            .iter()
            .map(|entry| entry.map(|(key, value)| (key.netns_cookie, value)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| Error::Map {
                map: map_names::ENROLLED,
                source,
            })?;
        out.sort_by_key(|(cookie, _)| *cookie);
        Ok(out)
    }

    /// Makes the target map exactly `targets`, touching only what changed so
    /// steering of unchanged services never blinks. The port bitmap the
    /// programs read first stays a superset of the targets' ports
    /// throughout: a port's bit is set before its first target goes in and
    /// cleared after its last one goes.
    pub fn set_targets(&mut self, targets: &[(TargetSpec, u32)]) -> Result<(), Error> {
        let map_err = |source| Error::Map {
            map: map_names::TARGETS,
            source,
        };
        let current = self.redis_port_words()?;
        let wanted_ports = port_bitmap(targets.iter().map(|(spec, _)| spec.port));
        let (first, last) = port_word_updates(&current, &wanted_ports);
        self.write_port_words(&first)?;
        let wanted: HashSet<TargetKey> = targets.iter().map(|(spec, _)| spec.key()).collect();
        let stale: Vec<TargetKey> = self
            .targets
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !wanted.contains(key))
            .collect();
        for (spec, backend_id) in targets {
            let value = Target {
                backend_id: *backend_id,
            };
            self.targets.insert(spec.key(), value, 0).map_err(map_err)?;
        }
        for key in stale {
            self.targets.remove(&key).map_err(map_err)?;
        }
        self.write_port_words(&last)
    }

    /// The port bitmap's words, as the programs read them.
    fn redis_port_words(&self) -> Result<Vec<u64>, Error> {
        (0..PORT_WORDS)
            .map(|index| {
                self.redis_ports
                    .get(&index, 0)
                    .map_err(|source| Error::Map {
                        map: map_names::REDIS_PORTS,
                        source,
                    })
            })
            .collect()
    }

    fn write_port_words(&mut self, updates: &[PortWord]) -> Result<(), Error> {
        for &(index, word) in updates {
            self.redis_ports
                .set(index, word, 0)
                .map_err(|source| Error::Map {
                    map: map_names::REDIS_PORTS,
                    source,
                })?;
        }
        Ok(())
    }

    pub fn targets(&self) -> Result<Vec<(TargetSpec, u32)>, Error> {
        let mut out = self
            .targets
            .iter()
            .map(|entry| entry.map(|(key, value)| (TargetSpec::from_key(&key), value.backend_id)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| Error::Map {
                map: map_names::TARGETS,
                source,
            })?;
        out.sort();
        Ok(out)
    }

    pub fn proxy(&self) -> Result<ProxyConfig, Error> {
        self.proxy.get(&0, 0).map_err(|source| Error::Map {
            map: map_names::PROXY,
            source,
        })
    }

    pub fn set_proxy(&mut self, config: &ProxyConfig) -> Result<(), Error> {
        self.proxy.set(0, config, 0).map_err(|source| Error::Map {
            map: map_names::PROXY,
            source,
        })
    }

    /// Counters summed over all CPUs.
    pub fn counters(&self) -> Result<Counters, Error> {
        let per_cpu = self.counters.get(&0, 0).map_err(|source| Error::Map {
            map: map_names::COUNTERS,
            source,
        })?;
        let mut total = Counters::default();
        for cpu in per_cpu.iter() {
            total.add(cpu);
        }
        Ok(total)
    }
}

/// Original destinations of steered connections, for the proxy's accept path.
pub struct OrigDstTable {
    map: Mutex<HashMap<MapData, SockTuple, OrigDst>>,
}

impl OrigDstTable {
    pub fn open(layout: &Layout) -> Result<Self, Error> {
        Ok(Self {
            map: Mutex::new(typed(layout, map_names::ORIG_DST)?),
        })
    }

    /// Entries waiting for the proxy to accept their connection (normally
    /// none for more than an instant).
    pub fn len(&self) -> usize {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.keys().filter(Result::is_ok).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the original destination of an accepted connection: `client` is
    /// its peer address, `proxy` its local address. `None` when the client
    /// was not steered (it dialled the proxy itself).
    pub fn take(&self, client: SocketAddr, proxy: SocketAddr) -> Option<OrigDst> {
        let key = SockTuple {
            client_addr: ip_to_bytes(client.ip()),
            proxy_addr: ip_to_bytes(proxy.ip()),
            client_port: client.port(),
            proxy_port: proxy.port(),
        };
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let orig = map.get(&key, 0).ok()?;
        // The 4-tuple may be reused by a later connection; never let a stale
        // entry answer for it.
        let _ = map.remove(&key);
        Some(orig)
    }
}

/// The proxy's listening sockets in `rdr_listener`: while one is there (and
/// the heartbeat is fresh) the programs steer to it; the kernel removes it
/// when the socket closes, so a dead proxy is passed by at once.
pub struct Listeners {
    map: SockMap<MapData>,
}

impl Listeners {
    pub fn open(layout: &Layout) -> Result<Self, Error> {
        Ok(Self {
            map: typed(layout, map_names::LISTENER)?,
        })
    }

    /// Registers the listener of `addr`'s family.
    pub fn register(
        &mut self,
        addr: SocketAddr,
        socket: &impl std::os::fd::AsRawFd,
    ) -> Result<(), Error> {
        let slot = if addr.is_ipv4() {
            LISTENER_IPV4
        } else {
            LISTENER_IPV6
        };
        self.map.set(slot, socket, 0).map_err(|source| Error::Map {
            map: map_names::LISTENER,
            source,
        })
    }
}

/// Where a steered client meant to go.
pub fn orig_dst_addr(orig: &OrigDst) -> SocketAddr {
    SocketAddr::new(bytes_to_ip(orig.addr), orig.port)
}

#[cfg(test)]
mod tests {
    use redirector_ebpf::{port_bit, port_word};

    use super::*;

    #[test]
    fn the_port_bitmap_never_drops_a_port_while_targets_change() {
        let cases: [(&[u16], &[u16]); 5] = [
            (&[], &[6379]),
            (&[6379], &[]),
            (&[6379, 7000], &[6379, 26379]),
            (&[6379, 6380], &[6381]),
            (&[6379], &[6379]),
        ];
        for (before, after) in cases {
            let current = port_bitmap(before.iter().copied());
            let wanted = port_bitmap(after.iter().copied());
            let (first, last) = port_word_updates(&current, &wanted);
            let mut words = current;
            for (index, word) in first {
                words[index as usize] = word;
            }
            // Between the two writes the targets change: every port of
            // either set must be there.
            for port in before.iter().chain(after) {
                assert_ne!(
                    words[port_word(*port) as usize] & port_bit(*port),
                    0,
                    "{port}"
                );
            }
            for (index, word) in last {
                words[index as usize] = word;
            }
            assert_eq!(words, wanted, "{before:?} -> {after:?}");
        }
        let same = port_bitmap([6379]);
        assert_eq!(port_word_updates(&same, &same), (Vec::new(), Vec::new()));
    }

    #[test]
    fn target_specs_parse_as_operators_write_them() {
        let exact: TargetSpec = "10.96.0.10:6379".parse().unwrap();
        assert_eq!(exact.addr, Some("10.96.0.10".parse().unwrap()));
        assert_eq!(exact.port, 6379);
        assert_eq!(exact.to_string(), "10.96.0.10:6379");

        let v6: TargetSpec = "[fd00::10]:7000".parse().unwrap();
        assert_eq!(v6.addr, Some("fd00::10".parse().unwrap()));

        for any in ["6379", ":6379", "0.0.0.0:6379", "[::]:6379"] {
            let spec: TargetSpec = any.parse().unwrap();
            assert_eq!(
                spec,
                TargetSpec {
                    addr: None,
                    port: 6379
                },
                "{any}"
            );
            assert_eq!(spec.to_string(), "*:6379");
        }
        assert!("0".parse::<TargetSpec>().is_err());
        assert!("redis:6379".parse::<TargetSpec>().is_err());
    }

    #[test]
    fn keys_round_trip_ipv4_as_mapped() {
        let spec: TargetSpec = "10.96.0.10:6379".parse().unwrap();
        let key = spec.key();
        assert_eq!(&key.addr[10..], &[0xff, 0xff, 10, 96, 0, 10]);
        assert_eq!(TargetSpec::from_key(&key), spec);
        assert_eq!(
            TargetSpec::from_key(
                &TargetSpec {
                    addr: None,
                    port: 1
                }
                .key()
            )
            .addr,
            None
        );
    }
}
