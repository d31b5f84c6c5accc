//! Two "nodes" for cross-node tests: network namespaces joined straight by
//! a veth pair, and HBONE certificates for both from one local CA.

use std::{net::SocketAddr, path::Path};

use crate::{
    daemon,
    netns::Netns,
    process::{path_str, run_ok},
    unique,
};

pub const NODE_A: &str = "10.77.0.1";
pub const NODE_B: &str = "10.77.0.2";
/// Every node's identity (the DaemonSet's service account).
pub const NODE_IDENTITY: &str = "spiffe://cluster.local/ns/redirector/sa/node";

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

/// A veth pair straight between two node namespaces, `NODE_A` on `a` and
/// `NODE_B` on `b`, and no default route: nothing leaves the two.
pub fn link_nodes(a: &Netns, b: &Netns) {
    let (va, vb) = (unique("rva"), unique("rvb"));
    let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
    run_ok(
        "ip",
        &[
            "link",
            "add",
            va,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            vb,
            "netns",
            b.name(),
        ],
    );
    a.ip(&["addr", "add", &format!("{NODE_A}/24"), "dev", va]);
    b.ip(&["addr", "add", &format!("{NODE_B}/24"), "dev", vb]);
    a.ip(&["link", "set", va, "up"]);
    b.ip(&["link", "set", vb, "up"]);
}

/// `redirector certs ARGS`, asserting success.
pub fn certs(args: &[&str]) {
    let out = std::process::Command::new(daemon::binary())
        .arg("certs")
        .args(args)
        .output()
        .expect("run redirector certs");
    assert!(out.status.success(), "redirector certs {args:?}: {out:?}");
}

/// A CA in `dir/ca`, and certificates for `NODE_IDENTITY` in `dir/a` and
/// `dir/b` (one per node).
pub fn mint_node_certs(dir: &Path) {
    let ca = dir.join("ca");
    certs(&["ca", "--dir", path_str(&ca)]);
    for node in ["a", "b"] {
        certs(&[
            "issue",
            "--ca",
            path_str(&ca),
            "--identity",
            NODE_IDENTITY,
            "--out",
            path_str(&dir.join(node)),
        ]);
    }
}
