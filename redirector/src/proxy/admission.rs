//! Who may use the proxy, and how many connections each may hold.
//!
//! Steering is what makes a connection a pod's: the kernel records an
//! original destination only for connects from enrolled namespaces. A
//! connection without one dialled the proxy's address itself, and would use
//! the proxy's upstream credentials and HBONE identity past Redis's own
//! network policies, so it is served only from sources the operator allows
//! (`--allow-direct-from`, loopback by default).
//!
//! Quotas keep one workload from starving the rest: each pod (by network
//! namespace) and each direct source has its own limit under the node-wide
//! one. At the node-wide limit the kernel is told to send new connects
//! direct (fail open) rather than to a proxy that would refuse them.
//!
//! The decisions here are pure; the accept loop carries them out.

use std::{collections::HashMap, net::IpAddr};

use crate::cidr::Cidr;

#[derive(Clone, Debug)]
pub struct Policy {
    /// Sources that may dial the proxy without being steered.
    pub allow_direct: Vec<Cidr>,
    /// Node-wide client limit.
    pub max_clients: usize,
    /// Per pod (network namespace); 0: only the node-wide limit.
    pub max_per_pod: usize,
    /// Per direct source address; 0: only the node-wide limit.
    pub max_per_source: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_direct: Cidr::loopback().to_vec(),
            max_clients: 10_000,
            max_per_pod: 1_000,
            max_per_source: 0,
        }
    }
}

/// Where a connection comes from, as the accept path learns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Steered by the kernel from a pod's network namespace (its cookie).
    Steered { pod: u64 },
    /// Dialled the proxy's address itself.
    Direct { source: IpAddr },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Direct, from a source not in `--allow-direct-from`.
    NotSteered,
    MaxClients,
    PodQuota,
    SourceQuota,
}

impl Refusal {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotSteered => "not_steered",
            Self::MaxClients => "max_clients",
            Self::PodQuota => "pod_quota",
            Self::SourceQuota => "source_quota",
        }
    }

    /// What the client reads before the proxy closes: Redis's own words
    /// where Redis has them, so applications match them as they would.
    pub fn reply(self) -> &'static [u8] {
        match self {
            Self::NotSteered => {
                b"-DENIED redirector serves connections steered from enrolled pods, and direct \
                  connections only from --allow-direct-from sources\r\n"
            }
            Self::MaxClients => b"-ERR max number of clients reached\r\n",
            Self::PodQuota => {
                b"-ERR max number of clients reached (this pod's redirector quota, \
                  --max-clients-per-pod)\r\n"
            }
            Self::SourceQuota => {
                b"-ERR max number of clients reached (this source's redirector quota, \
                  --max-clients-per-source)\r\n"
            }
        }
    }

    pub const ALL: [Self; 4] = [
        Self::NotSteered,
        Self::MaxClients,
        Self::PodQuota,
        Self::SourceQuota,
    ];
}

/// Connections held now: in total, per pod and per direct source.
#[derive(Debug, Default)]
pub struct Tally {
    total: usize,
    by_origin: HashMap<Origin, usize>,
}

impl Tally {
    pub fn total(&self) -> usize {
        self.total
    }

    pub fn of(&self, origin: Origin) -> usize {
        self.by_origin.get(&origin).copied().unwrap_or(0)
    }

    pub fn add(&mut self, origin: Origin) {
        self.total += 1;
        *self.by_origin.entry(origin).or_default() += 1;
    }

    pub fn remove(&mut self, origin: Origin) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.by_origin.get_mut(&origin) {
            *n -= 1;
            if *n == 0 {
                self.by_origin.remove(&origin);
            }
        }
    }
}

/// Whether a connection from `origin` is served, given what is held now.
pub fn decide(policy: &Policy, tally: &Tally, origin: Origin) -> Result<(), Refusal> {
    let per_origin = match origin {
        Origin::Steered { .. } => (policy.max_per_pod, Refusal::PodQuota),
        Origin::Direct { source } => {
            let source = source.to_canonical();
            if !policy.allow_direct.iter().any(|c| c.contains(source)) {
                return Err(Refusal::NotSteered);
            }
            (policy.max_per_source, Refusal::SourceQuota)
        }
    };
    if tally.total() >= policy.max_clients {
        return Err(Refusal::MaxClients);
    }
    match per_origin {
        (limit, refusal) if limit != 0 && tally.of(origin) >= limit => Err(refusal),
        _ => Ok(()),
    }
}

