//! `cargo xtask soak --minutes N`: the chaos soak of `tests/tests/soak.rs`
//! (a 2-minute run of which is part of `cargo xtask test`), run for as
//! long as asked. One implementation for both, so the long run checks
//! exactly what the test checks; the report lands in `target/soak/`.

use std::path::Path;

use anyhow::{Result, bail};

/// Runs the soak test against the daemon at `bin` for `minutes` of load.
pub fn run(bin: &Path, minutes: f64) -> Result<()> {
    if !(minutes.is_finite() && minutes > 0.0) {
        bail!("--minutes must be a positive number, not {minutes}");
    }
    println!(
        "== chaos soak: {minutes} minutes of load ({})",
        bin.display()
    );
    crate::run(
        crate::cargo()
            .args(["test", "--package", "redirector-tests", "--test", "soak"])
            .args(["--", "--nocapture"])
            .env("SOAK_MINUTES", minutes.to_string())
            .env("REDIRECTOR_BIN", bin)
            // A soak that cannot run fails instead of skipping.
            .env(testbed::require::REQUIRED_ENV, "1"),
    )?;
    println!(
        "== soak passed; report in {}",
        crate::root().join("target").join("soak").display()
    );
    Ok(())
}
