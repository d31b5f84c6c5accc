//! The backend declarations: a `--backends-file` (TOML) and `--backend
//! NAME=KIND:ADDR,...` arguments give backends or an error naming the
//! file's line or the argument; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redirector::backend::{self, BackendSpec, NamedTarget};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match backend::parse_file("backends.toml", text) {
        Ok(declared) => {
            let _ = backend::validate_declared(&declared, true);
            let _ = backend::validate_declared(&declared, false);
        }
        Err(backend::Error::File { line, .. }) => {
            let lines = text.matches('\n').count() + 1;
            assert!(line >= 1 && line <= lines, "line {line} of {lines}");
        }
        Err(_) => {}
    }
    // Each line as a command-line argument, too.
    let specs: Vec<BackendSpec> = text.lines().filter_map(|l| l.parse().ok()).collect();
    let _ = backend::validate(&specs);
    for line in text.lines() {
        let _ = line.parse::<NamedTarget>();
    }
});
