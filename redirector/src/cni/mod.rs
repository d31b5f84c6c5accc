//! The CNI side of race-free enrollment: `redirector-cni`, chained after the
//! node's network plugins, asks the node agent over a Unix socket to enroll
//! a pod's network namespace before any of its containers start.

pub mod wire;

/// `redirector cni ...`: put the plugin into (or take it out of) the
/// node's CNI configuration.
#[derive(Debug, clap::Subcommand)]
pub enum CniCommand {
    /// Copy redirector-cni into the CNI bin dir and chain it last in the
    /// node's CNI configuration.
    Install,
    /// Remove the plugin from the CNI configuration and the bin dir.
    Uninstall,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {}

/// Runs a `redirector cni` command; returns what to print.
pub fn run_command(command: CniCommand) -> Result<String, Error> {
    match command {
        CniCommand::Install | CniCommand::Uninstall => Ok(String::new()),
    }
}
