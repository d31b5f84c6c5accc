//! Network namespaces as redirector knows them: by their cookie.
//!
//! Enrollment is keyed by the netns cookie, the 64-bit id the kernel gives
//! each namespace and never reuses while the machine is up (an inode number
//! can be reused). The programs read it with `bpf_get_netns_cookie()`; here
//! we read it with `getsockopt(SO_NETNS_COOKIE)` on a socket created inside
//! the namespace, from a short-lived thread that enters it, so the caller's
//! own namespace is never changed.

use std::{
    fmt,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use nix::{
    sched::{CloneFlags, setns},
    sys::socket::{AddressFamily, SockFlag, SockType, socket},
};

/// `SO_NETNS_COOKIE` (Linux 5.14); not exported by libc yet.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Cookie { path: PathBuf, source: io::Error },
}

/// How a caller names a network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetnsRef {
    /// A bind-mounted namespace file, e.g. `/var/run/netns/pod-a`.
    Path(PathBuf),
    /// The namespace a process lives in.
    Pid(u32),
}

impl NetnsRef {
    pub fn path(&self) -> PathBuf {
        match self {
            Self::Path(path) => path.clone(),
            Self::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        }
    }
}

impl fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(path) => write!(f, "{}", path.display()),
            Self::Pid(pid) => write!(f, "pid {pid}"),
        }
    }
}

/// A resolved namespace: what the enrollment map records about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Netns {
    pub cookie: u64,
    pub inode: u64,
}

/// Resolves a namespace reference to its cookie and inode.
pub fn resolve(netns: &NetnsRef) -> Result<Netns, Error> {
    let path = netns.path();
    let file = File::open(&path).map_err(|source| Error::Open {
        path: path.clone(),
        source,
    })?;
    let inode = file
        .metadata()
        .map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?
        .ino();
    let cookie = std::thread::scope(|scope| {
        scope
            .spawn(|| cookie_inside(&file, &path))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    Ok(Netns { cookie, inode })
}

/// The cookie of the namespace the calling thread is in.
pub fn current_cookie() -> io::Result<u64> {
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket_netns_cookie(&sock)
}

fn cookie_inside(netns: &File, path: &Path) -> Result<u64, Error> {
    // setns(CLONE_NEWNET) only moves this thread, which exits right after.
    setns(netns, CloneFlags::CLONE_NEWNET).map_err(|source| match source {
        nix::Error::EINVAL => Error::NotNetns { path: path.into() },
        source => Error::Enter {
            path: path.into(),
            source,
        },
    })?;
    current_cookie().map_err(|source| Error::Cookie {
        path: path.into(),
        source,
    })
}

fn socket_netns_cookie(sock: &OwnedFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` outlive the call and describe an 8-byte buffer.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_resolves_to_the_current_cookie() {
        let own = resolve(&NetnsRef::Pid(std::process::id())).expect("resolve own netns");
        assert_eq!(own.cookie, current_cookie().expect("cookie"));
        assert_ne!(own.cookie, 0);
        let inode = std::fs::metadata("/proc/self/ns/net").expect("stat").ino();
        assert_eq!(own.inode, inode);
    }

    #[test]
    fn a_file_that_is_not_a_namespace_is_refused() {
        // setns() needs CAP_SYS_ADMIN to even look at the file; without it
        // the error is EPERM, which is also a refusal.
        let err = resolve(&NetnsRef::Path("/proc/self/status".into())).unwrap_err();
        assert!(
            matches!(err, Error::NotNetns { .. } | Error::Enter { .. }),
            "{err}"
        );
    }
}
