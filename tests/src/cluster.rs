//! A real Redis Cluster: one `redis-server` per node, created with
//! `redis-cli --cluster create`, every node stopped by PID on drop.
//!
//! Roles and slot owners are always read back from `CLUSTER NODES`, never
//! remembered, so accessors stay right after failovers and resharding.
//! Tests drive the cluster through `redis-cli` run where the nodes run (the
//! host or a network namespace), so the same code serves both.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use crate::{
    TempDir,
    ports::free_cluster_port,
    process::{Child, Place},
};

pub const SLOTS: u16 = 16384;

/// Node timeout: how long before a silent node counts as failing. Short so
/// failover tests take seconds.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// How long [`RedisCluster::wait_healthy`] waits by default.
pub const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);

/// The hash slot of `key`: CRC16-XMODEM of its hash tag (the bytes between
/// the first `{` and the next `}`, when not empty) or of the whole key.
/// Independent of the proxy's implementation on purpose.
pub fn slot_of(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let len = rest.iter().position(|&b| b == b'}')?;
            (len > 0).then(|| &rest[..len])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    crc % SLOTS
}

/// A key (no hash tag) that hashes to `slot`. Deterministic; wrap it in
/// braces (`{key}:suffix`) to make more keys in the same slot.
pub fn key_in_slot(slot: u16) -> String {
    assert!(slot < SLOTS, "slot {slot} out of range");
    (0u64..)
        .map(|n| format!("key:{n}"))
        .find(|k| slot_of(k.as_bytes()) == slot)
        .expect("every slot has a key")
}

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub addr: SocketAddr,
    pub flags: Vec<String>,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Owned slot ranges, inclusive. Open-slot markers (`[slot->-id]`) are in
    /// `open_slots`.
    pub slots: Vec<(u16, u16)>,
    pub open_slots: Vec<String>,
    pub connected: bool,
}

impl NodeInfo {
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    pub fn is_master(&self) -> bool {
        self.has_flag("master")
    }

    /// Flagged `fail` or `fail?` by whoever printed the line.
    pub fn is_failing(&self) -> bool {
        self.has_flag("fail") || self.has_flag("fail?")
    }

    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }

    pub fn slot_count(&self) -> usize {
        self.slots
            .iter()
            .map(|&(a, b)| usize::from(b - a) + 1)
            .sum()
    }
}

/// Parses `CLUSTER NODES` output; skips nodes still in handshake or without
/// an address.
pub fn parse_cluster_nodes(text: &str) -> Vec<NodeInfo> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let id = fields.next()?.to_string();
            let addr = parse_node_addr(fields.next()?)?;
            let flags: Vec<String> = fields.next()?.split(',').map(str::to_string).collect();
            if flags.iter().any(|f| f == "handshake" || f == "noaddr") {
                return None;
            }
            let master_id = Some(fields.next()?)
                .filter(|m| *m != "-")
                .map(str::to_string);
            let _ping_sent = fields.next()?;
            let _pong_recv = fields.next()?;
            let _config_epoch = fields.next()?;
            let connected = fields.next()? == "connected";
            let mut slots = Vec::new();
            let mut open_slots = Vec::new();
            for token in fields {
                if token.starts_with('[') {
                    open_slots.push(token.to_string());
                } else if let Some((a, b)) = token.split_once('-') {
                    slots.push((a.parse().ok()?, b.parse().ok()?));
                } else {
                    let s = token.parse().ok()?;
                    slots.push((s, s));
                }
            }
            Some(NodeInfo {
                id,
                addr,
                flags,
                master_id,
                slots,
                open_slots,
                connected,
            })
        })
        .collect()
}

/// `ip:port@cport[,hostname]`; IPv6 addresses come unbracketed.
fn parse_node_addr(field: &str) -> Option<SocketAddr> {
    let host_port = field.split(['@', ',']).next()?;
    let (ip, port) = host_port.rsplit_once(':')?;
    let ip: IpAddr = ip.trim_matches(['[', ']']).parse().ok()?;
    Some(SocketAddr::new(ip, port.parse().ok()?))
}

/// Per node id: is it a master, its master's id, its slots.
type RoleTable = BTreeMap<String, (bool, Option<String>, Vec<(u16, u16)>)>;

struct Node {
    addr: SocketAddr,
    /// Where it runs (a spread cluster's nodes live in several namespaces).
    place: Place,
    id: String,
    child: Child,
    killed: bool,
}

