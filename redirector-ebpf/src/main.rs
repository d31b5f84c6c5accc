//! redirector's kernel side: cgroup `connect4`/`connect6` programs that steer
//! an enrolled namespace's connects to Redis onto the node proxy, and a
//! `sock_ops` program that re-keys each steered connection's original
//! destination by 4-tuple so the proxy can find it on accept, and removes
//! the entry when the connection ends without the proxy taking it.
//!
//! Every program lets the operation proceed: redirector rewrites connects, it
//! never refuses one, and its `sock_ops` program returns 1 so that the
//! replies of other `sock_ops` programs on the node (a CNI's, a tuning
//! agent's) stand: the kernel discards every program's reply when any
//! program returns 0. When in doubt (no proxy, a map full) the connect goes
//! where the application asked (fail open).
#![no_std]
#![no_main]

use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, null_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock, bpf_sock_addr, bpf_sock_ops,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SkStorage, SockMap},
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_map_lookup_elem,
        bpf_setsockopt, bpf_sk_release, bpf_sk_storage_delete, bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock_addr, sk_reuseport, sock_ops},
    programs::{SkReuseportContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use redirector_ebpf::{
    Counters, Enrollment, LISTENER_IPV4, LISTENER_IPV6, MAX_ENROLLED, MAX_LISTENERS, MAX_ORIG_DST,
    MAX_TARGETS, NetnsKey, ORIG_CLAIMED, OrigDst, PORT_WORDS, PROXY_FULL, ProxyConfig, SockTuple,
    Target, TargetKey, ipv4_mapped, is_ipv4_mapped, is_loopback, port_bit, port_word,
};

/// cgroup sock_addr verdict: let the (possibly rewritten) connect proceed.
const ALLOW: i32 = 1;
/// sock_ops: success, so that the kernel keeps `reply` (ours and others').
const SOCK_OPS_OK: u32 = 1;
/// sk_reuseport: no socket chosen, so the kernel picks one by hash.
const SK_PASS: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const TCP_CLOSE: u32 = 7;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

#[btf_map(name = "rdr_enrolled")]
static ENROLLED: HashMap<NetnsKey, Enrollment, { MAX_ENROLLED as usize }> = HashMap::new();

#[btf_map(name = "rdr_targets")]
static TARGETS: HashMap<TargetKey, Target, { MAX_TARGETS as usize }> = HashMap::new();

/// One bit per port that some target has; kept a superset of
/// `rdr_targets`' ports by the daemon (bits set before a target goes in,
/// cleared after it goes).
#[btf_map(name = "rdr_redis_ports")]
static REDIS_PORTS: Array<u64, { PORT_WORDS as usize }> = Array::new();

#[btf_map(name = "rdr_proxy")]
static PROXY: Array<ProxyConfig, 1> = Array::new();

/// The original destination of a steered socket, from `connect()` until the
/// handshake completes and `sock_ops` re-keys it. Socket storage: a connect
/// that never establishes (closed early, refused, timed out) leaves nothing
/// behind, and one pod's churn cannot evict another pod's entries.
#[btf_map(name = "rdr_pending")]
static PENDING: SkStorage<OrigDst> = SkStorage::new();

#[btf_map(name = "rdr_orig_dst")]
static ORIG_DST: LruHashMap<SockTuple, OrigDst, { MAX_ORIG_DST as usize }> = LruHashMap::new();

#[btf_map(name = "rdr_counters")]
static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();

/// The proxy's listening sockets, put here by the daemon. A socket leaves a
/// sockmap when it closes, so when the proxy dies its connects go direct at
/// once instead of being refused until the heartbeat goes stale.
#[btf_map(name = "rdr_listener")]
static LISTENER: SockMap<{ MAX_LISTENERS as usize }> = SockMap::new();

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
    // SAFETY: the kernel hands a valid `bpf_sock_ops` for this hook.
    unsafe {
        match ctx.op() {
            // The client side, in softirq, when the SYN-ACK arrives: before
            // the proxy can accept, so the proxy never races this insert.
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => rekey_by_tuple(&ctx),
            // The proxy's side, when the client's ACK arrives.
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => claim_for_proxy(&ctx),
            BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => forget_on_close(&ctx),
            _ => {}
        }
    }
    SOCK_OPS_OK
}

