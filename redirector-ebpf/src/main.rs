//! redirector's kernel side: cgroup `connect4`/`connect6` programs that steer
//! an enrolled namespace's connects to Redis onto the node proxy, a
//! `sock_ops` program that re-keys each steered connection's original
//! destination by 4-tuple so the proxy can find it on accept, and an `sk_msg`
//! program that hands the proxy's replies straight to the pod's socket.
//!
//! Acceleration: `sock_ops` puts both ends of a steered connection in
//! sockhashes (the pod's socket when its handshake completes, the proxy's
//! when the proxy's side completes, which is always later). Writes on either
//! socket then run `sk_msg`, which queues them on the other socket's receive
//! side, skipping the node's TCP/IP path (most of the cost of a small
//! message). A connection never mixes paths in a way that could reorder it:
//! - proxy to pod: the pod's socket is tracked before the proxy can even
//!   accept, so either all replies take the shortcut or none do;
//! - pod to proxy: the first write that cannot take the shortcut (the
//!   proxy's socket not tracked yet) turns the direction to TCP for good;
//!   queued shortcut data is always read before later TCP data.
//!
//! A shortcut queue has no receive-buffer limit, so the pod-to-proxy
//! direction carries a budget (`FLOW_BUDGET` bytes since the proxy's last
//! reply; the proxy also turns it off when it stops reading a client):
//! past it, that direction is TCP again and TCP's flow control bounds what a
//! pod can queue on the shared proxy. What the proxy queues for a pod is
//! charged to the pod's own socket memory.
//!
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, bpf_sock_addr, bpf_sock_ops, sk_action::SK_PASS,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    macros::{btf_map, cgroup_sock_addr, sk_msg, sock_ops},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use redirector_ebpf::{
    AccelCounters, Counters, Enrollment, FLAG_ACCELERATE, FLOW_BUDGET, FlowState, MAX_ENROLLED,
    MAX_ORIG_DST, MAX_PENDING, MAX_SOCKS, MAX_TARGETS, NetnsKey, OrigDst, ProxyConfig, SockTuple,
    Target, TargetKey, ipv4_mapped, is_ipv4_mapped,
};

/// cgroup sock_addr verdict: let the (possibly rewritten) connect proceed.
const ALLOW: i32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[btf_map(name = "rdr_enrolled")]
static ENROLLED: HashMap<NetnsKey, Enrollment, { MAX_ENROLLED as usize }> = HashMap::new();

#[btf_map(name = "rdr_targets")]
static TARGETS: HashMap<TargetKey, Target, { MAX_TARGETS as usize }> = HashMap::new();

#[btf_map(name = "rdr_proxy")]
static PROXY: Array<ProxyConfig, 1> = Array::new();

/// Socket cookie -> original destination, from `connect()` until the
/// handshake completes and `sock_ops` re-keys it.
#[btf_map(name = "rdr_pending")]
static PENDING: LruHashMap<u64, OrigDst, { MAX_PENDING as usize }> = LruHashMap::new();

#[btf_map(name = "rdr_orig_dst")]
static ORIG_DST: LruHashMap<SockTuple, OrigDst, { MAX_ORIG_DST as usize }> = LruHashMap::new();

#[btf_map(name = "rdr_counters")]
static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();

/// Steered pods' sockets, by connection. The daemon attaches
/// `redir_sk_msg` to this map and the next.
#[btf_map(name = "rdr_pod_socks")]
static POD_SOCKS: SockHash<SockTuple, { MAX_SOCKS as usize }> = SockHash::new();

/// The proxy's sockets of steered connections, by connection.
#[btf_map(name = "rdr_proxy_socks")]
static PROXY_SOCKS: SockHash<SockTuple, { MAX_SOCKS as usize }> = SockHash::new();

/// The pod-to-proxy direction of each tracked connection.
#[btf_map(name = "rdr_flows")]
static FLOWS: LruHashMap<SockTuple, FlowState, { MAX_SOCKS as usize }> = LruHashMap::new();

#[btf_map(name = "rdr_accel")]
static ACCEL: PerCpuArray<AccelCounters, 1> = PerCpuArray::new();

#[cgroup_sock_addr(connect4)]
pub fn redir_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for this hook.
    unsafe { connect4(&ctx) };
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn redir_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for this hook.
    unsafe { connect6(&ctx) };
    ALLOW
}

