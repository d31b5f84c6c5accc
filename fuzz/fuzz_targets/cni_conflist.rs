//! The CNI conflist splice: whatever config file a node's network plugin
//! wrote, chaining redirector-cni in gives valid JSON with our entry last,
//! chaining again changes nothing, and unchaining gives back the file
//! byte for byte; never a panic.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use redirector::cni::conf::{self, Chained, PluginSettings, Unchained};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let settings = PluginSettings {
        agent_socket: PathBuf::from("/var/run/redirector/cni.sock"),
        fail_closed: false,
    };
    match conf::chain_into_list(text, &settings) {
        Ok(Chained::Added(edited)) => {
            check_chained(&edited, &settings);
            assert_eq!(
                conf::unchain_from_list(&edited),
                Ok(Unchained::List(text.to_string())),
                "uninstall does not give back what install found"
            );
        }
        Ok(Chained::Updated(edited)) => check_chained(&edited, &settings),
        Ok(Chained::Unchanged) | Err(_) => {}
    }
    let _ = conf::unchain_from_list(text);
    if let Ok(list) = conf::convert_to_list(text, "10-bridge.conf", &settings) {
        check_chained(&list, &settings);
        match conf::unchain_from_list(&list) {
            Ok(Unchained::RestoreConf { file_name, .. }) => {
                assert_eq!(file_name, "10-bridge.conf");
            }
            other => panic!("a converted list does not restore: {other:?}"),
        }
    }
});

/// Valid JSON whose `plugins` holds our entry, and which needs no further
/// change.
fn check_chained(edited: &str, settings: &PluginSettings) {
    let parsed: Value = serde_json::from_str(edited)
        .unwrap_or_else(|e| panic!("chaining made invalid JSON ({e}):\n{edited}"));
    let plugins = parsed["plugins"].as_array().expect("`plugins` is an array");
    assert!(
        plugins
            .iter()
            .any(|p| p["type"] == redirector::cni::PLUGIN_TYPE),
        "our entry is missing:\n{edited}"
    );
    assert_eq!(
        conf::chain_into_list(edited, settings),
        Ok(Chained::Unchanged),
        "chaining twice changed the file"
    );
}