/// Attached to the proxy's `SO_REUSEPORT` group, never to a cgroup: it
/// chooses nothing (the kernel spreads connections by hash, as without a
/// program). Its attach type, `SELECT_OR_MIGRATE`, is what matters: when an
/// old proxy closes its listener during an upgrade, the connections waiting
/// in its accept queue (and half-open ones) move to the new proxy's
/// listener instead of being reset, for this group only (the node-wide
/// `net.ipv4.tcp_migrate_req` stays as the node has it).
#[sk_reuseport(migrate)]
pub fn redir_reuseport(_ctx: SkReuseportContext) -> u32 {
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
            u32::from_ne_bytes((*proxy).addr4),
        );
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from((*proxy).port4.to_be()),
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
            (ipv4_mapped((*proxy).addr4), (*proxy).port4)
        } else {
            ((*proxy).addr6, (*proxy).port6)
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
/// returned (a map value, valid for the program's run: the 512-byte stack
/// has no room for copies).
///
/// # Safety
/// `ctx.sock_addr` must point to the hook's context.
#[inline(always)]
unsafe fn steer(ctx: &SockAddrContext, addr: [u8; 16], port: u16) -> Option<*const ProxyConfig> {
    // Cheapest test first: almost every connect on a node is not to a Redis
    // port, and one array read (no key to hash) says so. Measured with
    // `cargo xtask bench --only connect`: two hash lookups were ~150 ns of
    // a ~30 µs connect that never goes near Redis.
    if REDIS_PORTS.get(port_word(port))? & port_bit(port) == 0 {
        return None;
    }
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
        // A pod's own Redis (a sidecar cache on 127.0.0.1:6379) matches a
        // wildcard target but is never a Service: leave it alone. Rewriting
        // a socket already bound to loopback would also fail its connect.
        if is_loopback(&addr) {
            (*counters).loopback += 1;
            return None;
        }
        let backend_id = (*target).backend_id;
        let netns_cookie = bpf_get_netns_cookie(ctx.as_ptr());

        // The mark only means "the proxy's own socket" in the proxy's own
        // namespace: a pod process with CAP_NET_RAW can set any mark.
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        let mark = read_volatile(addr_of!((*sk).mark));
        if (*proxy).socket_mark != 0 && mark == (*proxy).socket_mark {
            if netns_cookie == (*proxy).netns_cookie {
                (*counters).proxy_own += 1;
                return None;
            }
            (*counters).foreign_mark += 1;
        }

        if ENROLLED.get_ptr(NetnsKey { netns_cookie }).is_none() {
            (*counters).passed += 1;
            return None;
        }

        let v4 = is_ipv4_mapped(&addr);
        if (*proxy).liveness_ns != 0 {
            let stale = (*proxy).heartbeat_ns == 0
                || bpf_ktime_get_boot_ns().saturating_sub((*proxy).heartbeat_ns)
                    > (*proxy).liveness_ns;
            if stale || !listener_up(if v4 { LISTENER_IPV4 } else { LISTENER_IPV6 }) {
                (*counters).proxy_down += 1;
                return None;
            }
            if (*proxy).flags & PROXY_FULL != 0 {
                (*counters).proxy_full += 1;
                return None;
            }
        }

        let has_listener = if v4 {
            (*proxy).port4 != 0
        } else {
            (*proxy).port6 != 0
        };
        let mut orig = OrigDst {
            netns_cookie,
            addr,
            port,
            state: 0,
            backend_id,
        };
        if !has_listener || !mark_steered(ctx, mark, &*proxy) || !remember_pending(ctx, &mut orig) {
            (*counters).errors += 1;
            return None;
        }
        (*counters).steered += 1;
        debug!(
            ctx,
            "steered socket {} from netns {} (port {})",
            bpf_get_socket_cookie(ctx.as_ptr()),
            netns_cookie,
            port
        );
        Some(proxy)
    }
}

