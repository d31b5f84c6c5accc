//! The cluster's slot map, discovered with `CLUSTER SLOTS` and kept fresh:
//! periodically, right after a `MOVED` (which is also applied to the map at
//! once), and after upstream failures, never more often than a minimum gap.
//!
//! Readers take an `Arc<View>` snapshot; `version()` tells cheaply whether a
//! cached snapshot is stale.
//!
//! With several workers, each worker reads its own [`Topology::follower`]:
//! the refresher installs every view it fetches into each follower, so
//! the request path of one worker never touches a lock or a reference
//! count another worker touches. A `MOVED` seen by a worker patches its
//! own copy at once and wakes the one refresher.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;
use tokio::sync::Notify;

use super::slot::SLOTS;

const UNASSIGNED: u16 = u16::MAX;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unexpected CLUSTER SLOTS reply: {0}")]
    BadReply(String),
    #[error("no node answered CLUSTER SLOTS: {0}")]
    Unreachable(String),
}

/// A master and its replicas, serving some slot ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub master: SocketAddr,
    pub replicas: Vec<SocketAddr>,
    /// Inclusive ranges, sorted.
    pub ranges: Vec<(u16, u16)>,
}

impl Shard {
    pub fn first_slot(&self) -> u16 {
        self.ranges.first().map_or(UNASSIGNED, |r| r.0)
    }
}

/// Which shard owns each slot ([`UNASSIGNED`] for none).
///
/// A cluster holds its slots in a few contiguous runs: one per master after
/// `redis-cli --cluster create`, a few more after resharding. A lookup
/// searches the runs' ends, a cache line or two that every request keeps
/// hot. A 32 KiB table indexed by slot was cold at the random slot of each
/// request once the worker had been switched out: perf put 78% of
/// `exec::pick`'s samples (2.5% of the proxy's W2 CPU) on that one load.
/// A map cut into many runs (slots patched one by one by `MOVED` during a
/// migration) keeps the table, where a search would be the slower.
#[derive(Clone, Debug)]
enum SlotOwners {
    /// `ends[i]` is the last slot of run `i`, `owners[i]` its shard; the
    /// runs cover every slot in order.
    Runs {
        ends: Box<[u16]>,
        owners: Box<[u16]>,
    },
    Table(Box<[u16]>),
}

impl SlotOwners {
    /// Beyond this many runs, the table: 64 ends are two cache lines.
    const MAX_RUNS: usize = 64;

    fn from_table(table: Box<[u16]>) -> Self {
        let mut ends = Vec::new();
        let mut owners = Vec::new();
        for (slot, &owner) in table.iter().enumerate() {
            if owners.last() == Some(&owner) {
                if let Some(end) = ends.last_mut() {
                    *end = u16::try_from(slot).unwrap_or(u16::MAX);
                }
            } else {
                if owners.len() == Self::MAX_RUNS {
                    return Self::Table(table);
                }
                owners.push(owner);
                ends.push(u16::try_from(slot).unwrap_or(u16::MAX));
            }
        }
        Self::Runs {
            ends: ends.into_boxed_slice(),
            owners: owners.into_boxed_slice(),
        }
    }

    fn uniform(owner: u16) -> Self {
        Self::from_table(vec![owner; SLOTS].into_boxed_slice())
    }

    #[inline]
    fn get(&self, slot: u16) -> u16 {
        match self {
            Self::Runs { ends, owners } => {
                let run = ends.partition_point(|&end| end < slot);
                owners.get(run).copied().unwrap_or(UNASSIGNED)
            }
            Self::Table(table) => table.get(usize::from(slot)).copied().unwrap_or(UNASSIGNED),
        }
    }

    fn covered(&self) -> usize {
        match self {
            Self::Runs { ends, owners } => {
                let mut start = 0;
                let mut covered = 0;
                for (&end, &owner) in ends.iter().zip(owners.iter()) {
                    let len = usize::from(end) + 1 - start;
                    if owner != UNASSIGNED {
                        covered += len;
                    }
                    start = usize::from(end) + 1;
                }
                covered
            }
            Self::Table(table) => table.iter().filter(|&&s| s != UNASSIGNED).count(),
        }
    }
}

