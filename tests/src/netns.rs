//! Network namespaces made with `ip netns`, deleted on drop.

use std::path::PathBuf;

use crate::process::{Place, run_ok};

pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> Self {
        run_ok("ip", &["netns", "add", name]);
        let netns = Self { name: name.into() };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    pub fn place(&self) -> Place {
        Place {
            netns: Some(self.path()),
            cgroup: None,
        }
    }

    /// `ip -n <netns> <args>`, asserting success.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }

    /// Sets a sysctl inside this namespace only.
    pub fn sysctl(&self, key: &str, value: &str) {
        let out = self
            .place()
            .output("sysctl", &["-q", "-w", &format!("{key}={value}")]);
        assert!(
            out.status.success(),
            "sysctl {key}={value} in {}: {out:?}",
            self.name
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
