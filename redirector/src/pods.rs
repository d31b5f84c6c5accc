//! Finding a Kubernetes pod's network namespace from its UID, as a node
//! agent with the host's PID namespace can: kubelet puts each container of
//! a pod in a cgroup whose path names the pod UID, and every process of the
//! pod (hostNetwork pods aside, which callers exclude) lives in the pod's
//! network namespace.
//!
//! The two cgroup drivers spell the UID differently:
//! - cgroupfs: `/kubepods/besteffort/pod<uid>/<container>`;
//! - systemd: `/kubepods.slice/kubepods-besteffort.slice/
//!   kubepods-besteffort-pod<uid with '_' for '-'>.slice/cri-containerd-<id>.scope`.

use std::{
    io,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not a pod UID (expected 36 characters of hex digits and dashes)")]
    BadUid(String),
    #[error("cannot list processes in {path}: {source}")]
    Proc {
        path: std::path::PathBuf,
        source: io::Error,
    },
}

/// A pod UID as the API server gives it (a UUID), checked so it can be
/// matched inside cgroup paths without surprises.
pub fn check_uid(uid: &str) -> Result<&str, Error> {
    let well_formed = uid.len() == 36
        && uid.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if well_formed {
        Ok(uid)
    } else {
        Err(Error::BadUid(uid.to_string()))
    }
}

/// A process of the pod `uid` (the oldest: a pod's sandbox, "pause",
/// starts first), found through `/proc` (`proc_root`), if any runs yet.
pub fn find_process(proc_root: &Path, uid: &str) -> Result<Option<u32>, Error> {
    let uid = check_uid(uid)?.to_ascii_lowercase();
    Ok(scan(proc_root)?.get(&uid).copied())
}

/// The pod UID a cgroup path names, under either driver, lower-cased
/// with dashes (as the API server writes it).
pub fn pod_uid_of_cgroup(path: &str) -> Option<String> {
    path.split('/').find_map(|part| {
        let candidate = part.strip_prefix("pod").map(str::to_string).or_else(|| {
            part.strip_suffix(".slice")
                .and_then(|slice| slice.rsplit_once("-pod"))
                .map(|(_, id)| id.replace('_', "-"))
        })?;
        let candidate = candidate.to_ascii_lowercase();
        check_uid(&candidate).ok()?;
        Some(candidate)
    })
}

/// A host path as the agent can open it: runtimes that name a sandbox's
/// network namespace by process (`/proc/<pid>/ns/net`, as cri-dockerd does)
/// mean the host's /proc, which the agent sees at `proc_root` (the
/// DaemonSet mounts it at /host/proc; its own /proc is its own PID
/// namespace's). Every other path (containerd's `/var/run/netns/cni-…`) is
/// the same inside.
pub fn host_proc_path(proc_root: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix("/proc") {
        Ok(rest) if proc_root != Path::new("/proc") => proc_root.join(rest),
        _ => path.to_path_buf(),
    }
}

/// One pass over `/proc` (`proc_root`): the oldest process of every pod
/// that has one here, by pod UID. The node agent looks up many pods at
/// once, so it reads each process's cgroup once, not once per pod.
pub fn scan(proc_root: &Path) -> Result<std::collections::HashMap<String, u32>, Error> {
    let entries = std::fs::read_dir(proc_root).map_err(|source| Error::Proc {
        path: proc_root.to_owned(),
        source,
    })?;
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The oldest process first: a pod's sandbox ("pause") starts first.
    pids.sort_unstable();
    let mut pods = std::collections::HashMap::new();
    for pid in pids {
        // Processes come and go while we look: a vanished one is skipped.
        let Ok(cgroups) = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))
        else {
            continue;
        };
        if let Some(uid) = cgroups
            .lines()
            .filter_map(|line| line.splitn(3, ':').nth(2))
            .find_map(pod_uid_of_cgroup)
        {
            pods.entry(uid).or_insert(pid);
        }
    }
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_netns_paths_are_the_hosts_through_proc_root() {
        let root = Path::new("/host/proc");
        assert_eq!(
            host_proc_path(root, Path::new("/proc/4242/ns/net")),
            Path::new("/host/proc/4242/ns/net")
        );
        assert_eq!(
            host_proc_path(root, Path::new("/var/run/netns/cni-1")),
            Path::new("/var/run/netns/cni-1")
        );
        assert_eq!(
            host_proc_path(Path::new("/proc"), Path::new("/proc/1/ns/net")),
            Path::new("/proc/1/ns/net")
        );
        assert_eq!(
            host_proc_path(root, Path::new("/processes/1")),
            Path::new("/processes/1"),
            "a path component, not a string prefix"
        );
    }

    const UID: &str = "5f3c2a1e-9b7d-4c4e-8f00-0123456789ab";

    #[test]
    fn both_cgroup_drivers_name_the_pod() {
        let names = |path: &str| pod_uid_of_cgroup(path).as_deref() == Some(UID);
        assert!(names(
            "/kubepods/besteffort/pod5f3c2a1e-9b7d-4c4e-8f00-0123456789ab/0f1e2d"
        ));
        assert!(names(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f3c2a1e_9b7d_4c4e_8f00_0123456789ab.slice/cri-containerd-0f1e.scope"
        ));
        assert!(names(
            "/kubepods.slice/kubepods-pod5f3c2a1e_9b7d_4c4e_8f00_0123456789ab.slice"
        ));
        // Another pod, a prefix of the UID, or the UID elsewhere in a name.
        assert!(!names(
            "/kubepods/besteffort/pod5f3c2a1e-9b7d-4c4e-8f00-0123456789ac/x"
        ));
        assert!(!names("/kubepods/besteffort/pod5f3c2a1e/x"));
        assert!(!names(
            "/user.slice/session-5f3c2a1e-9b7d-4c4e-8f00-0123456789ab.scope"
        ));
    }

    #[test]
    fn a_cgroup_path_names_its_pod() {
        assert_eq!(
            pod_uid_of_cgroup(
                "/kubepods/besteffort/pod5F3C2A1E-9b7d-4c4e-8f00-0123456789ab/0f1e2d"
            )
            .as_deref(),
            Some(UID)
        );
        assert_eq!(
            pod_uid_of_cgroup(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f3c2a1e_9b7d_4c4e_8f00_0123456789ab.slice/cri-containerd-0f1e.scope"
            )
            .as_deref(),
            Some(UID)
        );
        assert_eq!(pod_uid_of_cgroup("/kubepods/besteffort/podnotauid/x"), None);
        assert_eq!(pod_uid_of_cgroup("/user.slice/session-3.scope"), None);
    }

    #[test]
    fn uids_are_checked() {
        assert!(check_uid(UID).is_ok());
        for bad in [
            "",
            "pod",
            "5f3c2a1e-9b7d-4c4e-8f00-0123456789a",
            "../../etc/passwd-aaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(check_uid(bad).is_err(), "{bad}");
        }
    }
}
