//! The CNI side of race-free enrollment: `redirector-cni`, chained after the
//! node's network plugins, asks the node agent over a Unix socket to enroll
//! a pod's network namespace before any of its containers start.

pub mod wire;
