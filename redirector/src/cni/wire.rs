//! What the CNI plugin and the node agent say over the agent's Unix socket:
//! one JSON request line, one JSON reply line, then the plugin hangs up.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The default socket, under the host's run dir the DaemonSet mounts.
pub const DEFAULT_SOCKET: &str = "/var/run/redirector/cni.sock";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
}

/// A pod sandbox event, as the container runtime told the plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    pub container_id: String,
    /// `CNI_NETNS`; DEL may come after the namespace is gone.
    pub netns: Option<PathBuf>,
    /// From `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`).
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Reply {
    /// The pod's namespace is steered from now on.
    Enrolled {
        netns_cookie: u64,
    },
    /// Nothing to do: the namespace is not opted in, the pod opted out, ...
    Skipped {
        reason: String,
    },
    Unenrolled {
        was_enrolled: bool,
    },
    /// The agent could not do what was asked.
    Failed {
        error: String,
    },
}