/// Whether the proxy's listener of a family is open: the daemon put it in
/// `rdr_listener`, and the kernel takes it out when it closes.
#[inline(always)]
fn listener_up(slot: u32) -> bool {
    let key = slot;
    // SAFETY: a sockmap lookup returns a referenced socket or null; the
    // reference is released before returning.
    unsafe {
        let sk = bpf_map_lookup_elem(map_ptr(addr_of!(LISTENER)), addr_of!(key).cast());
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}

/// Sets the configured mark bits on a steered socket (a no-op without a
/// mask). A socket that cannot carry them is not steered: the pod's own
/// redirection (ztunnel's) would take the connect past the proxy's
/// original-destination check and have it refused.
///
/// # Safety
/// `ctx.sock_addr` must point to the hook's context.
#[inline(always)]
unsafe fn mark_steered(ctx: &SockAddrContext, mark: u32, proxy: &ProxyConfig) -> bool {
    let mask = proxy.steered_mark_mask;
    if mask == 0 {
        return true;
    }
    let mut marked = (mark & !mask) | (proxy.steered_mark & mask);
    // SAFETY: setsockopt on the hook's own socket, with a 4-byte value.
    let ret = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            addr_of_mut!(marked).cast(),
            4,
        )
    };
    ret == 0
}

/// Stores `orig` in the connecting socket's storage.
///
/// # Safety
/// `ctx.sock_addr` must point to the hook's context.
#[inline(always)]
unsafe fn remember_pending(ctx: &SockAddrContext, orig: &mut OrigDst) -> bool {
    // SAFETY: the context's socket is valid for the program's run.
    let stored = unsafe { PENDING.get_or_insert_ptr_mut(ctx, Some(orig)) };
    if stored.is_null() {
        return false;
    }
    // A socket that connects again (after a failed connect) already has
    // storage, which get_or_insert left as it was.
    // SAFETY: storage values are valid for the program's run.
    unsafe { *stored = *orig };
    true
}

/// The address of a BTF map definition, as helpers take it.
#[inline(always)]
fn map_ptr<T>(map: *const T) -> *mut c_void {
    map.cast_mut().cast()
}

/// Both ends of the context's connection, addresses 16 bytes (IPv4 mapped):
/// `(local, local_port, remote, remote_port)`.
///
/// # Safety
/// `ops` must be the live context.
#[inline(always)]
unsafe fn endpoints(ops: *mut bpf_sock_ops) -> Option<([u8; 16], u16, [u8; 16], u16)> {
    // SAFETY: caller guarantees `ops` is the live context.
    unsafe {
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
        let (local, remote) = match family {
            AF_INET => (ipv4_mapped(local4), ipv4_mapped(remote4)),
            AF_INET6 => (local6, remote6),
            _ => return None,
        };
        // local_port is host order; remote_port holds the network-order port
        // in its upper 16 bits on little-endian hosts.
        let local_port = read_volatile(addr_of!((*ops).local_port)) as u16;
        let remote_port = u16::from_be((read_volatile(addr_of!((*ops).remote_port)) >> 16) as u16);
        Some((local, local_port, remote, remote_port))
    }
}

/// The context's full socket, for socket storage.
///
/// # Safety
/// `ops` must be the live context.
#[inline(always)]
unsafe fn full_socket(ops: *mut bpf_sock_ops) -> *mut bpf_sock {
    // SAFETY: caller guarantees `ops` is the live context; `sk` is an
    // 8-byte pointer field the verifier lets us load whole.
    unsafe { read_volatile(addr_of!((*ops).__bindgen_anon_2.sk)) }
}

/// Whether `addr:port` is one of the proxy's listeners.
#[inline(always)]
fn is_proxy_listener(proxy: &ProxyConfig, addr: &[u8; 16], port: u16) -> bool {
    if is_ipv4_mapped(addr) {
        proxy.port4 != 0 && port == proxy.port4 && *addr == ipv4_mapped(proxy.addr4)
    } else {
        proxy.port6 != 0 && port == proxy.port6 && *addr == proxy.addr6
    }
}

