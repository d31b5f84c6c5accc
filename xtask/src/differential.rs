//! Differential fuzzing (`tests/tests/differential.rs`) for longer than the
//! seeded run in `cargo xtask test`: random command sequences through the
//! proxy and against one standalone Redis, every reply compared.

use std::path::Path;

use anyhow::Result;

/// Runs the differential test for `seconds` against the daemon `bin`,
/// from `seed` upwards (from a seed taken from the clock, printed, when
/// `None`). A mismatch fails with the seed, the step, the command, both
/// replies and the shrunk sequence.
pub fn run(bin: &Path, seconds: u64, seed: Option<u64>) -> Result<()> {
    println!("== differential fuzzing, {seconds} s");
    let mut cmd = crate::cargo();
    cmd.args([
        "test",
        "--package",
        "redirector-tests",
        "--test",
        "differential",
        "--",
        "--nocapture",
    ])
    .env("REDIRECTOR_BIN", bin)
    .env(testbed::require::REQUIRED_ENV, "1")
    .env("DIFFERENTIAL_SECONDS", seconds.to_string());
    if let Some(seed) = seed {
        cmd.env("DIFFERENTIAL_SEED", seed.to_string());
    }
    crate::run(&mut cmd)
}
