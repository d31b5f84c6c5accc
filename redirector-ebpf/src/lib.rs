//! The map ABI shared by redirector's kernel programs and its userspace daemon.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (hash-map keys are
//! compared bytewise, so padding must be explicit and zeroed) and is compiled
//! by both sides, so the two can never disagree about a layout. Addresses are
//! always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so one key
//! type serves `connect4`, `connect6` and dual-stack sockets. Ports are in
//! host byte order, so `bpftool map dump` shows them as people write them.
#![no_std]

/// Version of the map layouts below. Maps are pinned under
/// `<pin-dir>/maps-v<ABI_VERSION>/`, so a release that changes a layout
/// creates a fresh set beside the old one instead of refusing to start, and
/// removes the old set once its own programs are attached (see
/// `steering::install`). Bump it with every change to a type here, a map
/// type or a capacity.
pub const ABI_VERSION: u32 = 3;

/// Names of the pinned maps, as they appear under the pin directory and in
/// `bpftool map list`. The kernel keeps at most 15 characters of a map name.
pub mod map_names {
    pub const ENROLLED: &str = "rdr_enrolled";
    pub const TARGETS: &str = "rdr_targets";
    /// A bitmap of the ports in `rdr_targets` (`BPF_MAP_TYPE_ARRAY` of
    /// `PORT_WORDS` words): a connect to any other port is let go after one
    /// array read, without hashing a key.
    pub const REDIS_PORTS: &str = "rdr_redis_ports";
    pub const PROXY: &str = "rdr_proxy";
    /// Socket storage (`BPF_MAP_TYPE_SK_STORAGE`): freed with its socket.
    pub const PENDING: &str = "rdr_pending";
    pub const ORIG_DST: &str = "rdr_orig_dst";
    pub const COUNTERS: &str = "rdr_counters";
    /// The proxy's listening sockets (`BPF_MAP_TYPE_SOCKMAP`); the kernel
    /// removes a socket when it closes, so a crashed proxy is seen at once.
    pub const LISTENER: &str = "rdr_listener";
    /// aya-log's ring buffer. Pinned too, so programs loaded by different
    /// daemon runs (adopted ones, upgraded ones) all log into one buffer.
    pub const LOGS: &str = "AYA_LOGS";
    pub const ALL: [&str; 9] = [
        ENROLLED,
        TARGETS,
        REDIS_PORTS,
        PROXY,
        PENDING,
        ORIG_DST,
        COUNTERS,
        LISTENER,
        LOGS,
    ];
}

/// Names of the programs (ELF symbols and kernel program names).
pub mod program_names {
    pub const CONNECT4: &str = "redir_connect4";
    pub const CONNECT6: &str = "redir_connect6";
    pub const SOCK_OPS: &str = "redir_sockops";
    pub const ALL: [&str; 3] = [CONNECT4, CONNECT6, SOCK_OPS];
    /// The proxy listeners' `SO_REUSEPORT` program (not a cgroup program,
    /// not in `ALL`): loaded by each daemon, attached to its own listeners.
    pub const REUSEPORT: &str = "redir_reuseport";
}

/// Capacities. `ORIG_DST` holds established steered connections the proxy
/// has not accepted yet: entries leave when the proxy takes them, when the
/// proxy's socket closes, and when the client's socket closes before the
/// proxy had one. It is an LRU map only as a last resort. (Pending connects
/// live in socket storage, which has no capacity: it goes with the socket.)
pub const MAX_ENROLLED: u32 = 16_384;
pub const MAX_TARGETS: u32 = 1_024;
pub const MAX_ORIG_DST: u32 = 65_536;
/// Words of `rdr_redis_ports`: one bit per port.
pub const PORT_WORDS: u32 = 65_536 / 64;
/// `rdr_listener` slots: the proxy's IPv4 and IPv6 listeners.
pub const LISTENER_IPV4: u32 = 0;
pub const LISTENER_IPV6: u32 = 1;
pub const MAX_LISTENERS: u32 = 2;

/// Key of `rdr_enrolled`: a network namespace that opted in.
///
/// The netns cookie is what `bpf_get_netns_cookie()` returns for a socket and
/// `getsockopt(SO_NETNS_COOKIE)` returns in userspace. Unlike an inode number
/// it is never reused while the machine is up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetnsKey {
    pub netns_cookie: u64,
}

