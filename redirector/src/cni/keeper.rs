//! Keeps redirector-cni in the node's CNI chain while the agent runs.
//!
//! Network plugins own their config file and rewrite it when their own pod
//! restarts (flannel, Calico), dropping entries they did not write; pods
//! started after that would no longer be enrolled at sandbox setup. The
//! agent watches the primary config (path, size, mtime: a stat every few
//! seconds) and chains the plugin in again when it changes.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use tracing::{debug, info, warn};

use super::conf::{self, ConfChange, InstallOptions};

/// What identifies a version of the primary config file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

fn look(options: &InstallOptions) -> Option<Seen> {
    let path = conf::primary_conf(&options.conf_dir).ok()?.ok()?;
    let meta = std::fs::metadata(&path).ok()?;
    Some(Seen {
        path,
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

/// Checks every `every` (the first time at once); runs until dropped.
pub async fn keep_chained(options: InstallOptions, every: Duration) {
    let mut last: Option<Seen> = None;
    let mut reported = None::<String>;
    loop {
        let seen = look(&options);
        if seen.is_some() && seen != last {
            let install = options.clone();
            let result = tokio::task::spawn_blocking(move || conf::install(&install)).await;
            match result {
                Ok(Ok(installed)) => {
                    reported = None;
                    match installed.change {
                        ConfChange::Unchanged => {
                            debug!(conf = %installed.conf.display(), "CNI chain intact")
                        }
                        ConfChange::Added | ConfChange::Converted { .. } => info!(
                            conf = %installed.conf.display(),
                            "redirector-cni chained into the node's CNI config"
                        ),
                        ConfChange::Updated => {
                            info!(conf = %installed.conf.display(), "redirector-cni entry updated")
                        }
                    }
                    // Our own write changed the file: remember that version.
                    last = look(&options);
                }
                Ok(Err(e)) => {
                    let message = e.to_string();
                    if reported.as_deref() != Some(&message) {
                        warn!(error = %message, "cannot chain redirector-cni into the CNI config");
                        reported = Some(message);
                    }
                }
                Err(e) => warn!(error = %e, "CNI config check panicked"),
            }
        }
        tokio::time::sleep(every).await;
    }
}
