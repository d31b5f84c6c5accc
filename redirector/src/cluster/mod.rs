//! What redirector knows about Redis Cluster: slots, the command table and
//! the topology.

pub mod commands;
pub mod slot;
pub mod topology;