/// Whether the kernel should send new connects direct because the proxy is
/// (nearly) full. Set at the limit; cleared only once a tenth of it is free
/// again, so the flag does not flap with every connection at the edge.
pub fn node_full(policy: &Policy, held: usize, full_now: bool) -> bool {
    let limit = policy.max_clients;
    if full_now {
        held > limit.saturating_sub((limit / 10).max(1))
    } else {
        held >= limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            allow_direct: vec![
                "127.0.0.0/8".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
            max_clients: 10,
            max_per_pod: 3,
            max_per_source: 2,
        }
    }

    const POD_A: Origin = Origin::Steered { pod: 4101 };
    const POD_B: Origin = Origin::Steered { pod: 4102 };

    fn direct(ip: &str) -> Origin {
        Origin::Direct {
            source: ip.parse().unwrap(),
        }
    }

    #[test]
    fn direct_connections_need_an_allowed_source() {
        let (policy, tally) = (policy(), Tally::default());
        assert_eq!(decide(&policy, &tally, direct("127.0.0.1")), Ok(()));
        assert_eq!(decide(&policy, &tally, direct("10.1.7.7")), Ok(()));
        assert_eq!(
            decide(&policy, &tally, direct("10.2.0.1")),
            Err(Refusal::NotSteered)
        );
        // An IPv4 client on a dual-stack socket is still that IPv4 source.
        assert_eq!(decide(&policy, &tally, direct("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(
            decide(&policy, &tally, direct("::1")),
            Err(Refusal::NotSteered),
            "not in this policy's list"
        );
        assert_eq!(decide(&policy, &tally, POD_A), Ok(()));
    }

    #[test]
    fn a_pod_at_its_quota_does_not_stop_another_pod() {
        let policy = policy();
        let mut tally = Tally::default();
        for _ in 0..3 {
            assert_eq!(decide(&policy, &tally, POD_A), Ok(()));
            tally.add(POD_A);
        }
        assert_eq!(decide(&policy, &tally, POD_A), Err(Refusal::PodQuota));
        assert_eq!(decide(&policy, &tally, POD_B), Ok(()));
        tally.remove(POD_A);
        assert_eq!(decide(&policy, &tally, POD_A), Ok(()));
    }

    #[test]
    fn direct_sources_have_their_own_quota_and_the_node_limit_binds_all() {
        let policy = policy();
        let mut tally = Tally::default();
        tally.add(direct("127.0.0.1"));
        tally.add(direct("127.0.0.1"));
        assert_eq!(
            decide(&policy, &tally, direct("127.0.0.1")),
            Err(Refusal::SourceQuota)
        );
        assert_eq!(decide(&policy, &tally, direct("127.0.0.2")), Ok(()));
        for pod in 0..8 {
            tally.add(Origin::Steered { pod });
        }
        assert_eq!(tally.total(), 10);
        assert_eq!(
            decide(&policy, &tally, Origin::Steered { pod: 99 }),
            Err(Refusal::MaxClients)
        );
        let unlimited = Policy {
            max_per_pod: 0,
            max_per_source: 0,
            ..policy
        };
        let mut tally = Tally::default();
        for _ in 0..9 {
            tally.add(POD_A);
        }
        assert_eq!(decide(&unlimited, &tally, POD_A), Ok(()));
    }

    #[test]
    fn the_full_flag_has_hysteresis() {
        let policy = policy();
        assert!(!node_full(&policy, 9, false));
        assert!(node_full(&policy, 10, false));
        assert!(node_full(&policy, 10, true));
        assert!(!node_full(&policy, 9, true), "a tenth free clears it");
        let big = Policy {
            max_clients: 1000,
            ..policy
        };
        assert!(node_full(&big, 950, true));
        assert!(!node_full(&big, 900, true));
    }
}