pub struct RedisCluster {
    /// Stopped by `Drop` before `_tmp` removes their directory.
    nodes: Vec<Node>,
    place: Place,
    dir: PathBuf,
    _tmp: Option<TempDir>,
}

impl RedisCluster {
    /// `masters * (1 + replicas_per_master)` nodes on 127.0.0.1, on free
    /// cluster ports, in a temporary directory.
    pub fn start_local(masters: usize, replicas_per_master: usize) -> Self {
        let tmp = TempDir::new("rdr-cluster");
        let place = Place::default();
        let count = masters * (1 + replicas_per_master);
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            // Another process can take a port between our check and the
            // server's bind: try a few.
            let mut last = String::new();
            let node = (0..5).find_map(|_| {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_cluster_port()));
                launch(&place, tmp.path(), addr).map_err(|e| last = e).ok()
            });
            nodes.push(node.unwrap_or_else(|| panic!("no redis-server would start: {last}")));
        }
        let dir = tmp.path().to_path_buf();
        Self::create(nodes, place, dir, Some(tmp), masters, replicas_per_master)
    }

    /// Nodes bound to `nodes` (several may share a port on different IPs),
    /// run in `place` (a namespace holding those addresses), with configs
    /// and logs in `dir`, which the caller owns.
    pub fn start(
        place: &Place,
        nodes: &[SocketAddr],
        replicas_per_master: usize,
        dir: &Path,
    ) -> Self {
        let spread: Vec<(Place, SocketAddr)> =
            nodes.iter().map(|addr| (place.clone(), *addr)).collect();
        Self::start_across(place, &spread, replicas_per_master, dir)
    }

    /// Nodes spread over several namespaces (one "node" each, say), each
    /// started in its own `place`; cluster tools run from `control`, which
    /// must reach every address.
    pub fn start_across(
        control: &Place,
        nodes: &[(Place, SocketAddr)],
        replicas_per_master: usize,
        dir: &Path,
    ) -> Self {
        let per_shard = 1 + replicas_per_master;
        assert!(
            !nodes.is_empty() && nodes.len().is_multiple_of(per_shard),
            "{} nodes do not split into shards of {per_shard}",
            nodes.len()
        );
        let mut started = Vec::with_capacity(nodes.len());
        for (place, addr) in nodes {
            started.push(launch(place, dir, *addr).unwrap_or_else(|e| panic!("{e}")));
        }
        Self::create(
            started,
            control.clone(),
            dir.to_path_buf(),
            None,
            nodes.len() / per_shard,
            replicas_per_master,
        )
    }

    fn create(
        nodes: Vec<Node>,
        place: Place,
        dir: PathBuf,
        tmp: Option<TempDir>,
        masters: usize,
        replicas_per_master: usize,
    ) -> Self {
        // From here on a panic drops `cluster`, stopping every node.
        let mut cluster = Self {
            nodes,
            place,
            dir,
            _tmp: tmp,
        };
        assert!(
            masters >= 3,
            "redis-cli --cluster create needs at least 3 masters"
        );
        let addrs: Vec<String> = cluster.nodes.iter().map(|n| host_port(n.addr)).collect();
        let replicas = replicas_per_master.to_string();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
        cluster.cluster_tool(&args);
        for i in 0..cluster.nodes.len() {
            let addr = cluster.nodes[i].addr;
            cluster.nodes[i].id = cluster.cli(addr, &["CLUSTER", "MYID"]).trim().to_string();
            assert_eq!(
                cluster.nodes[i].id.len(),
                40,
                "CLUSTER MYID on {addr}: {:?}",
                cluster.nodes[i].id
            );
        }
        cluster.wait_healthy();
        cluster
    }

    pub fn place(&self) -> &Place {
        &self.place
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every node started, in start order, killed ones included.
    pub fn nodes(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    /// Addresses a client would be configured with: every node not killed.
    pub fn seeds(&self) -> Vec<SocketAddr> {
        self.live().map(|n| n.addr).collect()
    }

    /// Masters as the cluster sees them now (not failed, not killed), in
    /// start order.
    pub fn masters(&self) -> Vec<SocketAddr> {
        let view = self.view();
        self.live()
            .filter(|n| {
                view.iter()
                    .any(|v| v.id == n.id && v.is_master() && !v.has_flag("fail"))
            })
            .map(|n| n.addr)
            .collect()
    }

    /// Live replicas of `master` as the cluster sees them now, in start order.
    pub fn replicas_of(&self, master: SocketAddr) -> Vec<SocketAddr> {
        let master_id = self.id_of(master).to_string();
        let view = self.view();
        self.live()
            .filter(|n| {
                view.iter().any(|v| {
                    v.id == n.id
                        && !v.is_master()
                        && !v.has_flag("fail")
                        && v.master_id.as_deref() == Some(master_id.as_str())
                })
            })
            .map(|n| n.addr)
            .collect()
    }

    /// The node's cluster id.
    pub fn id_of(&self, addr: SocketAddr) -> &str {
        &self.node(addr).id
    }

    /// The node's PID; 0 once killed.
    pub fn pid(&self, addr: SocketAddr) -> u32 {
        let node = self.node(addr);
        if node.killed { 0 } else { node.child.pid() }
    }

    /// `CLUSTER NODES` as one live node sees it.
    pub fn view(&self) -> Vec<NodeInfo> {
        let first = self.live().next().expect("every node is killed").addr;
        self.cluster_nodes(first)
    }

    /// `CLUSTER NODES` as `addr` sees it.
    pub fn cluster_nodes(&self, addr: SocketAddr) -> Vec<NodeInfo> {
        parse_cluster_nodes(&self.cli(addr, &["CLUSTER", "NODES"]))
    }

    /// `redis-cli` against one node, from where the nodes run; raw stdout
    /// (replies unformatted, errors as `ERR ...`). Gives up after 20 s.
    pub fn cli(&self, addr: SocketAddr, args: &[&str]) -> String {
        let (host, port) = (addr.ip().to_string(), addr.port().to_string());
        let mut full = vec!["-h", host.as_str(), "-p", port.as_str()];
        full.extend_from_slice(args);
        let out = self
            .place
            .output("timeout", &with_timeout("redis-cli", &full));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGKILL: the node crashes. Its slots fail over after the node
    /// timeout if it has a replica; [`Self::wait_healthy`] waits for that.
    pub fn kill(&mut self, addr: SocketAddr) {
        let node = self.node_mut(addr);
        assert!(!node.killed, "{addr} is already killed");
        node.child.kill();
        node.killed = true;
    }

    /// Starts a killed node again with its old config (same id). A former
    /// master whose slots moved rejoins as a replica. Does not wait for the
    /// cluster: call [`Self::wait_healthy`].
    pub fn restart(&mut self, addr: SocketAddr) {
        assert!(self.node(addr).killed, "{addr} is running");
        let place = self.node(addr).place.clone();
        let node = launch(&place, &self.dir, addr)
            .unwrap_or_else(|e| panic!("restart {addr}: {e}\n{}", self.logs()));
        let slot = self.node_mut(addr);
        slot.child = node.child;
        slot.killed = false;
    }

    /// `CLUSTER FAILOVER` on `replica` (a coordinated handover with its
    /// live master), then waits until it is a master and all is healthy.
    pub fn failover(&self, replica: SocketAddr) {
        let out = self.cli(replica, &["CLUSTER", "FAILOVER"]);
        assert_eq!(out.trim(), "OK", "CLUSTER FAILOVER on {replica}");
        let id = self.id_of(replica).to_string();
        self.wait(
            &format!("{replica} to become a master"),
            HEALTHY_TIMEOUT,
            || {
                let me = self.cluster_nodes(replica);
                match me.iter().find(|n| n.id == id) {
                    Some(n) if n.is_master() => Ok(()),
                    other => Err(format!("{replica} sees itself as {other:?}")),
                }
            },
        );
        self.wait_healthy();
    }

    /// Waits (up to [`HEALTHY_TIMEOUT`]) until the cluster is healthy, see
    /// [`Self::health`].
    pub fn wait_healthy(&self) {
        self.wait("a healthy cluster", HEALTHY_TIMEOUT, || self.health());
    }

    /// `Ok` when, on every live node: `cluster_state:ok` with all 16384
    /// slots ok; `CLUSTER NODES` lists every live node, none failing, with
    /// the same roles, masters and slots as every other live node, no open
    /// (migrating/importing) slots, and every slot owned by a live master;
    /// each live replica has `master_link_status:up`.
    pub fn health(&self) -> Result<(), String> {
        let live: Vec<&Node> = self.live().collect();
        let live_ids: BTreeSet<&str> = live.iter().map(|n| n.id.as_str()).collect();
        let mut agreed: Option<(SocketAddr, RoleTable)> = None;
        for node in &live {
            let info = self.cli(node.addr, &["CLUSTER", "INFO"]);
            for want in [
                "cluster_state:ok",
                "cluster_slots_assigned:16384",
                "cluster_slots_ok:16384",
            ] {
                if !info.lines().any(|l| l.trim() == want) {
                    return Err(format!("{} lacks {want}:\n{info}", node.addr));
                }
            }
            let view = self.cluster_nodes(node.addr);
            let mut table = BTreeMap::new();
            for n in &view {
                if !n.open_slots.is_empty() {
                    return Err(format!(
                        "{} sees open slots on {}: {:?}",
                        node.addr, n.addr, n.open_slots
                    ));
                }
                let is_live = live_ids.contains(n.id.as_str());
                if !is_live {
                    if !n.slots.is_empty() {
                        return Err(format!("{} sees killed {} owning slots", node.addr, n.addr));
                    }
                    continue;
                }
                if n.is_failing() {
                    return Err(format!(
                        "{} flags live {} as {:?}",
                        node.addr, n.addr, n.flags
                    ));
                }
                table.insert(
                    n.id.clone(),
                    (n.is_master(), n.master_id.clone(), n.slots.clone()),
                );
            }
            if table.len() != live.len() {
                return Err(format!(
                    "{} knows {} of {} live nodes",
                    node.addr,
                    table.len(),
                    live.len()
                ));
            }
            match &agreed {
                None => agreed = Some((node.addr, table)),
                Some((first, t)) if *t != table => {
                    return Err(format!(
                        "{} and {first} disagree: {table:?} vs {t:?}",
                        node.addr
                    ));
                }
                Some(_) => {}
            }
        }
        let (_, table) = agreed.ok_or("every node is killed")?;
        let covered: usize = table
            .values()
            .map(|(_, _, s)| {
                s.iter()
                    .map(|&(a, b)| usize::from(b - a) + 1)
                    .sum::<usize>()
            })
            .sum();
        if covered != usize::from(SLOTS) {
            return Err(format!("live masters cover {covered} slots"));
        }
        for node in &live {
            let (is_master, master_id, _) = &table[&node.id];
            if *is_master {
                continue;
            }
            if !master_id.as_deref().is_some_and(|m| live_ids.contains(m)) {
                return Err(format!("replica {} follows a dead master", node.addr));
            }
            let repl = self.cli(node.addr, &["INFO", "replication"]);
            if !repl.lines().any(|l| l.trim() == "master_link_status:up") {
                return Err(format!("replica {} link not up:\n{repl}", node.addr));
            }
        }
        Ok(())
    }

    /// The master owning `slot`, as one live node sees it.
    pub fn owner_of_slot(&self, slot: u16) -> SocketAddr {
        self.owner_seen_by(self.live().next().expect("every node is killed").addr, slot)
            .unwrap_or_else(|| panic!("nobody owns slot {slot}"))
    }

    fn owner_seen_by(&self, addr: SocketAddr, slot: u16) -> Option<SocketAddr> {
        self.cluster_nodes(addr)
            .into_iter()
            .find(|n| n.is_master() && n.owns(slot))
            .map(|n| n.addr)
    }

    /// Moves `slot` and its keys to the master `to`, by hand, following the
    /// documented resharding steps: `SETSLOT IMPORTING` on the target,
    /// `SETSLOT MIGRATING` on the source, `GETKEYSINSLOT` + `MIGRATE ... KEYS`
    /// until the slot is empty, then `SETSLOT NODE` on the target, the
    /// source and the other masters. Keys must be printable (they go
    /// through `redis-cli` arguments). Waits until every node agrees.
    pub fn migrate_slot(&self, slot: u16, to: SocketAddr) {
        let from = self.owner_of_slot(slot);
        if from == to {
            return;
        }
        let (slot_s, from_id, to_id) = (slot.to_string(), self.id_of(from), self.id_of(to));
        self.expect_ok(to, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", from_id]);
        self.expect_ok(from, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", to_id]);
        let (host, port) = (to.ip().to_string(), to.port().to_string());
        loop {
            let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", &host, &port, "", "0", "5000", "KEYS"];
            args.extend(&keys);
            let out = self.cli(from, &args);
            assert!(
                matches!(out.trim(), "OK" | "NOKEY"),
                "MIGRATE {keys:?} {from} -> {to}: {out}"
            );
        }
        // The target first: once the source forgets the slot, clients are
        // sent there, and it must already own it.
        let mut order = vec![to, from];
        order.extend(
            self.masters()
                .into_iter()
                .filter(|m| *m != to && *m != from),
        );
        for master in order {
            self.expect_ok(master, &["CLUSTER", "SETSLOT", &slot_s, "NODE", to_id]);
        }
        self.wait(
            &format!("every node to see slot {slot} on {to}"),
            HEALTHY_TIMEOUT,
            || {
                for node in self.live() {
                    let owner = self.owner_seen_by(node.addr, slot);
                    if owner != Some(to) {
                        return Err(format!("{} sees {owner:?}", node.addr));
                    }
                }
                Ok(())
            },
        );
        self.wait_healthy();
    }

    /// Moves `count` slots from master `from` to master `to` with
    /// `redis-cli --cluster reshard`; returns the slots that moved.
    pub fn reshard(&self, count: usize, from: SocketAddr, to: SocketAddr) -> Vec<u16> {
        // redis-cli refuses to touch a cluster whose nodes disagree.
        self.wait_healthy();
        let owned = |addr: SocketAddr| -> BTreeSet<u16> {
            let view = self.view();
            let me = view.iter().find(|n| n.addr == addr);
            (0..SLOTS)
                .filter(|&s| me.is_some_and(|n| n.owns(s)))
                .collect()
        };
        let before = owned(to);
        let count_s = count.to_string();
        let entry = host_port(from);
        let args = [
            "--cluster",
            "reshard",
            &entry,
            "--cluster-from",
            self.id_of(from),
            "--cluster-to",
            self.id_of(to),
            "--cluster-slots",
            &count_s,
            "--cluster-yes",
        ];
        self.cluster_tool(&args);
        self.wait_healthy();
        owned(to).difference(&before).copied().collect()
    }

    /// `redis-cli --cluster ...` where the nodes run; panics with its output
    /// and the node logs unless it succeeds without `[ERR]`.
    fn cluster_tool(&self, args: &[&str]) {
        let out = self
            .place
            .output("timeout", &with_timeout("redis-cli", args));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("[ERR]"),
            "redis-cli {} failed ({}):\n{text}\n{}",
            args.get(..2).unwrap_or_default().join(" "),
            out.status,
            self.logs()
        );
    }

    /// Keys held by the masters (DBSIZE summed).
    pub fn total_keys(&self) -> u64 {
        self.masters()
            .iter()
            .map(|m| {
                let n = self.cli(*m, &["DBSIZE"]);
                n.trim()
                    .parse::<u64>()
                    .unwrap_or_else(|_| panic!("DBSIZE on {m}: {n:?}"))
            })
            .sum()
    }

    /// The last lines of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let path = log_path(&self.dir, node.addr);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("({e})\n"));
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            let state = if node.killed { " (killed)" } else { "" };
            let _ = writeln!(out, "--- {}{state} {} ---", node.addr, path.display());
            for line in tail {
                let _ = writeln!(out, "{line}");
            }
        }
        out
    }

    /// Like [`crate::process::wait_for`], but the panic says why the last
    /// check failed and shows the node logs.
    fn wait(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
        let deadline = Instant::now() + timeout;
        loop {
            let why = match check() {
                Ok(()) => return,
                Err(why) => why,
            };
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}: {why}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn expect_ok(&self, addr: SocketAddr, args: &[&str]) {
        let out = self.cli(addr, args);
        assert_eq!(out.trim(), "OK", "{args:?} on {addr}");
    }

    fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| !n.killed)
    }

    fn node(&self, addr: SocketAddr) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.addr == addr)
            .unwrap_or_else(|| panic!("{addr} is not a node of this cluster"))
    }

    fn node_mut(&mut self, addr: SocketAddr) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.addr == addr)
            .unwrap_or_else(|| panic!("{addr} is not a node of this cluster"))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Signal all first so they shut down in parallel; each `Child` then
        // waits for its own (and SIGKILLs a straggler) as it drops.
        for node in self.nodes.iter().filter(|n| !n.killed) {
            if let Ok(pid) = i32::try_from(node.child.pid())
                && pid > 0
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        self.nodes.clear();
    }
}