#[sock_ops]
pub fn redir_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        // The client side, in softirq, when the SYN-ACK arrives: before the
        // proxy can accept, so the proxy never races this insert.
        // SAFETY: the kernel hands a valid `bpf_sock_ops` for this hook.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => unsafe { rekey_by_tuple(&ctx) },
        // The proxy's side, when the client's ACK arrives.
        // SAFETY: as above.
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => unsafe { track_proxy_socket(&ctx) },
        _ => {}
    }
    0
}

#[sk_msg]
pub fn redir_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the kernel hands a valid `sk_msg_md` for this hook.
    unsafe { shortcut(&ctx) };
    // Never drop: a write that is not forwarded goes through TCP.
    SK_PASS
}

// The verifier only accepts full 4-byte loads and stores of these context
// fields, so every access below is a volatile `u32` access.

/// # Safety
/// `ctx.sock_addr` must point to the hook's context.
#[inline(always)]
unsafe fn connect4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: caller guarantees `sa` is the live context.
    unsafe {
        if !is_tcp(sa) {
            return;
        }
        let ip4 = read_volatile(addr_of!((*sa).user_ip4));
        let port = u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16);
        let addr = ipv4_mapped(ip4.to_ne_bytes());
        let Some(proxy) = steer(ctx, addr, port) else {
            return;
        };
        write_volatile(
            addr_of_mut!((*sa).user_ip4),
            u32::from_ne_bytes(proxy.addr4),
        );
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from(proxy.port4.to_be()),
        );
    }
}

/// # Safety
/// `ctx.sock_addr` must point to the hook's context.
#[inline(always)]
unsafe fn connect6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: caller guarantees `sa` is the live context.
    unsafe {
        if !is_tcp(sa) {
            return;
        }
        let mut addr = [0u8; 16];
        for (i, chunk) in addr.chunks_exact_mut(4).enumerate() {
            let word = read_volatile(addr_of!((*sa).user_ip6[i]));
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        let port = u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16);
        let Some(proxy) = steer(ctx, addr, port) else {
            return;
        };
        // A dual-stack socket dialling an IPv4-mapped address keeps talking
        // IPv4, so it goes to the IPv4 listener (steer() checked it exists).
        let (dst, dst_port) = if is_ipv4_mapped(&addr) {
            (ipv4_mapped(proxy.addr4), proxy.port4)
        } else {
            (proxy.addr6, proxy.port6)
        };
        for i in 0..4 {
            let word =
                u32::from_ne_bytes([dst[i * 4], dst[i * 4 + 1], dst[i * 4 + 2], dst[i * 4 + 3]]);
            write_volatile(addr_of_mut!((*sa).user_ip6[i]), word);
        }
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(dst_port.to_be()));
    }
}

/// # Safety
/// `sa` must point to the hook's context.
#[inline(always)]
unsafe fn is_tcp(sa: *mut bpf_sock_addr) -> bool {
    // SAFETY: caller guarantees `sa` is the live context.
    unsafe {
        read_volatile(addr_of!((*sa).type_)) == SOCK_STREAM
            && read_volatile(addr_of!((*sa).protocol)) == IPPROTO_TCP
    }
}