/// Value of `rdr_enrolled`. Only for operators: the programs test presence.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enrollment {
    /// Inode of the namespace (`readlink /proc/<pid>/ns/net` prints it).
    pub netns_inode: u64,
    /// When it was enrolled, in seconds since the Unix epoch.
    pub enrolled_at_unix: u64,
}

/// Key of `rdr_targets`: a Redis service the pods dial.
///
/// An all-zero `addr` is a wildcard: any destination on `port` is steered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
}

/// The `rdr_redis_ports` word that holds `port`'s bit.
pub const fn port_word(port: u16) -> u32 {
    (port >> 6) as u32
}

/// `port`'s bit in its `rdr_redis_ports` word.
pub const fn port_bit(port: u16) -> u64 {
    1 << (port & 63)
}

/// The `rdr_redis_ports` words for a set of ports (targets' ports, with
/// repeats).
pub fn port_bitmap(ports: impl IntoIterator<Item = u16>) -> [u64; PORT_WORDS as usize] {
    let mut words = [0u64; PORT_WORDS as usize];
    for port in ports {
        words[port_word(port) as usize] |= port_bit(port);
    }
    words
}

/// Value of `rdr_targets`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Which configured backend this service leads to (its index in the
    /// daemon's configuration); carried to the proxy in `OrigDst`.
    pub backend_id: u32,
}

/// The only entry (index 0) of the `rdr_proxy` array: where steered connects
/// go and how the proxy is recognised.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// CLOCK_BOOTTIME (ns) of the proxy's last heartbeat; 0 when it is down.
    pub heartbeat_ns: u64,
    /// Steer only while the heartbeat is younger than this and the proxy's
    /// listener is in `rdr_listener`; otherwise the proxy is presumed dead
    /// or wedged and connects go direct (fail open). 0 disables both checks:
    /// always steer (fail closed).
    pub liveness_ns: u64,
    /// Network namespace of the proxy: the socket mark means "the proxy's
    /// own socket" only there, so a pod cannot opt out by setting it.
    pub netns_cookie: u64,
    /// The proxy's IPv6 listener address; used when `port6 != 0`.
    pub addr6: [u8; 16],
    /// The proxy's IPv4 listener address; used when `port4 != 0`.
    pub addr4: [u8; 4],
    /// `SO_MARK` the proxy sets on its own upstream sockets; such sockets are
    /// never steered, so the proxy cannot loop back into itself.
    pub socket_mark: u32,
    pub port4: u16,
    pub port6: u16,
    /// `PROXY_FULL`: the proxy is at its node-wide client limit; new connects
    /// go direct instead of being refused.
    pub flags: u32,
    /// Mark bits set on every steered socket (under `steered_mark_mask`;
    /// none when the mask is 0), so that a pod's own redirection leaves it
    /// alone: Istio ambient's in-pod rules send every TCP connect to
    /// ztunnel unless it carries ztunnel's mark (0x539 under 0xfff).
    pub steered_mark: u32,
    pub steered_mark_mask: u32,
}

/// `ProxyConfig::flags`: at the node-wide client limit.
pub const PROXY_FULL: u32 = 1;

/// The original destination of a steered connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// The netns the client connected from.
    pub netns_cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    /// `ORIG_CLAIMED` once the proxy's side of the connection exists: from
    /// then on the proxy's socket owns the entry (it is taken on accept, or
    /// deleted when that socket closes), not the client's.
    pub state: u16,
    /// `Target::backend_id` of the service that matched.
    pub backend_id: u32,
}

/// `OrigDst::state`: the proxy's socket for the connection exists.
pub const ORIG_CLAIMED: u16 = 1;

/// Key of `rdr_orig_dst`: a steered connection as the client sees it, which
/// is also how the proxy sees it on accept (peer and local address swapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub client_addr: [u8; 16],
    pub proxy_addr: [u8; 16],
    pub client_port: u16,
    pub proxy_port: u16,
}