/// Starts one node and waits until it answers PING; `Err` with its log if
/// it exits (e.g. the port was taken) or stays silent.
fn launch(place: &Place, dir: &Path, addr: SocketAddr) -> Result<Node, String> {
    let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
    // Own data directory: a replica's full sync writes dump.rdb there.
    let data = dir.join(format!("data-{ip}-{port}"));
    std::fs::create_dir_all(&data).map_err(|e| format!("create {}: {e}", data.display()))?;
    let conf = dir.join(format!("nodes-{port}-{ip}.conf"));
    let log = log_path(dir, addr);
    let timeout = NODE_TIMEOUT_MS.to_string();
    let mut cmd = place.command("redis-server");
    cmd.args(["--cluster-enabled", "yes", "--cluster-config-file"])
        .arg(&conf)
        .args(["--cluster-node-timeout", &timeout])
        // Roles only change when a test asks.
        .args(["--cluster-allow-replica-migration", "no"])
        // A replica may always take over, however stale it thinks it is.
        .args(["--cluster-replica-validity-factor", "0"])
        // Announced as bound, never as guessed from a peer's view.
        .args(["--cluster-announce-ip", &ip])
        .args(["--bind", &ip, "--port", &port])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .args(["--daemonize", "no"])
        // Replicas sync at once instead of waiting 5 s for company.
        .args(["--repl-diskless-sync-delay", "0"])
        // SIGTERM stops at once instead of waiting for replicas to catch up.
        .args(["--shutdown-timeout", "0"])
        .arg("--dir")
        .arg(&data)
        .arg("--logfile")
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = Child::spawn(format!("redis-server {addr}"), cmd);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = place.output(
            "timeout",
            &with_timeout("redis-cli", &["-h", &ip, "-p", &port, "PING"]),
        );
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            return Ok(Node {
                addr,
                place: place.clone(),
                id: String::new(),
                child,
                killed: false,
            });
        }
        if !child.is_running() || Instant::now() > deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "redis-server {addr} did not start; {}:\n{text}",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_path(dir: &Path, addr: SocketAddr) -> PathBuf {
    dir.join(format!("node-{}-{}.log", addr.ip(), addr.port()))
}

