//! A container's view of the node's files, as a container runtime builds
//! it from a pod spec: a private mount namespace whose root holds only the
//! image (here: the built binaries and the libraries they link) and the
//! pod's hostPath volumes, each with its mount propagation, the root
//! read-only. What the agent can open from there is what it could open in
//! the DaemonSet; what the manifest forgets to mount, it cannot.
//!
//! The "host" side of every volume is a directory the test chooses, so a
//! test never touches the machine's real /etc/cni or /var/run/netns.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    TempDir,
    process::{Place, path_str},
};

/// `mountPropagation` of a volume mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    /// `None` (the default): mounts made on the host later are not seen.
    Private,
    /// `HostToContainer`: the host's later mounts below it are seen.
    HostToContainer,
    /// `Bidirectional`: both ways.
    Bidirectional,
}

impl Propagation {
    /// From the pod spec's `mountPropagation`.
    pub fn from_spec(value: Option<&str>) -> Self {
        match value {
            Some("HostToContainer") => Self::HostToContainer,
            Some("Bidirectional") => Self::Bidirectional,
            _ => Self::Private,
        }
    }

    fn mount_flag(self) -> &'static str {
        match self {
            Self::Private => "--make-rprivate",
            Self::HostToContainer => "--make-rslave",
            Self::Bidirectional => "--make-rshared",
        }
    }
}

/// One volume mount: `host` (the test's stand-in for the hostPath) at
/// `container` inside.
#[derive(Clone, Debug)]
pub struct VolumeMount {
    pub host: PathBuf,
    pub container: PathBuf,
    pub propagation: Propagation,
    pub read_only: bool,
}

/// The image: a file or directory of the host placed at a path inside the
/// container.
#[derive(Clone, Debug)]
pub struct ImageFile {
    pub host: PathBuf,
    pub container: PathBuf,
}

/// A container root, built when its command starts.
pub struct ContainerFs {
    root: TempDir,
    image: Vec<ImageFile>,
    volumes: Vec<VolumeMount>,
}

impl ContainerFs {
    pub fn new(image: Vec<ImageFile>, volumes: Vec<VolumeMount>) -> Self {
        Self {
            root: TempDir::new("rdr-ctr-"),
            image,
            volumes,
        }
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `program args` in `place` (the pod's network namespace and cgroup:
    /// the node's for a hostNetwork pod), inside a new mount namespace built
    /// as described above. The process is `program` itself (every step
    /// execs), so its PID is the container's.
    pub fn command(&self, place: &Place, program: &str, args: &[String]) -> Command {
        let root = self.root.path();
        let mut script = String::from("set -e\nR=\"$1\"; shift\n");
        // The root becomes a mount of its own, so it can be made read-only
        // once everything is mounted on it.
        script.push_str("mount --bind \"$R\" \"$R\"\n");
        // The image's libraries (merged /usr, as Debian has it).
        for dir in ["usr/lib", "usr/lib64"] {
            if Path::new("/").join(dir).is_dir() {
                create_dir(&root.join(dir));
                script.push_str(&format!("mount --rbind /{dir} \"$R/{dir}\"\n"));
            }
        }
        for (link, target) in [("lib", "usr/lib"), ("lib64", "usr/lib64")] {
            let _ = std::os::unix::fs::symlink(target, root.join(link));
        }
        for file in &self.image {
            mount_point(&root.join(relative(&file.container)), &file.host);
            script.push_str(&format!(
                "mount --rbind {} \"$R/{}\"\n",
                quote(&file.host),
                path_str(relative(&file.container))
            ));
        }
        // What every container gets from its runtime.
        for dir in ["dev", "proc", "tmp"] {
            create_dir(&root.join(dir));
        }
        script.push_str("mount --rbind /dev \"$R/dev\"\n");
        script.push_str("mount -t proc proc \"$R/proc\"\n");
        script.push_str("mount -t tmpfs tmpfs \"$R/tmp\"\n");
        for volume in &self.volumes {
            let inside = relative(&volume.container);
            mount_point(&root.join(inside), &volume.host);
            let inside = path_str(inside);
            script.push_str(&format!(
                "mount --rbind {} \"$R/{inside}\"\nmount {} \"$R/{inside}\"\n",
                quote(&volume.host),
                volume.propagation.mount_flag()
            ));
            if volume.read_only {
                script.push_str(&format!("mount -o remount,bind,ro \"$R/{inside}\"\n"));
            }
        }
        // readOnlyRootFilesystem.
        script.push_str("mount -o remount,bind,ro \"$R\"\n");
        script.push_str("exec chroot \"$R\" \"$@\"\n");

        let mut cmd = place.command("unshare");
        // Slave: the container sees the host's mounts (as propagation
        // allows) and its own mounts never reach the host.
        cmd.args(["--mount", "--propagation", "slave", "--", "sh", "-c"])
            .arg(script)
            .arg("container-setup")
            .arg(root)
            .arg(program)
            .args(args);
        cmd
    }
}

fn relative(path: &Path) -> &Path {
    path.strip_prefix("/").unwrap_or(path)
}

/// An empty directory or file at `target` to mount `source` on.
fn mount_point(target: &Path, source: &Path) {
    if source.is_dir() {
        create_dir(target);
    } else {
        create_dir(target.parent().expect("a file has a parent"));
        std::fs::write(target, b"").expect("mount point");
    }
}

fn create_dir(path: &Path) {
    std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

/// A path as one shell word.
fn quote(path: &Path) -> String {
    let text: OsString = path.as_os_str().to_owned();
    format!("'{}'", text.to_string_lossy().replace('\'', "'\\''"))
}

/// A mount the test makes on the host and removes on drop.
pub struct HostMount(PathBuf);

impl HostMount {
    /// `mount ARGS... TARGET`, asserting success.
    pub fn new(args: &[&str], target: &Path) -> Self {
        let out = Command::new("mount")
            .args(args)
            .arg(target)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount {args:?} {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self(target.to_path_buf())
    }

    /// Makes this mount a shared one, so mounts below it propagate to the
    /// containers that mount it with HostToContainer.
    pub fn shared(self) -> Self {
        let out = Command::new("mount")
            .arg("--make-shared")
            .arg(&self.0)
            .output()
            .expect("run mount");
        assert!(out.status.success(), "make-shared: {out:?}");
        self
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
