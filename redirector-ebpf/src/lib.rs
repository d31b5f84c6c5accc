//! The map ABI shared by redirector's kernel programs and its userspace daemon.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (hash-map keys are
//! compared bytewise, so padding must be explicit and zeroed) and is compiled
//! by both sides, so the two can never disagree about a layout. Addresses are
//! always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so one key
//! type serves `connect4`, `connect6` and dual-stack sockets. Ports are in
//! host byte order, so `bpftool map dump` shows them as people write them.
#![no_std]

/// Names of the pinned maps, as they appear under the pin directory and in
/// `bpftool map list`. The kernel keeps at most 15 characters of a map name.
pub mod map_names {
    pub const ENROLLED: &str = "rdr_enrolled";
    pub const TARGETS: &str = "rdr_targets";
    pub const PROXY: &str = "rdr_proxy";
    pub const PENDING: &str = "rdr_pending";
    pub const ORIG_DST: &str = "rdr_orig_dst";
    pub const COUNTERS: &str = "rdr_counters";
    /// aya-log's ring buffer. Pinned too, so programs loaded by different
    /// daemon runs (adopted ones, upgraded ones) all log into one buffer.
    pub const LOGS: &str = "AYA_LOGS";
    pub const ALL: [&str; 7] = [ENROLLED, TARGETS, PROXY, PENDING, ORIG_DST, COUNTERS, LOGS];
}

/// Names of the programs (ELF symbols and kernel program names).
pub mod program_names {
    pub const CONNECT4: &str = "redir_connect4";
    pub const CONNECT6: &str = "redir_connect6";
    pub const SOCK_OPS: &str = "redir_sockops";
    pub const ALL: [&str; 3] = [CONNECT4, CONNECT6, SOCK_OPS];
}

/// Capacities. `PENDING` only holds connects between `connect()` and the
/// handshake; `ORIG_DST` holds established connections not yet accepted by the
/// proxy. Both are LRU maps, so a burst degrades to evicting the oldest entry
/// rather than failing to steer.
pub const MAX_ENROLLED: u32 = 16_384;
pub const MAX_TARGETS: u32 = 1_024;
pub const MAX_PENDING: u32 = 65_536;
pub const MAX_ORIG_DST: u32 = 65_536;

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

/// Value of `rdr_targets`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Which configured Redis cluster this service fronts (index in the
    /// daemon's configuration); lets the proxy label and route by service.
    pub cluster_id: u32,
}

/// The only entry (index 0) of the `rdr_proxy` array: where steered connects
/// go and how the proxy is recognised.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// CLOCK_BOOTTIME (ns) of the proxy's last heartbeat; 0 when it is down.
    pub heartbeat_ns: u64,
    /// Steer only while the heartbeat is younger than this. When it is older
    /// the proxy is presumed dead and connects go direct (fail open).
    /// 0 disables the check: always steer (fail closed).
    pub liveness_ns: u64,
    /// The proxy's IPv6 listener address; used when `port6 != 0`.
    pub addr6: [u8; 16],
    /// The proxy's IPv4 listener address; used when `port4 != 0`.
    pub addr4: [u8; 4],
    /// `SO_MARK` the proxy sets on its own upstream sockets; such sockets are
    /// never steered, so the proxy cannot loop back into itself.
    pub socket_mark: u32,
    pub port4: u16,
    pub port6: u16,
    pub _pad: u32,
}

/// The original destination of a steered connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// The netns the client connected from.
    pub netns_cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
    /// `Target::cluster_id` of the service that matched.
    pub cluster_id: u32,
}

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
    /// Enrolled, but the proxy's heartbeat was stale: sent direct (fail open).
    pub proxy_down: u64,
    /// Could not record the original destination: sent direct.
    pub errors: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Self) {
        self.steered += other.steered;
        self.passed += other.passed;
        self.proxy_own += other.proxy_own;
        self.proxy_down += other.proxy_down;
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
        assert_eq!(size_of::<ProxyConfig>(), 8 + 8 + 16 + 4 + 4 + 2 + 2 + 4);
        assert_eq!(size_of::<OrigDst>(), 8 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<SockTuple>(), 36);
        assert_eq!(size_of::<Counters>(), 40);
    }

    #[test]
    fn ipv4_mapping_round_trips() {
        let mapped = ipv4_mapped([10, 96, 0, 10]);
        assert!(is_ipv4_mapped(&mapped));
        assert_eq!(&mapped[12..], &[10, 96, 0, 10]);
        assert!(!is_ipv4_mapped(&[0; 16]));
    }
}