/// Decides whether a TCP connect to `addr:port` is steered. If it is, the
/// original destination has been recorded and the proxy to rewrite to is
/// returned.
///
/// # Safety
/// `ctx.sock_addr` must point to the hook's context.
#[inline(always)]
unsafe fn steer(ctx: &SockAddrContext, addr: [u8; 16], port: u16) -> Option<ProxyConfig> {
    // Cheapest test first: almost every connect on a node is not to Redis.
    let exact = TargetKey {
        addr,
        port,
        _pad: 0,
    };
    let wildcard = TargetKey {
        addr: [0; 16],
        port,
        _pad: 0,
    };
    let target = match TARGETS.get_ptr(exact) {
        Some(target) => target,
        None => TARGETS.get_ptr(wildcard)?,
    };
    let counters = COUNTERS.get_ptr_mut(0)?;
    let proxy = PROXY.get_ptr(0)?;
    // SAFETY: map values are valid for the program's run; the per-CPU entry
    // is only touched by this CPU (cgroup hooks run with migration disabled).
    unsafe {
        let proxy = *proxy;
        let cluster_id = (*target).cluster_id;

        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        let mark = read_volatile(addr_of!((*sk).mark));
        if proxy.socket_mark != 0 && mark == proxy.socket_mark {
            (*counters).proxy_own += 1;
            return None;
        }

        let netns_cookie = bpf_get_netns_cookie(ctx.as_ptr());
        if ENROLLED.get_ptr(NetnsKey { netns_cookie }).is_none() {
            (*counters).passed += 1;
            return None;
        }

        if proxy.liveness_ns != 0
            && (proxy.heartbeat_ns == 0
                || bpf_ktime_get_boot_ns().saturating_sub(proxy.heartbeat_ns) > proxy.liveness_ns)
        {
            (*counters).proxy_down += 1;
            return None;
        }

        let has_listener = if is_ipv4_mapped(&addr) {
            proxy.port4 != 0
        } else {
            proxy.port6 != 0
        };
        let orig = OrigDst {
            netns_cookie,
            addr,
            port,
            _pad: 0,
            cluster_id,
        };
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        if !has_listener || PENDING.insert(cookie, orig, 0).is_err() {
            (*counters).errors += 1;
            return None;
        }
        (*counters).steered += 1;
        debug!(
            ctx,
            "steered socket {} from netns {} (port {})", cookie, netns_cookie, port
        );
        Some(proxy)
    }
}

/// A TCP socket's own addresses, IPv4 as IPv4-mapped.
struct Ends {
    local: [u8; 16],
    remote: [u8; 16],
    local_port: u16,
    remote_port: u16,
}

impl Ends {
    /// The connection's key, for a socket on the pod's side.
    fn pod_side(&self) -> SockTuple {
        SockTuple {
            client_addr: self.local,
            proxy_addr: self.remote,
            client_port: self.local_port,
            proxy_port: self.remote_port,
        }
    }

    /// The connection's key, for a socket on the proxy's side.
    fn proxy_side(&self) -> SockTuple {
        SockTuple {
            client_addr: self.remote,
            proxy_addr: self.local,
            client_port: self.remote_port,
            proxy_port: self.local_port,
        }
    }
}

/// Reads a socket's addresses from a `bpf_sock_ops` or `sk_msg_md` context
/// (the two lay these fields out alike).
///
/// Every field is read at its fixed offset before branching: otherwise LLVM
/// selects between the IPv4 and IPv6 field pointers, and the verifier
/// refuses a load through a computed ctx offset. `local_port` is host order;
/// `remote_port` holds the network-order port in its upper 16 bits on
/// little-endian hosts.
macro_rules! read_ends {
    ($ctx:expr) => {{
        let c = $ctx;
        let family = read_volatile(addr_of!((*c).family));
        let local4 = read_volatile(addr_of!((*c).local_ip4)).to_ne_bytes();
        let remote4 = read_volatile(addr_of!((*c).remote_ip4)).to_ne_bytes();
        let mut local6 = [0u8; 16];
        let mut remote6 = [0u8; 16];
        for i in 0..4 {
            let l = read_volatile(addr_of!((*c).local_ip6[i])).to_ne_bytes();
            let r = read_volatile(addr_of!((*c).remote_ip6[i])).to_ne_bytes();
            local6[i * 4..i * 4 + 4].copy_from_slice(&l);
            remote6[i * 4..i * 4 + 4].copy_from_slice(&r);
        }
        let local_port = read_volatile(addr_of!((*c).local_port)) as u16;
        let remote_port = u16::from_be((read_volatile(addr_of!((*c).remote_port)) >> 16) as u16);
        match family {
            AF_INET => Some(Ends {
                local: ipv4_mapped(local4),
                remote: ipv4_mapped(remote4),
                local_port,
                remote_port,
            }),
            AF_INET6 => Some(Ends {
                local: local6,
                remote: remote6,
                local_port,
                remote_port,
            }),
            _ => None,
        }
    }};
}

fn accelerating() -> bool {
    // SAFETY: a map value, valid for the program's run.
    PROXY
        .get_ptr(0)
        .is_some_and(|proxy| unsafe { (*proxy).flags } & FLAG_ACCELERATE != 0)
}