/// An immutable snapshot of the slot map.
#[derive(Clone, Debug)]
pub struct View {
    pub version: u64,
    /// Sorted by first slot, so shard order (used by SCAN cursors) is stable.
    shards: Vec<Shard>,
    slots: SlotOwners,
    /// Replicas CLUSTER SLOTS leaves out until they have synced (Redis
    /// 7 lists only replicas with a replication offset): never read from,
    /// but reached by commands for every node (CONFIG SET, ACL SETUSER).
    syncing: Vec<SocketAddr>,
}

impl View {
    pub fn empty() -> Self {
        Self {
            version: 0,
            shards: Vec::new(),
            slots: SlotOwners::uniform(UNASSIGNED),
            syncing: Vec::new(),
        }
    }

    /// A standalone primary (and its replicas) as a one-shard map: every
    /// slot is the primary's, so routing, pooling, leases and read
    /// policies work unchanged, and no key is ever in "another" slot.
    pub fn standalone(primary: SocketAddr, replicas: Vec<SocketAddr>) -> Self {
        Self {
            version: 0,
            shards: vec![Shard {
                master: primary,
                replicas,
                ranges: vec![(0, u16::try_from(SLOTS - 1).unwrap_or(u16::MAX))],
            }],
            slots: SlotOwners::uniform(0),
            syncing: Vec::new(),
        }
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    pub fn shard_index(&self, slot: u16) -> Option<usize> {
        match self.slots.get(slot) {
            UNASSIGNED => None,
            i => Some(usize::from(i)),
        }
    }

    pub fn shard(&self, slot: u16) -> Option<&Shard> {
        self.shard_index(slot).map(|i| &self.shards[i])
    }

    pub fn masters(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.shards.iter().map(|s| s.master)
    }

    pub fn nodes(&self) -> Vec<SocketAddr> {
        let mut nodes: Vec<SocketAddr> = self
            .shards
            .iter()
            .flat_map(|s| std::iter::once(s.master).chain(s.replicas.iter().copied()))
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    pub fn covered_slots(&self) -> usize {
        self.slots.covered()
    }

    /// Parses `CLUSTER SLOTS`. `asked` fills in endpoints Redis reports as
    /// empty (meaning "the address you asked me on").
    pub fn from_cluster_slots(reply: &BytesFrame, asked: SocketAddr) -> Result<Self, Error> {
        let BytesFrame::Array(entries) = reply else {
            return Err(Error::BadReply(format!("{reply:?}")));
        };
        let mut shards: Vec<Shard> = Vec::new();
        for entry in entries {
            let BytesFrame::Array(fields) = entry else {
                return Err(Error::BadReply("entry is not an array".into()));
            };
            let (Some(start), Some(end)) =
                (fields.first().and_then(int), fields.get(1).and_then(int))
            else {
                return Err(Error::BadReply("missing slot range".into()));
            };
            let (start, end) = (slot_number(start)?, slot_number(end)?);
            let mut nodes = fields[2..].iter().map(|node| endpoint(node, asked));
            let master = nodes
                .next()
                .ok_or_else(|| Error::BadReply("slot range without a master".into()))??;
            let replicas = nodes.collect::<Result<Vec<_>, _>>()?;
            match shards.iter_mut().find(|s| s.master == master) {
                Some(shard) => {
                    shard.ranges.push((start, end));
                    for r in replicas {
                        if !shard.replicas.contains(&r) {
                            shard.replicas.push(r);
                        }
                    }
                }
                None => shards.push(Shard {
                    master,
                    replicas,
                    ranges: vec![(start, end)],
                }),
            }
        }
        Ok(Self::from_shards(shards))
    }

    fn from_shards(mut shards: Vec<Shard>) -> Self {
        for shard in &mut shards {
            shard.ranges.sort_unstable();
            shard.replicas.sort_unstable();
        }
        shards.sort_by_key(Shard::first_slot);
        let mut slots = vec![UNASSIGNED; SLOTS].into_boxed_slice();
        for (i, shard) in shards.iter().enumerate() {
            for &(start, end) in &shard.ranges {
                for slot in start..=end {
                    slots[usize::from(slot)] = u16::try_from(i).unwrap_or(UNASSIGNED);
                }
            }
        }
        Self {
            version: 0,
            shards,
            slots: SlotOwners::from_table(slots),
            syncing: Vec::new(),
        }
    }

    /// Records every replica the cluster knows (CLUSTER NODES): those the
    /// slot map lacks are kept as syncing.
    pub fn set_known_replicas(&mut self, replicas: &[SocketAddr]) {
        let listed: Vec<SocketAddr> = self.nodes();
        let mut syncing: Vec<SocketAddr> = replicas
            .iter()
            .copied()
            .filter(|r| !listed.contains(r))
            .collect();
        syncing.sort_unstable();
        syncing.dedup();
        self.syncing = syncing;
    }

    /// Every node: masters, replicas, and replicas still syncing.
    pub fn all_nodes(&self) -> Vec<SocketAddr> {
        let mut nodes: Vec<SocketAddr> = self.masters().collect();
        for shard in &self.shards {
            nodes.extend(shard.replicas.iter().copied());
        }
        nodes.extend(self.syncing.iter().copied());
        nodes
    }

    /// This view with `slot` moved to the node at `addr` (what a `MOVED`
    /// reply says), pending the full refresh it triggers.
    fn with_moved(&self, slot: u16, addr: SocketAddr) -> Self {
        let mut shards = self.shards.clone();
        for shard in &mut shards {
            shard.ranges = remove_slot(&shard.ranges, slot);
        }
        match shards.iter_mut().find(|s| s.master == addr) {
            Some(shard) => shard.ranges.push((slot, slot)),
            None => shards.push(Shard {
                master: addr,
                replicas: Vec::new(),
                ranges: vec![(slot, slot)],
            }),
        }
        shards.retain(|s| !s.ranges.is_empty());
        let mut view = Self::from_shards(shards);
        view.syncing = self.syncing.clone();
        view
    }

    fn same_layout(&self, other: &Self) -> bool {
        self.shards == other.shards && self.syncing == other.syncing
    }
}

fn remove_slot(ranges: &[(u16, u16)], slot: u16) -> Vec<(u16, u16)> {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(start, end) in ranges {
        if slot < start || slot > end {
            out.push((start, end));
            continue;
        }
        if start < slot {
            out.push((start, slot - 1));
        }
        if slot < end {
            out.push((slot + 1, end));
        }
    }
    out
}

fn int(frame: &BytesFrame) -> Option<i64> {
    match frame {
        BytesFrame::Integer(i) => Some(*i),
        _ => None,
    }
}

fn slot_number(n: i64) -> Result<u16, Error> {
    u16::try_from(n)
        .ok()
        .filter(|&s| usize::from(s) < SLOTS)
        .ok_or_else(|| Error::BadReply(format!("slot {n} out of range")))
}

fn endpoint(node: &BytesFrame, asked: SocketAddr) -> Result<SocketAddr, Error> {
    let BytesFrame::Array(fields) = node else {
        return Err(Error::BadReply("node is not an array".into()));
    };
    let host = match fields.first() {
        Some(BytesFrame::BulkString(b)) => b.clone(),
        _ => Bytes::new(),
    };
    let port = fields
        .get(1)
        .and_then(int)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| Error::BadReply("node without a port".into()))?;
    // "" (or "?" for an unknown endpoint): the address we asked.
    let ip = match std::str::from_utf8(&host)
        .ok()
        .and_then(|h| h.parse::<IpAddr>().ok())
    {
        Some(ip) => ip,
        None if host.is_empty() || &host[..] == b"?" => asked.ip(),
        None => {
            return Err(Error::BadReply(format!(
                "endpoint {} is not an IP address (hostnames are not supported)",
                String::from_utf8_lossy(&host)
            )));
        }
    };
    Ok(SocketAddr::new(ip, port))
}

/// The live slot map and its refresh schedule.
pub struct Topology {
    /// A standalone primary and its replicas, instead of a cluster.
    standalone: Option<(SocketAddr, Vec<SocketAddr>)>,
    current: RwLock<Arc<View>>,
    version: AtomicU64,
    /// Shared with the followers: one refresher serves them all.
    refresh: Arc<Notify>,
    /// Where discovery starts when no known node answers; the node agent
    /// replaces them when the targets ConfigMap changes.
    seeds: RwLock<Vec<SocketAddr>>,
    /// The workers' copies: each installed view is installed there too.
    followers: Mutex<Vec<Arc<Topology>>>,
}

impl Topology {
    pub fn new(seeds: Vec<SocketAddr>) -> Self {
        Self {
            standalone: None,
            current: RwLock::new(Arc::new(View::empty())),
            version: AtomicU64::new(0),
            refresh: Arc::new(Notify::new()),
            seeds: RwLock::new(seeds),
            followers: Mutex::new(Vec::new()),
        }
    }