/// `ip:port` as `redis-cli --cluster` takes it.
fn host_port(addr: SocketAddr) -> String {
    format!("{}:{}", addr.ip(), addr.port())
}

/// Arguments for `timeout 20 <program> <args>`: a wedged node fails the
/// test instead of hanging it.
fn with_timeout<'a>(program: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut full = vec!["20", program];
    full.extend_from_slice(args);
    full
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_xmodem_check_value() {
        // 0x31C3 is CRC16-XMODEM("123456789"); 12739 = 0x31C3 % 16384.
        assert_eq!(slot_of(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot_of(b"{user1}:a"), slot_of(b"user1"));
        assert_eq!(slot_of(b"a{}b"), slot_of(b"a{}b"));
        assert_ne!(slot_of(b"{a"), slot_of(b"a"));
        assert_eq!(slot_of(b"x{a}{b}"), slot_of(b"a"));
    }

    #[test]
    fn key_in_slot_lands_there() {
        for slot in [0, 1, 5460, 12182, 16383] {
            assert_eq!(slot_of(key_in_slot(slot).as_bytes()), slot);
        }
    }

    #[test]
    fn parses_cluster_nodes() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host replica e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922 [77->-e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca]
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 10923
6ec23923021cf3ffec47632106199cb7f496ce01 fd00:96::10:6379@16379 slave,fail 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 disconnected
";
        let nodes = parse_cluster_nodes(text);
        assert_eq!(nodes.len(), 4);
        assert_eq!(
            nodes[0].master_id.as_deref(),
            Some("e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca")
        );
        assert_eq!(nodes[1].slots, vec![(5461, 10922)]);
        assert_eq!(nodes[1].open_slots.len(), 1);
        assert!(nodes[2].is_master() && nodes[2].owns(10923) && !nodes[2].owns(5461));
        assert_eq!(nodes[2].slot_count(), 5462);
        assert_eq!(nodes[3].addr, "[fd00:96::10]:6379".parse().expect("addr"));
        assert!(nodes[3].is_failing() && !nodes[3].connected);
    }
}
