//! Kernel tests need root, bpffs/cgroup v2 support and a few tools. Outside
//! CI they skip loudly when these are missing; with `CI` set they fail,
//! because a skipped kernel test in CI proves nothing.

use std::process::Command;

/// What the kernel tests need that is missing, if anything.
pub fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("must run as root (netns, cgroup v2, BPF)".into());
    }
    for tool in ["ip", "bpftool", "redis-server", "redis-cli"] {
        if !on_path(tool) {
            return Some(format!(
                "`{tool}` is not installed (run `cargo xtask setup`)"
            ));
        }
    }
    None
}

/// Whether a command named `tool` is on PATH.
pub fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether to run: `true` to run, `false` to skip. Panics in CI.
pub fn decide(missing: Option<String>, in_ci: bool) -> bool {
    match missing {
        None => true,
        Some(why) if in_ci => panic!("kernel test cannot run in CI: {why}"),
        Some(why) => {
            eprintln!("SKIPPED (not in CI): {why}");
            false
        }
    }
}

/// Set by `cargo xtask test`: the README's test command never skips a
/// kernel test, whether or not the CI system sets `CI`.
pub const REQUIRED_ENV: &str = "REDIRECTOR_KERNEL_TESTS_REQUIRED";

/// Whether a kernel test that cannot run must fail rather than skip.
pub fn required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os(REQUIRED_ENV).is_some()
}

/// Returns from the test when the kernel test cannot run here (never in CI,
/// never under `cargo xtask test`).
#[macro_export]
macro_rules! require_kernel {
    () => {
        if !$crate::require::decide($crate::require::missing(), $crate::require::required()) {
            return;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::decide;

    #[test]
    #[should_panic(expected = "kernel test cannot run in CI: no root")]
    fn ci_fails_instead_of_skipping() {
        decide(Some("no root".into()), true);
    }

    #[test]
    fn outside_ci_a_missing_requirement_skips() {
        assert!(!decide(Some("no root".into()), false));
        assert!(decide(None, true));
    }
}
