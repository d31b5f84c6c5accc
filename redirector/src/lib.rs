//! redirector: steers Redis connects of opted-in namespaces to a node proxy
//! with eBPF, and serves them there. See ARCHITECTURE.md for the data path.

pub mod app;
pub mod config;
pub mod netns;
pub mod proxy;
pub mod status;
pub mod steering;