/// Whether `addr:port` is one of the proxy's listeners.
fn is_proxy(proxy: &ProxyConfig, addr: &[u8; 16], port: u16) -> bool {
    if is_ipv4_mapped(addr) {
        proxy.port4 == port && addr[12..] == proxy.addr4
    } else {
        proxy.port6 == port && *addr == proxy.addr6
    }
}

/// # Safety
/// `ctx.ops` must point to the hook's context.
#[inline(always)]
unsafe fn rekey_by_tuple(ctx: &SockOpsContext) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = PENDING.get_ptr(cookie) else {
        return;
    };
    // SAFETY: `orig` is a live map value; `ops` is the live context.
    unsafe {
        let orig = *orig;
        let Some(ends) = read_ends!(ops) else {
            return;
        };
        let key = ends.pod_side();
        if ORIG_DST.insert(key, orig, 0).is_err()
            && let Some(counters) = COUNTERS.get_ptr_mut(0)
        {
            (*counters).errors += 1;
        }
        let _ = PENDING.remove(cookie);
        // A full map only means this connection keeps TCP. A fresh flow
        // entry replaces whatever an earlier connection with the same
        // tuple left.
        if accelerating()
            && FLOWS.insert(key, FlowState::default(), 0).is_ok()
            && POD_SOCKS
                .update(key, &mut *ops, u64::from(BPF_ANY))
                .is_err()
        {
            let _ = FLOWS.remove(key);
        }
    }
}

/// The proxy's socket of a steered connection: tracked so its writes run
/// `redir_sk_msg`. Other connections to the proxy are left alone.
///
/// # Safety
/// `ctx.ops` must point to the hook's context.
#[inline(always)]
unsafe fn track_proxy_socket(ctx: &SockOpsContext) {
    if !accelerating() {
        return;
    }
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: `ops` is the live context.
    unsafe {
        let Some(ends) = read_ends!(ops) else {
            return;
        };
        let key = ends.proxy_side();
        // A steered connection (its original destination is recorded until
        // the proxy accepts it) whose pod side is tracked. Flow entries
        // outlive their connections (LRU), so the first test matters.
        if ORIG_DST.get_ptr(key).is_some() && FLOWS.get_ptr(key).is_some() {
            let _ = PROXY_SOCKS.update(key, &mut *ops, u64::from(BPF_ANY));
        }
    }
}

/// # Safety
/// `ctx.msg` must point to the hook's context.
#[inline(always)]
unsafe fn shortcut(ctx: &SkMsgContext) {
    let md = ctx.msg;
    let Some(proxy) = PROXY.get_ptr(0) else {
        return;
    };
    let Some(counters) = ACCEL.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: `md` is the live context; map values are valid for the run;
    // the per-CPU entry is only touched by this CPU, and `sk_msg` runs in
    // process context, never nested.
    unsafe {
        let Some(ends) = read_ends!(md) else {
            return;
        };
        let size = u64::from(ctx.size());
        if is_proxy(&*proxy, &ends.local, ends.local_port) {
            let key = ends.proxy_side();
            // The proxy answered: the pod may send another budget's worth.
            if let Some(flow) = FLOWS.get_ptr_mut(key) {
                (*flow).unanswered = 0;
            }
            if POD_SOCKS.redirect_msg(ctx, key, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
                (*counters).replies_forwarded += 1;
                (*counters).reply_bytes += size;
            } else {
                (*counters).replies_tcp += 1;
            }
            return;
        }
        let key = ends.pod_side();
        let Some(flow) = FLOWS.get_ptr_mut(key) else {
            (*counters).requests_tcp += 1;
            return;
        };
        if (*flow).tcp_only != 0 {
            (*counters).requests_tcp += 1;
            return;
        }
        let within_budget = (*flow).unanswered + size <= FLOW_BUDGET;
        if within_budget
            && PROXY_SOCKS.redirect_msg(ctx, key, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS)
        {
            (*flow).unanswered += size;
            (*counters).requests_forwarded += 1;
            (*counters).request_bytes += size;
        } else {
            // For good: later shortcut data could overtake this write.
            (*flow).tcp_only = 1;
            (*counters).flows_to_tcp += 1;
            (*counters).requests_tcp += 1;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
