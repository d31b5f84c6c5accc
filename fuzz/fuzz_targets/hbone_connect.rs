//! The HBONE CONNECT check: whatever method, authority and headers a peer
//! sends on a tunnel stream, the listener refuses it or connects to an
//! endpoint it may reach; never a panic, and never anywhere else.
//!
//! Input: the request head as text, `METHOD URI` on the first line, then
//! `name: value` header lines (as h2 hands them over, after its own
//! checks); the first byte says whether the peer's identity is allowed
//! and whether the listener is on loopback.
#![no_main]

use std::net::SocketAddr;

use http::{Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use redirector::hbone::inbound::{self, Admission, Refusal};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, head)) = data.split_first() else {
        return;
    };
    let mut lines = head.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let mut words = first.splitn(2, |&b| b == b' ');
    let method = words.next().unwrap_or_default();
    let uri = words.next().unwrap_or_default();
    let mut builder = Request::builder().method(method).uri(uri);
    for line in lines {
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            builder = builder.header(&line[..colon], line[colon + 1..].trim_ascii());
        }
    }
    // h2 refuses what http cannot represent before a stream reaches us.
    let Ok(request) = builder.body(()) else {
        return;
    };
    let allowed = flags & 1 != 0;
    let listen: SocketAddr = if flags & 2 != 0 {
        "127.0.0.1:15008".parse().expect("addr")
    } else {
        "10.0.0.7:15008".parse().expect("addr")
    };
    let admission = inbound::admit(request.method(), request.uri(), allowed, listen);
    check(&admission, request.method(), request.uri(), allowed, listen);
});

fn check(admission: &Admission, method: &Method, uri: &Uri, allowed: bool, listen: SocketAddr) {
    match *admission {
        Admission::Connect(target) => {
            assert_eq!(method, Method::CONNECT);
            assert!(allowed, "connected for a peer the policy refuses");
            let authority = uri.authority().expect("connected without an authority");
            assert_eq!(authority.as_str().parse::<SocketAddr>().ok(), Some(target));
            let ip = target.ip();
            assert!(!ip.is_unspecified() && !ip.is_multicast(), "{target}");
            assert!(!ip.is_loopback() || listen.ip().is_loopback(), "{target}");
            assert!(
                target.port() != 0 && target.port() != listen.port(),
                "{target}"
            );
        }
        Admission::Refuse(refusal) => {
            // Refusals come in the documented order.
            match refusal {
                Refusal::NotConnect => assert_ne!(method, Method::CONNECT),
                Refusal::Identity => assert!(method == Method::CONNECT && !allowed),
                Refusal::NotLocalEndpoint => assert!(method == Method::CONNECT && allowed),
            }
            assert!(refusal.status().is_client_error());
        }
    }
}