    /// A copy for another worker, kept equal to this one by every
    /// [`Topology::install`]; its `MOVED`s and refresh requests wake this
    /// one's refresher.
    pub fn follower(&self) -> Arc<Self> {
        let follower = Arc::new(Self {
            standalone: self.standalone.clone(),
            current: RwLock::new(Arc::new(View::clone(&self.view()))),
            version: AtomicU64::new(self.version()),
            refresh: Arc::clone(&self.refresh),
            seeds: RwLock::new(self.seeds()),
            followers: Mutex::new(Vec::new()),
        });
        self.followers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::clone(&follower));
        follower
    }

    /// A standalone primary with its replicas: the map never changes, and
    /// a refresh only checks that the primary is one.
    pub fn standalone(primary: SocketAddr, replicas: Vec<SocketAddr>) -> Self {
        Self {
            standalone: Some((primary, replicas)),
            ..Self::new(vec![primary])
        }
    }

    /// The standalone primary and replicas, when this is no cluster.
    pub fn standalone_nodes(&self) -> Option<(SocketAddr, &[SocketAddr])> {
        self.standalone
            .as_ref()
            .map(|(primary, replicas)| (*primary, replicas.as_slice()))
    }

    pub fn is_standalone(&self) -> bool {
        self.standalone.is_some()
    }