/// Client side, established: moves the pending destination to
/// `rdr_orig_dst` under the connection's 4-tuple, and asks for the state
/// callback so the entry goes if the connection ends before the proxy has a
/// socket for it.
///
/// # Safety
/// `ctx.ops` must point to the hook's context.
#[inline(always)]
unsafe fn rekey_by_tuple(ctx: &SockOpsContext) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: `ops` is the live context; storage values are valid for the
    // program's run.
    unsafe {
        let sk = full_socket(ops);
        if sk.is_null() {
            return;
        }
        let pending = bpf_sk_storage_get(map_ptr(addr_of!(PENDING)), sk.cast(), null_mut(), 0)
            .cast::<OrigDst>();
        if pending.is_null() {
            return;
        }
        let orig = *pending;
        let _ = bpf_sk_storage_delete(map_ptr(addr_of!(PENDING)), sk.cast());
        let Some((client_addr, client_port, proxy_addr, proxy_port)) = endpoints(ops) else {
            return;
        };
        let key = SockTuple {
            client_addr,
            proxy_addr,
            client_port,
            proxy_port,
        };
        if ORIG_DST.insert(key, orig, 0).is_err() {
            if let Some(counters) = COUNTERS.get_ptr_mut(0) {
                (*counters).errors += 1;
            }
            return;
        }
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

/// Proxy side, established: marks the entry as owned by the proxy's socket
/// (taken on accept, deleted when this socket closes), and asks for this
/// socket's state callback.
///
/// # Safety
/// `ctx.ops` must point to the hook's context.
#[inline(always)]
unsafe fn claim_for_proxy(ctx: &SockOpsContext) {
    // SAFETY: `ops` is the live context; map values are valid for the
    // program's run.
    unsafe {
        let Some((local, local_port, remote, remote_port)) = endpoints(ctx.ops) else {
            return;
        };
        let Some(proxy) = PROXY.get_ptr(0) else {
            return;
        };
        // Every server socket on the node passes here; only the proxy's
        // listener has entries.
        if !is_proxy_listener(&*proxy, &local, local_port) {
            return;
        }
        let key = SockTuple {
            client_addr: remote,
            proxy_addr: local,
            client_port: remote_port,
            proxy_port: local_port,
        };
        let Some(orig) = ORIG_DST.get_ptr_mut(key) else {
            return;
        };
        (*orig).state = ORIG_CLAIMED;
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

/// Either side, closed: removes the connection's entry if the proxy never
/// took it. The proxy's socket removes it unconditionally (a client the
/// proxy refused, a backlog the proxy never accepted before it died); the
/// client's only while no proxy socket exists for it (a backlog overflow, a
/// reset), since a proxy socket still in the accept queue needs the entry.
///
/// # Safety
/// `ctx.ops` must point to the hook's context.
#[inline(always)]
unsafe fn forget_on_close(ctx: &SockOpsContext) {
    // SAFETY: `ops` is the live context; map values are valid for the
    // program's run.
    unsafe {
        let Some((local, local_port, remote, remote_port)) = endpoints(ctx.ops) else {
            return;
        };
        let Some(proxy) = PROXY.get_ptr(0) else {
            return;
        };
        if is_proxy_listener(&*proxy, &local, local_port) {
            let key = SockTuple {
                client_addr: remote,
                proxy_addr: local,
                client_port: remote_port,
                proxy_port: local_port,
            };
            let _ = ORIG_DST.remove(key);
            return;
        }
        let key = SockTuple {
            client_addr: local,
            proxy_addr: remote,
            client_port: local_port,
            proxy_port: remote_port,
        };
        if let Some(orig) = ORIG_DST.get_ptr(key)
            && (*orig).state & ORIG_CLAIMED == 0
        {
            let _ = ORIG_DST.remove(key);
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
