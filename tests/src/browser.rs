//! Headless Chromium (Debian's), run inside a test namespace with no route
//! out, so the page it loads can reach only what the test built.

use std::process::Output;

use crate::{TempDir, process::Place, process::path_str};

/// A Chromium profile for one test; removed on drop.
pub struct Chromium {
    profile: TempDir,
}

impl Chromium {
    /// Panics when Chromium is missing (`cargo xtask setup` installs it).
    pub fn new() -> Self {
        assert!(
            crate::require::on_path("chromium"),
            "chromium is not installed (cargo xtask setup installs it)"
        );
        Self {
            profile: TempDir::new("rdr-chromium-"),
        }
    }

    /// Loads `url` from `place` with `extra` flags (`--dump-dom`,
    /// `--screenshot=...`). Virtual time (6 s) runs the page's timers
    /// several times.
    pub fn load(&self, place: &Place, url: &str, extra: &[&str]) -> Output {
        let mut cmd = place.command("timeout");
        cmd.args([
            "60",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .args([
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
        ])
        .args([
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", path_str(self.profile.path())))
        .arg("--virtual-time-budget=6000")
        .args(extra)
        .arg(url);
        cmd.output().expect("run chromium")
    }

    /// The page's DOM after its scripts ran.
    pub fn dom(&self, place: &Place, url: &str) -> String {
        String::from_utf8_lossy(&self.load(place, url, &["--dump-dom"]).stdout).into_owned()
    }
}

impl Default for Chromium {
    fn default() -> Self {
        Self::new()
    }
}

/// The number an element with `id` carries in its `data-value` attribute
/// (the dashboard page's figures); NaN when it is empty.
pub fn data_value(dom: &str, id: &str) -> f64 {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find("data-value=\"").expect("data-value") + "data-value=\"".len();
    let end = rest[start..].find('"').expect("closing quote");
    rest[start..start + end].parse().unwrap_or(f64::NAN)
}