    pub fn seeds(&self) -> Vec<SocketAddr> {
        self.seeds.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_seeds(&self, seeds: Vec<SocketAddr>) {
        *self.seeds.write().unwrap_or_else(|e| e.into_inner()) = seeds;
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn view(&self) -> Arc<View> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Installs a freshly fetched view, here and in every follower (each
    /// gets its own copy); returns whether anything changed here.
    pub fn install(&self, view: View) -> bool {
        for follower in self
            .followers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // A follower may differ from this one (its own MOVED).
            follower.install_own(view.clone());
        }
        self.install_own(view)
    }

    fn install_own(&self, mut view: View) -> bool {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.version != 0 && current.same_layout(&view) {
            return false;
        }
        view.version = current.version + 1;
        let version = view.version;
        *current = Arc::new(view);
        self.version.store(version, Ordering::Release);
        true
    }

    /// Applies a `MOVED` at once and asks for a full refresh.
    pub fn moved(&self, slot: u16, addr: SocketAddr) {
        {
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            if current.shard(slot).is_some_and(|s| s.master == addr) {
                drop(current);
                self.request_refresh();
                return;
            }
            let mut view = current.with_moved(slot, addr);
            view.version = current.version + 1;
            let version = view.version;
            *current = Arc::new(view);
            self.version.store(version, Ordering::Release);
        }
        self.request_refresh();
    }

    /// Wakes the refresher (it enforces the minimum gap).
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Waits until a refresh is requested or `interval` passes.
    pub async fn wait_for_refresh(&self, interval: Duration, last: Instant, min_gap: Duration) {
        tokio::select! {
            () = self.refresh.notified() => {}
            () = tokio::time::sleep(interval) => {}
        }
        let since = last.elapsed();
        if since < min_gap {
            tokio::time::sleep(min_gap - since).await;
        }
    }

    /// Where to ask for the slot map: known nodes first (masters, then
    /// replicas), then the configured seeds.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        let view = self.view();
        let mut out: Vec<SocketAddr> = view.masters().collect();
        for node in view.nodes() {
            if !out.contains(&node) {
                out.push(node);
            }
        }
        for seed in self.seeds() {
            if !out.contains(&seed) {
                out.push(seed);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ip: &str, port: i64) -> BytesFrame {
        BytesFrame::Array(vec![
            BytesFrame::BulkString(Bytes::copy_from_slice(ip.as_bytes())),
            BytesFrame::Integer(port),
            BytesFrame::BulkString(Bytes::from_static(
                b"0123456789abcdef0123456789abcdef01234567",
            )),
        ])
    }

    fn range(start: i64, end: i64, nodes: Vec<BytesFrame>) -> BytesFrame {
        let mut fields = vec![BytesFrame::Integer(start), BytesFrame::Integer(end)];
        fields.extend(nodes);
        BytesFrame::Array(fields)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn three_shards() -> View {
        let reply = BytesFrame::Array(vec![
            range(
                10923,
                16383,
                vec![node("127.0.0.1", 7002), node("127.0.0.1", 7005)],
            ),
            range(
                0,
                5460,
                vec![node("127.0.0.1", 7000), node("127.0.0.1", 7003)],
            ),
            range(5461, 10922, vec![node("", 7001), node("127.0.0.1", 7004)]),
        ]);
        View::from_cluster_slots(&reply, addr("127.0.0.9:7001")).unwrap()
    }

    #[test]
    fn cluster_slots_become_shards_sorted_by_first_slot() {
        let view = three_shards();
        let masters: Vec<_> = view.masters().collect();
        assert_eq!(
            masters,
            vec![
                addr("127.0.0.1:7000"),
                addr("127.0.0.9:7001"),
                addr("127.0.0.1:7002")
            ]
        );
        assert_eq!(
            view.shard(0).unwrap().replicas,
            vec![addr("127.0.0.1:7003")]
        );
        assert_eq!(view.shard(16383).unwrap().master, addr("127.0.0.1:7002"));
        assert_eq!(view.covered_slots(), SLOTS);
        assert_eq!(view.nodes().len(), 6);
    }

    #[test]
    fn a_standalone_primary_owns_every_slot() {
        let primary: SocketAddr = "10.0.0.1:6379".parse().unwrap();
        let replica: SocketAddr = "10.0.0.2:6379".parse().unwrap();
        let view = View::standalone(primary, vec![replica]);
        assert_eq!(view.covered_slots(), SLOTS);
        for slot in [0, 5000, 16383] {
            let shard = view.shard(slot).expect("covered");
            assert_eq!(
                (shard.master, shard.replicas.as_slice()),
                (primary, &[replica][..])
            );
        }
        assert_eq!(view.nodes(), vec![primary, replica]);
    }

    /// Every slot's owner and the covered count, as the plain table says,
    /// for maps in few runs, with gaps, and cut into more runs than the
    /// search takes.
    #[test]
    fn slot_owners_answer_as_the_table_they_were_built_from() {
        let build =
            |owner: &dyn Fn(usize) -> u16| -> Box<[u16]> { (0..SLOTS).map(owner).collect() };
        let maps: Vec<(&str, Box<[u16]>)> = vec![
            (
                "three masters",
                build(&|s| u16::try_from(s * 3 / SLOTS).unwrap()),
            ),
            (
                "with gaps",
                build(&|s| {
                    if (1000..2000).contains(&s) || s == SLOTS - 1 {
                        UNASSIGNED
                    } else {
                        u16::try_from(s * 3 / SLOTS).unwrap()
                    }
                }),
            ),
            (
                "cut at the run limit",
                build(&|s| u16::try_from(s * SlotOwners::MAX_RUNS / SLOTS % 2).unwrap()),
            ),
            (
                "cut past the run limit",
                build(&|s| u16::try_from(s % 3).unwrap()),
            ),
            ("none", build(&|_| UNASSIGNED)),
        ];
        for (name, table) in maps {
            let owners = SlotOwners::from_table(table.clone());
            let runs = matches!(owners, SlotOwners::Runs { .. });
            assert_eq!(runs, name != "cut past the run limit", "{name}");
            for slot in 0..SLOTS {
                let s = u16::try_from(slot).unwrap();
                assert_eq!(owners.get(s), table[slot], "{name}: slot {slot}");
            }
            let covered = table.iter().filter(|&&o| o != UNASSIGNED).count();
            assert_eq!(owners.covered(), covered, "{name}");
        }
    }

    #[test]
    fn moved_patches_one_slot() {
        let view = three_shards();
        let moved = view.with_moved(5461, addr("127.0.0.1:7000"));
        assert_eq!(moved.shard(5461).unwrap().master, addr("127.0.0.1:7000"));
        assert_eq!(moved.shard(5462).unwrap().master, addr("127.0.0.9:7001"));
        assert_eq!(moved.covered_slots(), SLOTS);
        let new_node = moved.with_moved(42, addr("127.0.0.1:7010"));
        assert_eq!(new_node.shards().len(), 4);
        assert_eq!(new_node.shard(42).unwrap().master, addr("127.0.0.1:7010"));
        assert_eq!(new_node.shard(41).unwrap().master, addr("127.0.0.1:7000"));
    }

    #[test]
    fn install_bumps_the_version_only_on_change() {
        let topology = Topology::new(vec![]);
        assert!(topology.install(three_shards()));
        assert_eq!(topology.version(), 1);
        assert!(!topology.install(three_shards()));
        assert_eq!(topology.version(), 1);
        topology.moved(0, addr("127.0.0.1:7001"));
        assert_eq!(topology.version(), 2);
        assert_eq!(
            topology.view().shard(0).unwrap().master,
            addr("127.0.0.1:7001")
        );
    }

    #[tokio::test]
    async fn a_followers_moved_is_its_own_until_the_refresher_installs_the_truth_everywhere() {
        let leader = Topology::new(vec![addr("127.0.0.1:7000")]);
        let follower = leader.follower();
        assert!(leader.install(three_shards()));
        // Its own copy, not the leader's snapshot.
        assert!(!Arc::ptr_eq(&leader.view(), &follower.view()));
        assert_eq!(follower.view().shards(), leader.view().shards());
        follower.moved(0, addr("127.0.0.1:7001"));
        assert_eq!(
            follower.view().shard(0).unwrap().master,
            addr("127.0.0.1:7001")
        );
        assert_eq!(
            leader.view().shard(0).unwrap().master,
            addr("127.0.0.1:7000")
        );
        // The follower's MOVED woke the leader's refresher.
        tokio::time::timeout(
            Duration::from_secs(1),
            leader.wait_for_refresh(Duration::from_secs(60), Instant::now(), Duration::ZERO),
        )
        .await
        .expect("the refresher is woken");
        // The fetched map (unchanged for the leader) still reaches the
        // follower that diverged.
        assert!(!leader.install(three_shards()));
        assert_eq!(
            follower.view().shard(0).unwrap().master,
            addr("127.0.0.1:7000")
        );
        assert!(follower.version() > leader.version());
    }
}
