//! Installs what the project needs, idempotently: each step checks first and
//! does nothing when its tool is already there.
//!
//! - nightly `rust-src` (the eBPF crate builds `core` for bpfel-unknown-none);
//! - bpf-linker, built against rustc's own LLVM (Debian's LLVM is too old)
//!   into `target/tools`, where `.cargo/config.toml` points the bpf target;
//! - cargo-deny into `target/tools`, for the offline licence, duplicate and
//!   source checks of `cargo xtask lint` (`deny.toml`);
//! - Debian packages: redis-server, redis-tools, bpftool, iproute2, procps,
//!   and the client software the proxy is tested with: php-cli + php-redis
//!   (phpredis) and python3-redis (redis-py for Debian's `/usr/bin/python3`),
//!   tcl and dpkg-dev for Redis's own test suite (fetched by
//!   `conformance::fetch`, from Debian's source package).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{root, run};

/// bpf-linker release known to work with this toolchain (see
/// ARCHITECTURE.md, "Toolchain").
const BPF_LINKER_VERSION: &str = "0.13.0";

/// cargo-deny release `deny.toml` is written for.
const CARGO_DENY_VERSION: &str = "0.20.2";

/// How setup tells that a package is installed.
#[derive(Clone, Copy)]
enum Check {
    /// A command of this name is on PATH.
    OnPath(&'static str),
    /// This command line exits 0 (for what is not a command of its own: a
    /// PHP extension, a Python module).
    Succeeds(&'static [&'static str]),
}

/// (check that proves it is installed, Debian packages providing it).
const PACKAGES: &[(Check, &[&str])] = &[
    (Check::OnPath("redis-server"), &["redis-server"]),
    (Check::OnPath("redis-cli"), &["redis-tools"]),
    (Check::OnPath("redis-benchmark"), &["redis-tools"]),
    (Check::OnPath("bpftool"), &["bpftool"]),
    (Check::OnPath("ip"), &["iproute2"]),
    (Check::OnPath("sysctl"), &["procps"]),
    (Check::OnPath("timeout"), &["coreutils"]),
    // A second sock_ops program's effect is read off a captured SYN.
    (Check::OnPath("tcpdump"), &["tcpdump"]),
    // Drops a test pod's SYNs (connects that never establish), in its netns.
    (Check::OnPath("iptables"), &["iptables"]),
    // Runs a pod process with CAP_NET_RAW only (util-linux).
    (Check::OnPath("setpriv"), &["util-linux"]),
    // A real TLS client: the HBONE tests read the certificate a node serves.
    (Check::OnPath("openssl"), &["openssl"]),
    // Loads the built-in /dashboard page in a test (headless, no network).
    (Check::OnPath("chromium"), &["chromium"]),
    // promtool lints a live /metrics scrape in a test.
    (Check::OnPath("promtool"), &["prometheus"]),
    // Renders deploy/ offline (`kubectl kustomize`) in a test; a machine
    // with another kubectl on PATH keeps it.
    (Check::OnPath("kubectl"), &["kubernetes-client"]),
    // Real CNI plugins (bridge, host-local) that redirector-cni chains after.
    (
        Check::Succeeds(&["test", "-x", "/usr/lib/cni/bridge"]),
        &["containernetworking-plugins"],
    ),
    // Redis's own test suite: its runner, and the unpacking of Debian's
    // source package that carries it.
    (Check::OnPath("tclsh"), &["tcl"]),
    (Check::OnPath("dpkg-source"), &["dpkg-dev"]),
    (Check::OnPath("php"), &["php-cli"]),
    (
        Check::Succeeds(&["php", "-r", "exit(extension_loaded('redis') ? 0 : 1);"]),
        // With php-cli, or apt satisfies the extension's PHP with Apache.
        &["php-cli", "php-redis"],
    ),
    // Debian's interpreter by path: the one first on PATH may be another.
    (
        Check::Succeeds(&["/usr/bin/python3", "-c", "import redis.cluster"]),
        &["python3-redis"],
    ),
];

pub fn all() -> Result<()> {
    toolchain()?;
    cargo_deny()?;
    packages()
}

pub fn toolchain() -> Result<()> {
    rust_src()?;
    bpf_linker()
}

fn tools_dir() -> PathBuf {
    root().join("target").join("tools")
}

/// PATH with the project's tools first.
pub fn path_with_tools() -> OsString {
    let mut path = OsString::from(tools_dir().join("bin"));
    if let Some(rest) = std::env::var_os("PATH") {
        path.push(":");
        path.push(rest);
    }
    path
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context("the nightly toolchain is needed for the eBPF crate")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("== setup: rust-src for nightly");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    let tools = tools_dir();
    let linker = tools.join("bin").join("bpf-linker");
    if Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    println!("== setup: bpf-linker {BPF_LINKER_VERSION} against rustc's LLVM (about a minute)");
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let (llvm, major) = rustc_llvm(&sysroot_lib)?;
    let lib = tools.join("lib");
    std::fs::create_dir_all(&lib)?;
    let link = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("cannot link {}", link.display()))?;
    let rpath = format!("-C link-arg=-Wl,-rpath,{}", sysroot_lib.display());
    run(Command::new("cargo")
        .args(["install", "--root"])
        .arg(&tools)
        .args(["bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &tools)
        .env("RUSTFLAGS", rpath))
}

/// cargo-deny, pinned, built with its own lock file (`--locked`).
pub fn cargo_deny() -> Result<()> {
    let deny = tools_dir().join("bin").join("cargo-deny");
    let installed = Command::new(&deny)
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_DENY_VERSION)
        });
    if installed {
        return Ok(());
    }
    println!("== setup: cargo-deny {CARGO_DENY_VERSION} (a few minutes)");
    run(Command::new("cargo")
        .args(["install", "--locked", "--root"])
        .arg(tools_dir())
        .args(["cargo-deny", "--version", CARGO_DENY_VERSION]))
}

/// rustc's shared LLVM in the nightly sysroot, and its major version.
fn rustc_llvm(sysroot_lib: &Path) -> Result<(PathBuf, String)> {
    for entry in std::fs::read_dir(sysroot_lib)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("libLLVM.so.") {
            let major = version.split('.').next().unwrap_or_default().to_string();
            return Ok((entry.path(), major));
        }
    }
    bail!("no libLLVM.so.* in {}", sysroot_lib.display())
}

fn packages() -> Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(check, _)| !installed(*check))
        .flat_map(|(_, packages)| packages.iter().copied())
        .collect();
    // Keep the order, drop repeats.
    let mut seen = std::collections::HashSet::new();
    missing.retain(|p| seen.insert(*p));
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "missing packages {missing:?}; run as root, or: apt-get install -y {}",
            missing.join(" ")
        );
    }
    println!("== setup: apt-get install {}", missing.join(" "));
    // Packages must not start services (redis-server would bind 6379).
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let added_policy = !policy.exists();
    if added_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let result = run(Command::new("apt-get").args(["update", "-q"])).and_then(|()| {
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    });
    if added_policy {
        let _ = std::fs::remove_file(policy);
    }
    result
}

fn installed(check: Check) -> bool {
    match check {
        Check::OnPath(command) => succeeds(&["sh", "-c", &format!("command -v {command}")]),
        Check::Succeeds(argv) => succeeds(argv),
    }
}

fn succeeds(argv: &[&str]) -> bool {
    let Some((program, args)) = argv.split_first() else {
        return false;
    };
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}
