//! redirector's kernel side: cgroup `connect4`/`connect6` programs that steer
//! an enrolled namespace's connects to Redis onto the node proxy, and a
//! `sock_ops` program that re-keys each steered connection's original
//! destination by 4-tuple so the proxy can find it on accept.
//!
//! Every program returns "allow": redirector rewrites connects, it never
//! refuses one. When in doubt (no proxy heartbeat, a map full) the connect
//! goes where the application asked (fail open).
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr, bpf_sock_ops},
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use redirector_ebpf::{
    Counters, Enrollment, MAX_ENROLLED, MAX_ORIG_DST, MAX_PENDING, MAX_TARGETS, NetnsKey, OrigDst,
    ProxyConfig, SockTuple, Target, TargetKey, ipv4_mapped, is_ipv4_mapped,
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
    // Runs on the client side, in softirq, when the SYN-ACK arrives: before
    // the proxy can accept, so the proxy never races this insert.
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: the kernel hands a valid `bpf_sock_ops` for this hook.
        unsafe { rekey_by_tuple(&ctx) };
    }
    0
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
        // Read every address field at its fixed offset before branching:
        // otherwise LLVM selects between the IPv4 and IPv6 field pointers,
        // and the verifier refuses a load through a computed ctx offset.
        let family = read_volatile(addr_of!((*ops).family));
        let local4 = read_volatile(addr_of!((*ops).local_ip4)).to_ne_bytes();
        let remote4 = read_volatile(addr_of!((*ops).remote_ip4)).to_ne_bytes();
        let mut local6 = [0u8; 16];
        let mut remote6 = [0u8; 16];
        for i in 0..4 {
            let l = read_volatile(addr_of!((*ops).local_ip6[i])).to_ne_bytes();
            let r = read_volatile(addr_of!((*ops).remote_ip6[i])).to_ne_bytes();
            local6[i * 4..i * 4 + 4].copy_from_slice(&l);
            remote6[i * 4..i * 4 + 4].copy_from_slice(&r);
        }
        let (client_addr, proxy_addr) = match family {
            AF_INET => (ipv4_mapped(local4), ipv4_mapped(remote4)),
            AF_INET6 => (local6, remote6),
            _ => return,
        };
        // local_port is host order; remote_port holds the network-order port
        // in its upper 16 bits on little-endian hosts.
        let client_port = read_volatile(addr_of!((*ops).local_port)) as u16;
        let proxy_port = u16::from_be((read_volatile(addr_of!((*ops).remote_port)) >> 16) as u16);
        let key = SockTuple {
            client_addr,
            proxy_addr,
            client_port,
            proxy_port,
        };
        if ORIG_DST.insert(key, orig, 0).is_err()
            && let Some(counters) = COUNTERS.get_ptr_mut(0)
        {
            (*counters).errors += 1;
        }
        let _ = PENDING.remove(cookie);
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
