//! cgroup v2 for tests: a private mount of the v2 hierarchy and cgroups in
//! it, removed on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// cgroup v2 mounted on a fresh directory. Every mount shows the same single
/// hierarchy; a private mount point just keeps tests off the host's paths.
pub struct Cgroup2Mount {
    path: PathBuf,
}

impl Cgroup2Mount {
    pub fn new(path: PathBuf) -> Self {
        fs::create_dir_all(&path).expect("create cgroup2 mount point");
        mount(
            Some("none"),
            &path,
            Some("cgroup2"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount cgroup2 on {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup2Mount {
    fn drop(&mut self) {
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&self.path);
    }
}

/// A cgroup directory. Its processes must be gone before it drops.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn create(path: PathBuf) -> Self {
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A killed process leaves its cgroup a moment after it is reaped.
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// Unmounts (lazily) whatever is mounted at a path, on drop: for mounts a
/// test causes the daemon to make.
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        while umount2(&self.0, MntFlags::MNT_DETACH).is_ok() {}
    }
}
