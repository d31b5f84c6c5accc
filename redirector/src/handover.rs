//! Stopping without dropping anything: the SIGTERM half of an upgrade.
//!
//! A new `redirector run` starts while the old one serves: it binds the
//! proxy and admin addresses beside the old daemon's (`SO_REUSEPORT`),
//! adopts the pins, takes the CNI socket over and beats the heartbeat too.
//! The new daemon joins the listening group only once its backends are up
//! (or after [`PREDECESSOR_WAIT`]): a connection it took before would be
//! relayed as is. When the old daemon is told to stop it looks for such a
//! successor listening on its proxy addresses ([`others_listen`]):
//!
//! - **Successor there (handover):** the heartbeat is left alone (the
//!   successor keeps it fresh, so steering never goes direct), the old
//!   listeners close, and the connections waiting in their accept queues
//!   move to the successor's listener (the `redir_reuseport` program's
//!   `SELECT_OR_MIGRATE`) instead of being reset.
//! - **No successor (a plain stop):** the heartbeat is cleared first, so new
//!   connects go direct, then the listeners close.
//!
//! Either way the clients already connected are then drained: each is
//! closed at a request boundary once it has been quiet for a moment
//! (`session::QUIET_BEFORE_LEAVING`), long-lived ones (subscribers, blocked
//! commands, busy pipelines, relays) are waited for up to `--drain-grace`,
//! and the daemon exits when none is left or the grace period is over.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

/// How often the drain looks at who is left.
pub const DRAIN_CHECK: Duration = Duration::from_millis(100);

/// How long a new daemon waits for its backends before it listens beside
/// the old one (which serves meanwhile).
pub const PREDECESSOR_WAIT: Duration = Duration::from_secs(30);

/// `st` of a listening socket in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";

/// How many listening sockets `table` (the text of `/proc/net/tcp` or
/// `/proc/net/tcp6`) has on exactly `addr`.
pub fn listeners_on(table: &str, addr: SocketAddr) -> usize {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            (state == TCP_LISTEN).then_some(local)
        })
        .filter(|local| parse_local(local) == Some(addr))
        .count()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the kernel
/// prints each 32-bit word of the address as a native-endian number.
fn parse_local(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether another process listens on every one of `addrs` besides this
/// daemon's own `ours_each` listeners per address (one per worker, or
/// none before it listens): at start, a predecessor still serving; at
/// stop, a successor that takes the clients this daemon stops accepting.
pub fn others_listen(addrs: &[SocketAddr], ours_each: usize) -> bool {
    let read = |file: &str| std::fs::read_to_string(format!("/proc/self/net/{file}"));
    let (Ok(v4), Ok(v6)) = (read("tcp"), read("tcp6")) else {
        return false;
    };
    !addrs.is_empty()
        && addrs.iter().all(|&addr| {
            let table = if addr.is_ipv4() { &v4 } else { &v6 };
            listeners_on(table, addr) > ours_each
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as Linux 6.18 prints them (x86-64, little-endian).
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3C13 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0
   1: 0100007F:3C13 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31338 1 0000000000000000 100 0 0 10 0
   2: 0100007F:3C13 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 31339 1 0000000000000000 20 4 30 10 -1
   3: 0101A8C0:3C13 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31340 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000100007F:3C13 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:3C13 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 100 0 0 10 0
";

    #[test]
    #[cfg(target_endian = "little")]
    fn listeners_are_counted_on_their_exact_address_and_only_while_listening() {
        let proxy: SocketAddr = "127.0.0.1:15379".parse().unwrap();
        assert_eq!(
            listeners_on(TCP, proxy),
            2,
            "the established line is not a listener"
        );
        assert_eq!(listeners_on(TCP, "192.168.1.1:15379".parse().unwrap()), 1);
        assert_eq!(listeners_on(TCP, "127.0.0.1:15380".parse().unwrap()), 0);
        assert_eq!(listeners_on(TCP6, "[::1]:15379".parse().unwrap()), 1);
        assert_eq!(
            listeners_on(TCP6, "[::ffff:127.0.0.1]:15379".parse().unwrap()),
            1
        );
        assert_eq!(listeners_on("", proxy), 0);
        assert_eq!(listeners_on("header\n garbage", proxy), 0);
    }

    #[test]
    fn a_successor_is_seen_only_beside_this_daemons_own_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(!others_listen(&[addr], 1), "alone");
        assert!(others_listen(&[addr], 0), "one listener that is not ours");
        drop(listener);
        assert!(!others_listen(&[addr], 0), "closed");
        assert!(!others_listen(&[], 0), "no address: nobody to hand to");
    }
}
