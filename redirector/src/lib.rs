//! redirector: steers Redis connects of opted-in namespaces to a node proxy
//! with eBPF, and serves them there. See ARCHITECTURE.md for the data path.

pub mod admin;
pub mod app;
pub mod backend;
pub mod cidr;
pub mod cluster;
pub mod cni;
pub mod config;
pub mod fasthash;
pub mod handover;
pub mod hbone;
pub mod identity;
pub mod k8s;
pub mod metrics;
pub mod netns;
pub mod pods;
pub mod proxy;
pub mod resp;
pub mod serving;
pub mod socket;
pub mod status;
pub mod steering;
pub mod workers;