/// The only entry (index 0) of the per-CPU `rdr_counters` array. Only connects
/// to a configured Redis target are counted; every other connect on the node
/// is left alone without bookkeeping.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Rewritten to the node proxy.
    pub steered: u64,
    /// From a namespace that is not enrolled: left alone.
    pub passed: u64,
    /// The proxy's own upstream connects (marked): left alone.
    pub proxy_own: u64,
    /// Enrolled, but the proxy's heartbeat was stale or its listener gone:
    /// sent direct (fail open).
    pub proxy_down: u64,
    /// Enrolled, but the proxy was at its node-wide client limit: sent
    /// direct instead of being refused.
    pub proxy_full: u64,
    /// A loopback destination (127/8, ::1) matching a wildcard target: the
    /// pod's own Redis, never steered.
    pub loopback: u64,
    /// A socket carrying the proxy's mark outside the proxy's network
    /// namespace (a pod trying to opt out): steered as any other.
    pub foreign_mark: u64,
    /// Could not record the original destination: sent direct. Also counts
    /// established steered connections whose entry could not be written.
    pub errors: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Self) {
        self.steered += other.steered;
        self.passed += other.passed;
        self.proxy_own += other.proxy_own;
        self.proxy_down += other.proxy_down;
        self.proxy_full += other.proxy_full;
        self.loopback += other.loopback;
        self.foreign_mark += other.foreign_mark;
        self.errors += other.errors;
    }
}

/// `[u8; 16]` form of an IPv4 address, as stored in every key here.
pub const fn ipv4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Whether a 16-byte address is IPv4-mapped.
pub const fn is_ipv4_mapped(addr: &[u8; 16]) -> bool {
    matches!(addr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, _, _, _, _])
}

/// Whether a 16-byte address is loopback: 127/8 (IPv4-mapped) or `::1`.
/// Such a destination is the pod's own, never a Service.
pub const fn is_loopback(addr: &[u8; 16]) -> bool {
    matches!(
        addr,
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, _, _, _]
            | [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    )
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, have no implicit
    // padding and are valid for any bit pattern.
    unsafe impl aya::Pod for super::NetnsKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Enrollment {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TargetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Target {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProxyConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockTuple {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    // Layouts are ABI with the kernel side and with pinned maps that outlive
    // a daemon upgrade: any change must be deliberate.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<NetnsKey>(), 8);
        assert_eq!(size_of::<Enrollment>(), 16);
        assert_eq!(size_of::<TargetKey>(), 20);
        assert_eq!(size_of::<Target>(), 4);
        assert_eq!(
            size_of::<ProxyConfig>(),
            8 + 8 + 8 + 16 + 4 + 4 + 2 + 2 + 4 + 4 + 4
        );
        assert_eq!(size_of::<OrigDst>(), 8 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<SockTuple>(), 36);
        assert_eq!(size_of::<Counters>(), 64);
    }

    #[test]
    fn the_port_bitmap_holds_exactly_the_targets_ports() {
        let ports = [0, 1, 63, 64, 6379, 6379, 26379, 65535];
        let words = port_bitmap(ports);
        for port in 0..=u16::MAX {
            let set = words[port_word(port) as usize] & port_bit(port) != 0;
            assert_eq!(set, ports.contains(&port), "port {port}");
        }
        assert_eq!(PORT_WORDS, 1024);
        assert_eq!(port_word(u16::MAX), PORT_WORDS - 1);
    }

    #[test]
    fn loopback_is_127_slash_8_and_ipv6_one() {
        assert!(is_loopback(&ipv4_mapped([127, 0, 0, 1])));
        assert!(is_loopback(&ipv4_mapped([127, 200, 3, 4])));
        let mut v6_one = [0u8; 16];
        v6_one[15] = 1;
        assert!(is_loopback(&v6_one));
        assert!(!is_loopback(&ipv4_mapped([10, 96, 0, 10])));
        assert!(!is_loopback(&ipv4_mapped([128, 0, 0, 1])));
        assert!(!is_loopback(&[0; 16]));
    }

    #[test]
    fn ipv4_mapping_round_trips() {
        let mapped = ipv4_mapped([10, 96, 0, 10]);
        assert!(is_ipv4_mapped(&mapped));
        assert_eq!(&mapped[12..], &[10, 96, 0, 10]);
        assert!(!is_ipv4_mapped(&[0; 16]));
    }
}
