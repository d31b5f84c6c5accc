//! The two kernel filesystems steering lives on: cgroup v2 (where the
//! programs attach) and bpffs (where maps and links are pinned). Nodes differ:
//! Kubernetes nodes have cgroup v2 at `/sys/fs/cgroup`, systemd hybrid hosts
//! at `/sys/fs/cgroup/unified`, and some hosts have neither mounted, so the
//! daemon finds or mounts what it needs.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{FsType, statfs},
};

/// Where the daemon mounts cgroup v2 when the host has no v2 mount at all.
pub const FALLBACK_CGROUP2_MOUNT: &str = "/run/redirector/cgroup2";

const CGROUP2: FsType = FsType(libc::CGROUP2_SUPER_MAGIC as _);
const BPFFS: FsType = FsType(libc::BPF_FS_MAGIC as _);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{path} is not on a cgroup v2 filesystem and is not an empty directory to mount one on; \
         pass --cgroup-root with a cgroup v2 directory"
    )]
    NotCgroup2 { path: PathBuf },
    #[error(
        "{path} is not on bpffs and is not an empty directory to mount it on; \
         pass --pin-dir with a directory under a bpffs mount"
    )]
    NotBpffs { path: PathBuf },
    #[error("cannot mount {fstype} on {path}: {source}")]
    Mount {
        fstype: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("cannot create {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
}

pub fn is_cgroup2(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == CGROUP2)
}

pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPFFS)
}

/// Resolves the cgroup v2 directory to attach to.
///
/// With `requested`, that directory is used; if it is not on cgroup v2 but is
/// a missing or empty directory, cgroup v2 is mounted there. Without it, the
/// usual v2 mount points are tried, then cgroup v2 is mounted at
/// [`FALLBACK_CGROUP2_MOUNT`].
pub fn resolve_cgroup_root(requested: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(path) = requested {
        if !is_cgroup2(path) {
            mount_on_empty_dir(path, "cgroup2", "none", None)
                .map_err(|e| e.unwrap_or_else(|| Error::NotCgroup2 { path: path.into() }))?;
        }
        return Ok(path.into());
    }
    for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if is_cgroup2(Path::new(candidate)) {
            return Ok(candidate.into());
        }
    }
    let fallback = Path::new(FALLBACK_CGROUP2_MOUNT);
    if !is_cgroup2(fallback) {
        mount_on_empty_dir(fallback, "cgroup2", "none", None).map_err(|e| {
            e.unwrap_or_else(|| Error::NotCgroup2 {
                path: fallback.into(),
            })
        })?;
    }
    Ok(fallback.into())
}

/// Mode of a bpffs the daemon mounts: root only, as systemd and Cilium mount
/// it. (The kernel's default is 1777: any user could pin there.)
pub const BPFFS_MODE: &str = "mode=0700";

/// Makes sure `pin_dir` can hold pins: its parent must be on bpffs, and is
/// mounted as bpffs when it is a missing or empty directory (the usual case
/// being `/sys/fs/bpf` on a host that never mounted it).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), Error> {
    if is_bpffs(pin_dir) {
        return Ok(());
    }
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    mount_bpffs(parent).map(drop)
}

/// Mounts bpffs (mode 0700) on `dir` unless it is bpffs already; returns
/// whether it mounted. `redirector mount-bpffs` runs this on the host.
pub fn mount_bpffs(dir: &Path) -> Result<bool, Error> {
    if is_bpffs(dir) {
        return Ok(false);
    }
    mount_on_empty_dir(dir, "bpf", "bpf", Some(BPFFS_MODE))
        .map_err(|e| e.unwrap_or_else(|| Error::NotBpffs { path: dir.into() }))?;
    Ok(true)
}

/// Mounts `fstype` on `path` if it is a missing or empty directory. `Err(None)`
/// means the directory was not eligible.
fn mount_on_empty_dir(
    path: &Path,
    fstype: &'static str,
    source: &str,
    data: Option<&str>,
) -> Result<(), Option<Error>> {
    fs::create_dir_all(path).map_err(|source| {
        Some(Error::CreateDir {
            path: path.into(),
            source,
        })
    })?;
    let empty = fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none());
    if !empty {
        return Err(None);
    }
    mount(
        Some(source),
        path,
        Some(fstype),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        data,
    )
    .map_err(|source| {
        Some(Error::Mount {
            fstype,
            path: path.into(),
            source,
        })
    })?;
    tracing::info!(fstype, path = %path.display(), "mounted");
    Ok(())
}

/// Mount points of every cgroup v2 filesystem, from `/proc/self/mountinfo`.
pub fn cgroup2_mounts() -> Vec<PathBuf> {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mountinfo
        .lines()
        .filter_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> <opts> ... - <fstype> <src> <opts>"
            let (before, after) = line.split_once(" - ")?;
            let fstype = after.split_whitespace().next()?;
            let mount_point = before.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .collect()
}

fn unescape_mountinfo(field: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest
            .get(pos + 1..pos + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Finds the directory of cgroup `id` (a cgroup v2 id is its directory's
/// inode number) under the cgroup v2 mounts, for display.
pub fn cgroup_path(id: u64) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut stack: Vec<PathBuf> = cgroup2_mounts();
    while let Some(dir) = stack.pop() {
        if fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/odd\x"), r"/odd\x");
    }
}
