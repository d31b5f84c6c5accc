//! A real `redis-server`, stopped by PID on drop.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Stdio,
    time::Duration,
};

use crate::process::{Child, Place, wait_for};

pub struct RedisServer {
    addrs: Vec<SocketAddr>,
    place: Place,
    child: Child,
}

impl RedisServer {
    /// Starts a server bound to `binds` on `port`, without persistence, and
    /// waits until it answers PING.
    pub fn start(place: &Place, binds: &[IpAddr], port: u16, dir: &Path, extra: &[&str]) -> Self {
        let binds_arg: Vec<String> = binds.iter().map(ToString::to_string).collect();
        let mut cmd = place.command("redis-server");
        cmd.arg("--bind")
            .args(&binds_arg)
            .args(["--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--daemonize", "no", "--logfile", ""])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = Child::spawn(format!("redis-server :{port}"), cmd);
        let server = Self {
            addrs: binds.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
            place: place.clone(),
            child,
        };
        let addr = server.addrs[0];
        wait_for(
            &format!("redis-server on {addr}"),
            Duration::from_secs(10),
            || (server.cli(&["PING"]).trim() == "PONG").then_some(()),
        );
        server
    }

    /// [`Self::start`] on 127.0.0.1, on a free port, in this host's
    /// namespace: the usual test backend.
    pub fn start_local(dir: &Path, extra: &[&str]) -> Self {
        Self::start(
            &Place::default(),
            &[IpAddr::from([127, 0, 0, 1])],
            crate::ports::free_port(),
            dir,
            extra,
        )
    }

    /// [`Self::start`] as a replica of `primary`, once it has synced.
    pub fn start_replica(
        place: &Place,
        binds: &[IpAddr],
        port: u16,
        dir: &Path,
        primary: SocketAddr,
    ) -> Self {
        let replicaof = format!("{} {}", primary.ip(), primary.port());
        let replica = Self::start(place, binds, port, dir, &["--replicaof", &replicaof]);
        wait_for("the replica to sync", Duration::from_secs(15), || {
            replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
                .then_some(())
        });
        replica
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// SIGKILL by PID: the server crashes, as far as its clients know.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// `redis-cli` against this server, from where it runs.
    pub fn cli(&self, args: &[&str]) -> String {
        let addr = self.addr();
        let (host, port) = (addr.ip().to_string(), addr.port().to_string());
        let mut full = vec!["-h", host.as_str(), "-p", port.as_str()];
        full.extend_from_slice(args);
        let out = self.place.output("redis-cli", &full);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
