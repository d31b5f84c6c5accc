//! Workload identity for HBONE: SPIFFE IDs, who may open tunnels, and the
//! mTLS material they are proven with.
//!
//! An identity is the URI SAN `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, as
//! Istio issues it. rustls checks certificate chains but not URI SANs, so
//! reading and checking the SAN is ours ([`peer_identity`]).

pub mod istiod;
pub mod mint;
pub mod tls;

use std::{fmt, str::FromStr};

use rustls::pki_types::CertificateDer;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<account>: {0}")]
    BadSpiffeId(String),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the certificate does not parse: {0}")]
    BadCertificate(String),
    #[error("the certificate carries no SPIFFE URI SAN")]
    NoSpiffeSan,
    #[error("the certificate carries {0} SPIFFE URI SANs; exactly one is allowed")]
    SeveralSpiffeSans(usize),
}

/// A SPIFFE workload identity in Istio's shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::BadSpiffeId(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [trust_domain, "ns", namespace, "sa", service_account] = parts[..] else {
            return Err(bad());
        };
        // SPIFFE: lowercase letters, digits, '.', '-', '_' in the trust
        // domain; path segments must be non-empty.
        let domain_ok = !trust_domain.is_empty()
            && trust_domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        let segment_ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !domain_ok || !segment_ok(namespace) || !segment_ok(service_account) {
            return Err(bad());
        }
        Ok(Self::new(trust_domain, namespace, service_account))
    }
}

/// The one SPIFFE identity in a certificate's URI SANs.
pub fn cert_identity(cert: &CertificateDer<'_>) -> Result<Identity, Error> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| Error::BadCertificate(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| Error::BadCertificate(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        })
        .collect();
    match uris[..] {
        [] => Err(Error::NoSpiffeSan),
        [uri] => uri.parse(),
        _ => Err(Error::SeveralSpiffeSans(uris.len())),
    }
}

/// The identity of a TLS peer, from the leaf of the chain it presented.
pub fn peer_identity(chain: Option<&[CertificateDer<'_>]>) -> Result<Identity, Error> {
    let leaf = chain
        .and_then(<[_]>::first)
        .ok_or(Error::NoPeerCertificate)?;
    cert_identity(leaf)
}

/// The identities a tunnel peer may prove for one destination, as ztunnel
/// keys them: the workload's own (its namespace and service account), or
/// one of its Services' `subjectAltNames`. Sorted and without repeats, so
/// two equal sets pool together.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerIdentities(std::sync::Arc<[Identity]>);

impl PeerIdentities {
    pub fn new(identities: impl IntoIterator<Item = Identity>) -> Self {
        let mut all: Vec<Identity> = identities.into_iter().collect();
        all.sort();
        all.dedup();
        Self(all.into())
    }

    pub fn one(identity: Identity) -> Self {
        Self(std::sync::Arc::from([identity]))
    }

    pub fn accepts(&self, peer: &Identity) -> bool {
        self.0.binary_search(peer).is_ok()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Identity> {
        self.0.iter()
    }
}

impl fmt::Display for PeerIdentities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" or ")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

/// Meshed addresses and who may answer for each (from the API:
/// [`crate::k8s::workloads`]).
pub type AddressIdentities = std::collections::HashMap<std::net::IpAddr, PeerIdentities>;

/// Which peers may open tunnels to this node: one trust domain, and within
/// it any namespace or only the listed ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub trust_domain: String,
    /// Empty: every namespace of the trust domain.
    pub namespaces: Vec<String>,
}

impl Policy {
    pub fn allows(&self, peer: &Identity) -> bool {
        peer.trust_domain == self.trust_domain
            && (self.namespaces.is_empty() || self.namespaces.contains(&peer.namespace))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_reject_other_shapes() {
        let id: Identity = "spiffe://cluster.local/ns/redis/sa/redirector"
            .parse()
            .expect("valid");
        assert_eq!(id, Identity::new("cluster.local", "redis", "redirector"));
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/redis/sa/redirector"
        );
        for bad in [
            "spiffe://cluster.local/ns/redis",
            "spiffe://cluster.local/ns/redis/sa/",
            "spiffe://cluster.local/sa/x/ns/y",
            "spiffe://Cluster.local/ns/a/sa/b",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_set_of_peer_identities_accepts_each_member_and_nothing_else() {
        let a = Identity::new("cluster.local", "redis", "cart");
        let b = Identity::new("cluster.local", "redis", "shop");
        let set = PeerIdentities::new([b.clone(), a.clone(), b.clone()]);
        assert!(set.accepts(&a) && set.accepts(&b));
        assert!(!set.accepts(&Identity::new("cluster.local", "redis", "other")));
        assert_eq!(
            set,
            PeerIdentities::new([a.clone(), b.clone()]),
            "order and repeats do not matter"
        );
        assert_eq!(
            set.to_string(),
            "spiffe://cluster.local/ns/redis/sa/cart or spiffe://cluster.local/ns/redis/sa/shop"
        );
        assert_ne!(set, PeerIdentities::one(a));
    }

    #[test]
    fn policy_checks_trust_domain_and_namespaces() {
        let peer = Identity::new("cluster.local", "redis", "redirector");
        let any = Policy {
            trust_domain: "cluster.local".into(),
            namespaces: vec![],
        };
        assert!(any.allows(&peer));
        let listed = Policy {
            namespaces: vec!["other".into()],
            ..any.clone()
        };
        assert!(!listed.allows(&peer));
        let foreign = Policy {
            trust_domain: "example.org".into(),
            namespaces: vec![],
        };
        assert!(!foreign.allows(&peer));
    }

    #[test]
    fn minted_certificates_carry_their_identity() {
        let ca = mint::Ca::new("cluster.local").expect("ca");
        let id = Identity::new("cluster.local", "redis", "node-a");
        let issued = ca.issue(&id).expect("issue");
        let der = tls::parse_certs(issued.chain_pem.as_bytes()).expect("pem");
        assert_eq!(cert_identity(&der[0]).expect("identity"), id);
        assert_eq!(
            peer_identity(None).expect_err("no chain"),
            Error::NoPeerCertificate
        );
        // The CA's own certificate names no workload.
        let ca_der = tls::parse_certs(ca.cert_pem().as_bytes()).expect("pem");
        assert_eq!(cert_identity(&ca_der[0]), Err(Error::NoSpiffeSan));
    }
}
