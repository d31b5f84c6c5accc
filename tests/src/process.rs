//! Child processes placed in a network namespace and a cgroup, ended by PID.

use std::{
    fs::{File, OpenOptions},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output},
    time::{Duration, Instant},
};

use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Where a process runs: a netns (else the caller's) and a cgroup (else the
/// caller's). The mount namespace is never changed, unlike `ip netns exec`,
/// so bpffs and cgroup mounts are the host's.
#[derive(Clone, Debug, Default)]
pub struct Place {
    pub netns: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
}

impl Place {
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let netns = self
            .netns
            .as_ref()
            .map(|p| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display())));
        let procs = self.cgroup.as_ref().map(|cg| {
            OpenOptions::new()
                .write(true)
                .open(cg.join("cgroup.procs"))
                .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", cg.display()))
        });
        // SAFETY: between fork and exec only async-signal-safe syscalls run
        // (sigprocmask, write, setns), on descriptors opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // Signal masks survive exec: a caller waiting on SIGINT or
                // SIGTERM blocks them, and its children must not inherit that.
                nix::sys::signal::SigSet::empty().thread_set_mask()?;
                if let Some(procs) = &procs {
                    // "0" moves the writing process itself.
                    nix::unistd::write(procs, b"0")?;
                }
                if let Some(netns) = &netns {
                    setns(netns, CloneFlags::CLONE_NEWNET)?;
                }
                Ok(())
            });
        }
        // Own process group: a Ctrl-C in `cargo xtask demo` reaches only the
        // demo, which then stops its children in order.
        cmd.process_group(0);
        cmd
    }

    /// Runs `make` inside this place's network namespace (the caller's own
    /// when it has none; entering one needs root), on a dedicated thread so
    /// the caller's stays put. Sockets keep the namespace they were made in.
    fn in_netns<T: Send>(
        &self,
        make: impl FnOnce() -> std::io::Result<T> + Send,
    ) -> std::io::Result<T> {
        let Some(netns) = &self.netns else {
            return make();
        };
        let netns = File::open(netns)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                make()
            })
            .join()
            .map_err(|_| std::io::Error::other("namespace thread panicked"))?
        })
    }

    /// A listener inside this place's network namespace that joins the
    /// `SO_REUSEPORT` group on `addr`, as an upgrade's new daemon does.
    pub fn reuseport_listen(
        &self,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<std::net::TcpListener> {
        use nix::sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt,
            socket, sockopt,
        };
        self.in_netns(|| {
            let family = if addr.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            setsockopt(&fd, sockopt::ReusePort, &true)?;
            if addr.is_ipv6() {
                setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            }
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrStorage::from(addr),
            )?;
            listen(&fd, Backlog::MAXCONN)?;
            Ok(std::net::TcpListener::from(fd))
        })
    }

    /// A TCP connection made from inside this place's network namespace.
    pub fn connect(
        &self,
        addr: std::net::SocketAddr,
        timeout: std::time::Duration,
    ) -> std::io::Result<std::net::TcpStream> {
        self.in_netns(|| std::net::TcpStream::connect_timeout(&addr, timeout))
    }

    /// A TCP listener bound inside this place's network namespace: a
    /// server the test runs in-process, reachable from processes there.
    pub fn listen(&self, addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
        self.in_netns(|| std::net::TcpListener::bind(addr))
    }

    /// Runs to completion and returns the output.
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }
}

/// A running child, ended by PID (SIGTERM, then SIGKILL) on drop.
pub struct Child {
    name: String,
    child: Option<std::process::Child>,
}

impl Child {
    pub fn spawn(name: impl Into<String>, mut cmd: Command) -> Self {
        let name = name.into();
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self {
            name,
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal_and_wait(Signal::SIGTERM, grace)
    }

    /// SIGKILL: a crash, as far as the process is concerned.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.signal_and_wait(Signal::SIGKILL, Duration::from_secs(5))
    }

    fn signal_and_wait(&mut self, signal: Signal, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = Pid::from_raw(i32::try_from(child.id()).ok()?);
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let _ = kill(pid, signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} (pid {pid}) ignored {signal:?}; killing", self.name);
        let _ = kill(pid, Signal::SIGKILL);
        child.wait().ok()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(5));
    }
}

/// Runs a command on the host and panics with its output if it fails.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process stopped with SIGSTOP (its sockets still take what peers send,
/// in the kernel's buffers; it answers nothing), continued when dropped,
/// even if the test fails.
pub struct Stopped(Pid);

impl Stopped {
    /// Returns once every thread of `pid` has stopped: `kill` returns
    /// before they do, and a thread still running could take what arrives
    /// next.
    pub fn stop(pid: u32) -> Self {
        let pid = Pid::from_raw(i32::try_from(pid).expect("pid"));
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
        let stopped = Self(pid);
        wait_for(&format!("{pid} to stop"), Duration::from_secs(5), || {
            all_threads_stopped(pid).then_some(())
        });
        stopped
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// Whether every thread of `pid` is in state `T` (stopped).
fn all_threads_stopped(pid: Pid) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // `pid (comm) S ...`: the state follows the last `)`.
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
    })
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// utime + stime of a process, in clock ticks (`/proc/<pid>/stat`).
pub fn cpu_ticks(pid: u32) -> u64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// (utime, stime) of a process, in clock ticks: user-space work and the
/// kernel's (syscalls, TCP) apart.
pub fn cpu_split(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may contain spaces; fields are counted after ')'.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
    (field(11), field(12))
}
