//! The CNI side of race-free enrollment: `redirector-cni`, chained after the
//! node's network plugins, asks the node agent over a Unix socket to enroll
//! a pod's network namespace before any of its containers start.
//!
//! - [`plugin`]: the plugin the container runtime runs (`redirector-cni`).
//! - [`client::ask`]: its side of the socket (blocking, no runtime).
//! - [`server`]: the agent's side (tokio).
//! - [`conf`]: chaining the plugin into the node's CNI config, and out.

pub mod client;
pub mod conf;
pub mod keeper;
pub mod plugin;
pub mod server;
pub mod wire;

use std::{io, path::PathBuf, time::Duration};

pub use client::ask;

/// The plugin's `type` in a conflist, and its binary's name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "redirector-cni";

/// Longest request or reply line on the agent socket.
pub const MAX_LINE: usize = 64 * 1024;

/// `redirector cni ...`: put the plugin into (or take it out of) the
/// node's CNI configuration.
#[derive(Debug, clap::Subcommand)]
pub enum CniCommand {
    /// Copy redirector-cni into the CNI bin dir and chain it last in the
    /// node's CNI configuration (the lexically first *.conflist, *.conf or
    /// *.json, as the container runtime picks it).
    Install {
        /// The node's CNI config dir.
        #[arg(long, default_value = conf::DEFAULT_CONF_DIR)]
        conf_dir: PathBuf,
        /// The node's CNI plugin dir.
        #[arg(long, default_value = conf::DEFAULT_BIN_DIR)]
        bin_dir: PathBuf,
        /// The plugin binary to copy [default: redirector-cni next to this executable].
        #[arg(long)]
        plugin_bin: Option<PathBuf>,
        /// The agent socket the plugin asks (the path on the node).
        #[arg(long, default_value = wire::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Fail pod sandbox setup when the agent cannot enroll the pod
        /// (the kubelet retries), instead of starting it unsteered.
        #[arg(long)]
        fail_closed: bool,
        /// Seconds to wait for the primary CNI config to appear (0: don't).
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// Remove the plugin from the CNI configuration and the bin dir.
    Uninstall {
        /// The node's CNI config dir.
        #[arg(long, default_value = conf::DEFAULT_CONF_DIR)]
        conf_dir: PathBuf,
        /// The node's CNI plugin dir.
        #[arg(long, default_value = conf::DEFAULT_BIN_DIR)]
        bin_dir: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Talking to the agent.
    #[error("cannot reach the agent at {}: {source}", .socket.display())]
    AgentUnreachable {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent at {} did not answer within {timeout:?}", .socket.display())]
    AgentTimedOut { socket: PathBuf, timeout: Duration },
    #[error("lost the agent at {} mid-request: {source}", .socket.display())]
    AgentIo {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent at {} hung up without replying", .socket.display())]
    AgentHungUp { socket: PathBuf },
    #[error("the agent at {} sent a reply longer than {MAX_LINE} bytes", .socket.display())]
    AgentReplyTooLong { socket: PathBuf },
    #[error("the agent at {} sent a malformed reply: {source}", .socket.display())]
    AgentBadReply {
        socket: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the request: {0}")]
    EncodeRequest(#[source] serde_json::Error),

    // The node's CNI config.
    #[error("cannot list CNI config dir {}: {source}", .dir.display())]
    ReadConfDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no usable CNI network config in {}{}{skipped}",
        .dir.display(),
        waited_note(*.waited)
    )]
    NoPrimaryConf {
        dir: PathBuf,
        waited: Duration,
        /// Why each candidate file was passed over, if any was.
        skipped: String,
    },
    #[error("cannot read {}: {source}", .path.display())]
    ReadConf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {what}", .path.display())]
    InvalidConf { path: PathBuf, what: String },
    #[error("cannot write {}: {source}", .path.display())]
    WriteConf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {}: {source}", .path.display())]
    RemoveConf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot turn {} into a list: {} exists and is not our conversion of it",
        .from.display(),
        .path.display()
    )]
    ConversionTargetExists { from: PathBuf, path: PathBuf },

    // The plugin binary.
    #[error("cannot locate the running executable: {0}")]
    CurrentExe(#[source] io::Error),
    #[error("cannot read the plugin binary {}: {source}", .path.display())]
    ReadPlugin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot install the plugin binary as {}: {source}", .path.display())]
    InstallPlugin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the plugin binary {}: {source}", .path.display())]
    RemovePlugin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn waited_note(waited: Duration) -> String {
    if waited.is_zero() {
        String::new()
    } else {
        format!(" after waiting {waited:?}")
    }
}

/// Runs a `redirector cni` command; returns what to print.
pub fn run_command(command: CniCommand) -> Result<String, Error> {
    match command {
        CniCommand::Install {
            conf_dir,
            bin_dir,
            plugin_bin,
            socket,
            fail_closed,
            wait,
        } => {
            let plugin_bin = match plugin_bin {
                Some(path) => path,
                None => std::env::current_exe()
                    .map_err(Error::CurrentExe)?
                    .with_file_name(PLUGIN_TYPE),
            };
            let installed = conf::install(&conf::InstallOptions {
                conf_dir,
                bin_dir,
                plugin_bin,
                settings: conf::PluginSettings {
                    agent_socket: socket,
                    fail_closed,
                },
                wait: Duration::from_secs(wait),
            })?;
            Ok(installed.to_string())
        }
        CniCommand::Uninstall { conf_dir, bin_dir } => {
            Ok(conf::uninstall(&conf_dir, &bin_dir)?.to_string())
        }
    }
}
