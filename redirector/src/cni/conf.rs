//! Chaining `redirector-cni` into the node's CNI config, and out again.
//!
//! The edits are textual: the plugin's entry is spliced into the
//! `plugins` array of the file the runtime uses, and spliced out on
//! uninstall, so every other byte stays as the node's network plugin wrote
//! it, and uninstall gives back exactly the file install found.

use std::{
    fmt,
    fs::{self, Permissions},
    io::{self, Write as _},
    ops::Range,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::{Map, Value, value::RawValue};

use super::{Error, PLUGIN_TYPE};

pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";

/// Our entry's key naming the single-plugin file it was converted from, so
/// uninstall can give that file back.
const CONVERTED_FROM: &str = "convertedFrom";

/// What the installed plugin is told (its entry in the conflist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginSettings {
    pub agent_socket: PathBuf,
    pub fail_closed: bool,
}

#[derive(Clone, Debug)]
pub struct InstallOptions {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The binary to copy into `bin_dir` as `redirector-cni`.
    pub plugin_bin: PathBuf,
    pub settings: PluginSettings,
    /// How long to wait for the node's network plugin to write its config.
    pub wait: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfChange {
    Added,
    Updated,
    Unchanged,
    /// A single-plugin `.conf`/`.json` became a `.conflist` with us last.
    Converted {
        from: PathBuf,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub binary: PathBuf,
    pub conf: PathBuf,
    pub change: ConfChange,
}

impl fmt::Display for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "installed {}; ", self.binary.display())?;
        let conf = self.conf.display();
        match &self.change {
            ConfChange::Added => write!(f, "chained last in {conf}"),
            ConfChange::Updated => write!(f, "updated its entry in {conf}"),
            ConfChange::Unchanged => write!(f, "{conf} already chains it"),
            ConfChange::Converted { from } => {
                write!(f, "converted {} to {conf}, chained last", from.display())
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Uninstalled {
    /// Conflists our entry was removed from.
    pub unchained: Vec<PathBuf>,
    /// Single-plugin files given back (conflist path, restored path).
    pub restored: Vec<(PathBuf, PathBuf)>,
    pub binary: Option<PathBuf>,
}

impl fmt::Display for Uninstalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::default() {
            return write!(f, "nothing to uninstall");
        }
        let mut parts = Vec::new();
        for path in &self.unchained {
            parts.push(format!("unchained from {}", path.display()));
        }
        for (list, conf) in &self.restored {
            parts.push(format!(
                "restored {} (from {})",
                conf.display(),
                list.display()
            ));
        }
        if let Some(binary) = &self.binary {
            parts.push(format!("removed {}", binary.display()));
        }
        write!(f, "{}", parts.join("; "))
    }
}

/// Copies the plugin into the bin dir, then chains it into the primary
/// config (binary first: the runtime may run the chain as soon as it sees
/// the config).
pub fn install(options: &InstallOptions) -> Result<Installed, Error> {
    let primary = wait_for_primary(&options.conf_dir, options.wait)?;
    let binary = options.bin_dir.join(PLUGIN_TYPE);
    let bytes = fs::read(&options.plugin_bin).map_err(|source| Error::ReadPlugin {
        path: options.plugin_bin.clone(),
        source,
    })?;
    fs::create_dir_all(&options.bin_dir)
        .and_then(|()| write_atomic(&binary, &bytes, 0o755))
        .map_err(|source| Error::InstallPlugin {
            path: binary.clone(),
            source,
        })?;

    let text = read_conf(&primary)?;
    let invalid = |what: String| Error::InvalidConf {
        path: primary.clone(),
        what,
    };
    if is_list(&primary) {
        let (change, edited) = match chain_into_list(&text, &options.settings).map_err(invalid)? {
            Chained::Unchanged => (ConfChange::Unchanged, None),
            Chained::Added(edited) => (ConfChange::Added, Some(edited)),
            Chained::Updated(edited) => (ConfChange::Updated, Some(edited)),
        };
        if let Some(edited) = edited {
            write_conf(&primary, &edited)?;
        }
        return Ok(Installed {
            binary,
            conf: primary,
            change,
        });
    }

    let file_name = file_name(&primary);
    let list = primary.with_extension("conflist");
    if list.exists() && !is_conversion_of(&list, &file_name) {
        return Err(Error::ConversionTargetExists {
            from: primary,
            path: list,
        });
    }
    let converted = convert_to_list(&text, &file_name, &options.settings).map_err(invalid)?;
    // The list first, then the single file goes: never a moment without
    // a config (while both exist the runtime picks the unchained file).
    write_conf(&list, &converted)?;
    fs::remove_file(&primary).map_err(|source| Error::RemoveConf {
        path: primary.clone(),
        source,
    })?;
    Ok(Installed {
        binary,
        conf: list,
        change: ConfChange::Converted { from: primary },
    })
}

/// Takes our entry out of every conflist in `conf_dir` (the primary may
/// have changed since install), gives back converted single-plugin files,
/// and removes the binary. Doing it twice is doing it once.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Uninstalled, Error> {
    let mut done = Uninstalled::default();
    let files = match conf_files(conf_dir) {
        Ok(files) => files,
        Err(Error::ReadConfDir { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    for path in files.into_iter().filter(|p| is_list(p)) {
        let text = read_conf(&path)?;
        if !text.contains(PLUGIN_TYPE) {
            continue;
        }
        // A file the runtime cannot parse is not ours to judge.
        let Ok(unchained) = unchain_from_list(&text) else {
            continue;
        };
        match unchained {
            Unchained::NotPresent => {}
            Unchained::List(edited) => {
                write_conf(&path, &edited)?;
                done.unchained.push(path);
            }
            Unchained::RestoreConf { file_name, text } => {
                let conf = conf_dir.join(&file_name);
                // Already back: the network plugin rewrote its file, and
                // our list is a stale copy of it.
                if !conf.exists() {
                    write_conf(&conf, &text)?;
                }
                fs::remove_file(&path).map_err(|source| Error::RemoveConf {
                    path: path.clone(),
                    source,
                })?;
                done.restored.push((path, conf));
            }
        }
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => done.binary = Some(binary),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::RemovePlugin {
                path: binary,
                source,
            });
        }
    }
    Ok(done)
}

/// The config file the runtime uses, as libcni-based runtimes pick it:
/// the lexically first `*.conf`, `*.conflist` or `*.json` that loads (a
/// list with plugins, or a single plugin with a `type`). `Err` carries why
/// each candidate was passed over.
pub fn primary_conf(conf_dir: &Path) -> Result<Result<PathBuf, String>, Error> {
    let mut skipped = String::new();
    for path in conf_files(conf_dir)? {
        let why = match fs::read_to_string(&path) {
            Err(e) => e.to_string(),
            Ok(text) => match usable(&path, &text) {
                Ok(()) => return Ok(Ok(path)),
                Err(why) => why,
            },
        };
        skipped.push_str(&format!("; skipped {}: {why}", path.display()));
    }
    Ok(Err(skipped))
}

fn usable(path: &Path, text: &str) -> Result<(), String> {
    let top = parse_object(text)?;
    if is_list(path) {
        match top.get("plugins") {
            Some(Value::Array(plugins)) if !plugins.is_empty() => Ok(()),
            Some(Value::Array(_)) => Err("`plugins` is empty".into()),
            _ => Err("no `plugins` array".into()),
        }
    } else {
        match top.get("type") {
            Some(Value::String(kind)) if !kind.is_empty() => Ok(()),
            _ => Err("no `type` (a list in a single-plugin file?)".into()),
        }
    }
}

fn wait_for_primary(conf_dir: &Path, wait: Duration) -> Result<PathBuf, Error> {
    let start = Instant::now();
    loop {
        let found = match primary_conf(conf_dir) {
            Ok(found) => found,
            // The dir may be created by the network plugin we wait for.
            Err(Error::ReadConfDir { source, .. })
                if source.kind() == io::ErrorKind::NotFound && start.elapsed() < wait =>
            {
                Err(String::new())
            }
            Err(e) => return Err(e),
        };
        match found {
            Ok(path) => return Ok(path),
            Err(skipped) if start.elapsed() >= wait => {
                return Err(Error::NoPrimaryConf {
                    dir: conf_dir.to_path_buf(),
                    waited: wait,
                    skipped,
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn conf_files(conf_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let read_dir_error = |source| Error::ReadConfDir {
        dir: conf_dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(conf_dir).map_err(read_dir_error)? {
        let path = entry.map_err(read_dir_error)?.path();
        let extension = path.extension().and_then(|e| e.to_str());
        if matches!(extension, Some("conf" | "conflist" | "json")) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn is_list(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "conflist")
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether `list` holds our entry recording it was made from `file_name`.
fn is_conversion_of(list: &Path, file_name: &str) -> bool {
    let Ok(text) = fs::read_to_string(list) else {
        return false;
    };
    let Ok(spans) = Spans::of(&text) else {
        return false;
    };
    spans.elements.iter().any(|range| {
        ours(&text[range.clone()]).is_some_and(|entry| {
            entry.get(CONVERTED_FROM).and_then(Value::as_str) == Some(file_name)
        })
    })
}

fn read_conf(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::ReadConf {
        path: path.to_path_buf(),
        source,
    })
}

fn write_conf(path: &Path, text: &str) -> Result<(), Error> {
    // Keep the mode the network plugin gave its file.
    let mode = fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777);
    write_atomic(path, text.as_bytes(), mode).map_err(|source| Error::WriteConf {
        path: path.to_path_buf(),
        source,
    })
}

/// Write a temporary file beside `path` (a name the runtime ignores: no
/// config extension), then rename it over `path`: readers see the old
/// file or the new one, never half of one.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = dir.join(format!(".{}.{}.tmp", file_name(path), std::process::id()));
    let result = (|| {
        let mut file = fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.set_permissions(Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        // The rename itself, durable.
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn parse_object(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(top)) => Ok(top),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

/// Where a conflist's plugins are in its text.
struct Spans {
    /// Each element of `plugins`, as byte ranges of the text.
    elements: Vec<Range<usize>>,
}

impl Spans {
    fn of(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct List<'a> {
            #[serde(borrow)]
            plugins: &'a RawValue,
        }
        // An object first: serde would also take an array for the struct.
        parse_object(text)?;
        let list: List = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let plugins: Vec<&RawValue> = serde_json::from_str(list.plugins.get())
            .map_err(|e| format!("`plugins` is not an array: {e}"))?;
        // Borrowed raw values are slices of `text`: their addresses give
        // their offsets.
        let base = text.as_ptr() as usize;
        let elements = plugins
            .iter()
            .map(|raw| {
                let start = raw.get().as_ptr() as usize - base;
                start..start + raw.get().len()
            })
            .collect();
        Ok(Self { elements })
    }
}

/// Our entry's keys, if `element` is our entry.
fn ours(element: &str) -> Option<Map<String, Value>> {
    match serde_json::from_str::<Value>(element) {
        Ok(Value::Object(entry))
            if entry.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE) =>
        {
            Some(entry)
        }
        _ => None,
    }
}

/// Our entry, after `existing` (keys an operator added, such as
/// `timeoutMs` or `logFile`, and `convertedFrom`, are kept).
fn entry(settings: &PluginSettings, existing: Option<&Map<String, Value>>) -> Vec<(String, Value)> {
    let mut keys = vec![
        ("type".to_string(), Value::from(PLUGIN_TYPE)),
        (
            "agentSocket".to_string(),
            Value::from(settings.agent_socket.to_string_lossy()),
        ),
        ("failClosed".to_string(), Value::from(settings.fail_closed)),
    ];
    for (key, value) in existing.into_iter().flatten() {
        if !keys.iter().any(|(k, _)| k == key) {
            keys.push((key.clone(), value.clone()));
        }
    }
    keys
}

/// A JSON object, one key a line, at `indent` (`unit` deeper inside);
/// values compact. `None`: all on one line.
fn render(keys: &[(String, Value)], layout: Option<(&str, &str)>) -> String {
    let pairs = keys.iter().map(|(k, v)| {
        format!(
            "{}: {}",
            Value::from(k.as_str()),
            serde_json::to_string(v).unwrap_or_default()
        )
    });
    match layout {
        None => format!("{{{}}}", pairs.collect::<Vec<_>>().join(", ")),
        Some((indent, unit)) => {
            let inner = format!(",\n{indent}{unit}");
            format!(
                "{{\n{indent}{unit}{}\n{indent}}}",
                pairs.collect::<Vec<_>>().join(&inner)
            )
        }
    }
}

/// The layout of the element at `range`: its line's indent and the indent
/// step inside it, or `None` when the array is on one line.
fn layout_at(text: &str, range: &Range<usize>) -> Option<(String, String)> {
    let before = &text[..range.start];
    let line_start = before.rfind('\n')? + 1;
    let indent = &before[line_start..];
    if !indent.chars().all(char::is_whitespace) {
        return None;
    }
    let element = &text[range.clone()];
    let unit = element
        .lines()
        .nth(1)
        .and_then(|line| line.strip_prefix(indent))
        .map(|rest| &rest[..rest.len() - rest.trim_start().len()])
        .filter(|unit| !unit.is_empty())
        .unwrap_or(if indent.contains('\t') { "\t" } else { "  " });
    Some((indent.to_string(), unit.to_string()))
}

#[derive(Debug, PartialEq, Eq)]
pub enum Chained {
    Unchanged,
    Added(String),
    Updated(String),
}

/// Chains our entry last into the conflist `text`, or brings an existing
/// entry up to `settings` where it stands.
pub fn chain_into_list(text: &str, settings: &PluginSettings) -> Result<Chained, String> {
    let spans = Spans::of(text)?;
    let Some(last) = spans.elements.last() else {
        return Err("`plugins` is empty".into());
    };
    if let Some((range, existing)) = spans
        .elements
        .iter()
        .find_map(|r| ours(&text[r.clone()]).map(|e| (r, e)))
    {
        let wanted = entry(settings, Some(&existing));
        let wanted_map: Map<String, Value> = wanted.iter().cloned().collect();
        if wanted_map == existing {
            return Ok(Chained::Unchanged);
        }
        let layout = layout_at(text, range);
        let rendered = render(
            &wanted,
            layout.as_ref().map(|(i, u)| (i.as_str(), u.as_str())),
        );
        let mut edited = text.to_string();
        edited.replace_range(range.clone(), &rendered);
        return Ok(Chained::Updated(edited));
    }
    // Same separator as before the last element: `,` plus its whitespace.
    let before = text[..last.start].trim_end_matches(char::is_whitespace);
    let separator = &text[before.len()..last.start];
    let layout = layout_at(text, last);
    let rendered = render(
        &entry(settings, None),
        layout.as_ref().map(|(i, u)| (i.as_str(), u.as_str())),
    );
    let mut edited = text.to_string();
    edited.insert_str(last.end, &format!(",{separator}{rendered}"));
    Ok(Chained::Added(edited))
}

/// A single-plugin config `text` (from `file_name`) as a conflist: the
/// plugin first, as it was (its own `cniVersion` and `name` included, which
/// the runtime overrides with the list's), then us. The list keeps the
/// network's name and version: host-local keeps its leases per network
/// name, so a new name would lose the pods' addresses.
pub fn convert_to_list(
    text: &str,
    file_name: &str,
    settings: &PluginSettings,
) -> Result<String, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Single<'a> {
        #[serde(borrow)]
        cni_version: Option<&'a RawValue>,
        #[serde(borrow)]
        name: Option<&'a RawValue>,
    }
    let top = parse_object(text)?;
    match top.get("type") {
        Some(Value::String(kind)) if kind == PLUGIN_TYPE => {
            // Converted, it would be our entry twice: chaining again would
            // rewrite the first as ours, unchaining would take both.
            return Err(format!(
                "its plugin is {PLUGIN_TYPE} itself, which only chains after a network plugin"
            ));
        }
        Some(Value::String(_)) => {}
        _ => return Err("no `type`".into()),
    }
    let single: Single = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let cni_version = single.cni_version.ok_or("no `cniVersion`")?.get();
    let name = single.name.ok_or("no `name`")?.get();
    let mut ours = entry(settings, None);
    ours.push((CONVERTED_FROM.to_string(), Value::from(file_name)));
    let plugin = text.trim().replace('\n', "\n    ");
    let ours = render(&ours, Some(("    ", "  ")));
    Ok(format!(
        "{{\n  \"cniVersion\": {cni_version},\n  \"name\": {name},\n  \"plugins\": [\n    {plugin},\n    {ours}\n  ]\n}}\n"
    ))
}

#[derive(Debug, PartialEq, Eq)]
pub enum Unchained {
    NotPresent,
    /// The conflist without our entries.
    List(String),
    /// The list was converted from this single-plugin file; this is its text.
    RestoreConf {
        file_name: String,
        text: String,
    },
}

/// Takes our entries out of the conflist `text`, leaving every other byte.
pub fn unchain_from_list(text: &str) -> Result<Unchained, String> {
    let mut edited = text.to_string();
    let mut converted_from = None;
    let mut removed = false;
    loop {
        let spans = Spans::of(&edited)?;
        let elements = &spans.elements;
        let Some((index, entry)) = elements
            .iter()
            .enumerate()
            .find_map(|(i, r)| ours(&edited[r.clone()]).map(|e| (i, e)))
        else {
            break;
        };
        if let Some(Value::String(from)) = entry.get(CONVERTED_FROM) {
            converted_from = Some(from.clone());
        }
        // With the separator before it (install put it there), or, first
        // in the list, the one after it.
        let cut = match index {
            0 => elements[0].start..elements.get(1).map_or(elements[0].end, |next| next.start),
            i => elements[i - 1].end..elements[i].end,
        };
        edited.replace_range(cut, "");
        removed = true;
    }
    if !removed {
        return Ok(Unchained::NotPresent);
    }
    if let Some(file_name) = converted_from.filter(|f| restorable(f)) {
        let spans = Spans::of(&edited)?;
        if let [only] = spans.elements.as_slice() {
            return Ok(Unchained::RestoreConf {
                file_name,
                text: format!("{}\n", edited[only.clone()].replace("\n    ", "\n")),
            });
        }
    }
    Ok(Unchained::List(edited))
}

/// A plain single-plugin file name in the conf dir, nothing else.
fn restorable(file_name: &str) -> bool {
    let path = Path::new(file_name);
    path.file_name().is_some_and(|n| n == file_name)
        && !file_name.starts_with('.')
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("conf" | "json")
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's config as flannel's DaemonSet writes it.
    const FLANNEL: &str = include_str!("testdata/10-flannel.conflist");

    const BRIDGE_CONF: &str = r#"{
    "cniVersion": "1.0.0",
    "name": "mynet",
    "type": "bridge",
    "bridge": "cni0",
    "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}
}
"#;

    fn settings(fail_closed: bool) -> PluginSettings {
        PluginSettings {
            agent_socket: "/var/run/redirector/cni.sock".into(),
            fail_closed,
        }
    }

    fn added(text: &str, settings: &PluginSettings) -> String {
        match chain_into_list(text, settings) {
            Ok(Chained::Added(edited)) => edited,
            other => panic!("expected Added, got {other:?}"),
        }
    }

    #[test]
    fn chains_last_in_the_list_style_and_is_idempotent() {
        let edited = added(FLANNEL, &settings(false));
        let expected = FLANNEL.replace(
            "        \"portMappings\": true\n      }\n    }\n",
            "        \"portMappings\": true\n      }\n    },\n    {\n      \"type\": \"redirector-cni\",\n      \"agentSocket\": \"/var/run/redirector/cni.sock\",\n      \"failClosed\": false\n    }\n",
        );
        assert_eq!(edited, expected);
        // Again: nothing to do.
        assert_eq!(
            chain_into_list(&edited, &settings(false)),
            Ok(Chained::Unchanged)
        );
        // Other settings: the entry changes where it is, nothing else does.
        let Ok(Chained::Updated(updated)) = chain_into_list(&edited, &settings(true)) else {
            panic!("expected Updated");
        };
        assert_eq!(
            updated,
            expected.replace("\"failClosed\": false", "\"failClosed\": true")
        );
        assert_eq!(
            chain_into_list(&updated, &settings(true)),
            Ok(Chained::Unchanged)
        );
        // Uninstall gives back the original bytes, from either.
        for text in [&edited, &updated] {
            assert_eq!(
                unchain_from_list(text),
                Ok(Unchained::List(FLANNEL.to_string()))
            );
        }
        assert_eq!(unchain_from_list(FLANNEL), Ok(Unchained::NotPresent));
    }

    #[test]
    fn one_line_and_tab_indented_lists() {
        let one_line =
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"ptp"}, {"type":"portmap"}]}"#;
        let edited = added(one_line, &settings(false));
        assert_eq!(
            edited,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"ptp"}, {"type":"portmap"}, {"type": "redirector-cni", "agentSocket": "/var/run/redirector/cni.sock", "failClosed": false}]}"#
        );
        assert_eq!(
            unchain_from_list(&edited),
            Ok(Unchained::List(one_line.into()))
        );

        let tabs = "{\n\t\"name\": \"n\",\n\t\"plugins\": [\n\t\t{\n\t\t\t\"type\": \"ptp\"\n\t\t}\n\t]\n}";
        let edited = added(tabs, &settings(false));
        assert!(
            edited.contains(
                "\t\t},\n\t\t{\n\t\t\t\"type\": \"redirector-cni\",\n\t\t\t\"agentSocket\""
            ),
            "{edited}"
        );
        assert_eq!(unchain_from_list(&edited), Ok(Unchained::List(tabs.into())));
    }

    #[test]
    fn operator_keys_survive_an_update_and_entries_anywhere_are_removed() {
        let list = r#"{"name":"n","plugins":[
  {"type":"redirector-cni","agentSocket":"/old.sock","failClosed":false,"timeoutMs":500},
  {"type":"calico"}
]}"#;
        let Ok(Chained::Updated(updated)) = chain_into_list(list, &settings(false)) else {
            panic!("expected Updated");
        };
        let entry = ours(&updated[Spans::of(&updated).expect("spans").elements[0].clone()])
            .expect("still ours, still first");
        assert_eq!(entry["agentSocket"], "/var/run/redirector/cni.sock");
        assert_eq!(entry["timeoutMs"], 500);
        // First in the list: cut with the separator after it.
        assert_eq!(
            unchain_from_list(list),
            Ok(Unchained::List(
                "{\"name\":\"n\",\"plugins\":[\n  {\"type\":\"calico\"}\n]}".into()
            ))
        );
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list_and_comes_back() {
        let list = convert_to_list(BRIDGE_CONF, "10-mynet.conf", &settings(false)).expect("list");
        let parsed: Value = serde_json::from_str(&list).expect("valid JSON");
        assert_eq!(parsed["name"], "mynet");
        assert_eq!(parsed["cniVersion"], "1.0.0");
        assert_eq!(parsed["plugins"][0]["type"], "bridge");
        assert_eq!(parsed["plugins"][0]["ipam"]["subnet"], "10.22.0.0/16");
        assert_eq!(parsed["plugins"][1]["type"], PLUGIN_TYPE);
        assert_eq!(parsed["plugins"][1][CONVERTED_FROM], "10-mynet.conf");
        assert_eq!(parsed["plugins"].as_array().map(Vec::len), Some(2));
        // Installing again over the list changes nothing.
        assert_eq!(
            chain_into_list(&list, &settings(false)),
            Ok(Chained::Unchanged)
        );
        assert_eq!(
            unchain_from_list(&list),
            Ok(Unchained::RestoreConf {
                file_name: "10-mynet.conf".into(),
                text: BRIDGE_CONF.into(),
            })
        );
        // Another plugin chained after us since: the list stays a list.
        let crowded = list.replace(
            "\n    }\n  ]",
            "\n    },\n    {\"type\": \"istio-cni\"}\n  ]",
        );
        assert_ne!(crowded, list);
        let Ok(Unchained::List(rest)) = unchain_from_list(&crowded) else {
            panic!("expected a list");
        };
        let rest: Value = serde_json::from_str(&rest).expect("valid JSON");
        assert_eq!(rest["plugins"][1]["type"], "istio-cni");
        assert_eq!(rest["plugins"].as_array().map(Vec::len), Some(2));

        assert!(convert_to_list("{\"type\":\"bridge\"}", "x.conf", &settings(false)).is_err());
        assert!(convert_to_list("{\"plugins\":[]}", "x.conf", &settings(false)).is_err());
    }

    #[test]
    fn a_single_plugin_file_that_is_already_ours_is_refused_not_chained_in_twice() {
        let ours_alone = r#"{
  "cniVersion": "1.0.0",
  "name": "mynet",
  "type": "redirector-cni",
  "agentSocket": "/var/run/elsewhere.sock"
}
"#;
        let error = convert_to_list(ours_alone, "10-mynet.conf", &settings(false))
            .expect_err("our plugin alone is no network to chain into");
        assert!(error.contains("redirector-cni itself"), "{error}");
        // The same key elsewhere (a nested plugin) is not the file's type.
        let nested =
            BRIDGE_CONF.replace("\"type\": \"host-local\"", "\"type\": \"redirector-cni\"");
        let list = convert_to_list(&nested, "10-mynet.conf", &settings(false)).expect("list");
        assert_eq!(
            chain_into_list(&list, &settings(false)),
            Ok(Chained::Unchanged)
        );
    }

    #[test]
    fn restores_only_plain_file_names() {
        assert!(restorable("10-mynet.conf"));
        assert!(restorable("10-mynet.json"));
        assert!(!restorable("../etc/passwd.conf"));
        assert!(!restorable("/etc/x.conf"));
        assert!(!restorable(".hidden.conf"));
        assert!(!restorable("10-mynet.conflist"));
    }

    #[test]
    fn bad_lists_are_refused() {
        for bad in [
            "[]",
            "{\"plugins\": {}}",
            "{\"plugins\": []}",
            "{\"name\": \"n\"}",
            "{",
        ] {
            assert!(chain_into_list(bad, &settings(false)).is_err(), "{bad}");
        }
    }

    /// A scratch conf dir and bin dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("rdr-cni-conf-{}-{n}", std::process::id()));
            fs::create_dir_all(dir.join("net.d")).expect("mkdir");
            fs::create_dir_all(dir.join("bin")).expect("mkdir");
            fs::write(dir.join("plugin"), b"\x7fELF not really").expect("plugin");
            Self(dir)
        }

        fn options(&self) -> InstallOptions {
            InstallOptions {
                conf_dir: self.0.join("net.d"),
                bin_dir: self.0.join("bin"),
                plugin_bin: self.0.join("plugin"),
                settings: settings(false),
                wait: Duration::ZERO,
            }
        }

        fn conf(&self, name: &str) -> PathBuf {
            self.0.join("net.d").join(name)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn install_picks_the_lexically_first_usable_file() {
        let scratch = Scratch::new();
        fs::write(scratch.conf("05-broken.conflist"), "{\"name\":").expect("write");
        fs::write(scratch.conf("07-list-in-a-conf.conf"), FLANNEL).expect("write");
        fs::write(scratch.conf("10-flannel.conflist"), FLANNEL).expect("write");
        fs::write(scratch.conf("20-other.conflist"), FLANNEL).expect("write");
        fs::write(scratch.conf("00-notes.txt"), "not a config").expect("write");
        let installed = install(&scratch.options()).expect("install");
        assert_eq!(installed.conf, scratch.conf("10-flannel.conflist"));
        assert_eq!(installed.change, ConfChange::Added);
        assert_eq!(
            fs::read(scratch.0.join("bin/redirector-cni")).expect("binary"),
            b"\x7fELF not really"
        );
        assert_eq!(
            fs::read_to_string(scratch.conf("20-other.conflist")).expect("read"),
            FLANNEL
        );
        let again = install(&scratch.options()).expect("install again");
        assert_eq!(again.change, ConfChange::Unchanged);

        let removed =
            uninstall(&scratch.0.join("net.d"), &scratch.0.join("bin")).expect("uninstall");
        assert_eq!(removed.unchained, vec![scratch.conf("10-flannel.conflist")]);
        assert_eq!(
            fs::read_to_string(scratch.conf("10-flannel.conflist")).expect("read"),
            FLANNEL
        );
        assert!(!scratch.0.join("bin/redirector-cni").exists());
        let twice = uninstall(&scratch.0.join("net.d"), &scratch.0.join("bin")).expect("again");
        assert_eq!(twice, Uninstalled::default());
        assert_eq!(twice.to_string(), "nothing to uninstall");
    }

    #[test]
    fn install_converts_a_conf_and_uninstall_restores_it() {
        let scratch = Scratch::new();
        fs::write(scratch.conf("10-mynet.conf"), BRIDGE_CONF).expect("write");
        let installed = install(&scratch.options()).expect("install");
        assert_eq!(installed.conf, scratch.conf("10-mynet.conflist"));
        assert_eq!(
            installed.change,
            ConfChange::Converted {
                from: scratch.conf("10-mynet.conf")
            }
        );
        assert!(!scratch.conf("10-mynet.conf").exists());
        assert_eq!(
            install(&scratch.options()).expect("again").change,
            ConfChange::Unchanged
        );

        // The network plugin rewrites its .conf (it wins, lexically): a
        // new install converts it again over our own list.
        fs::write(scratch.conf("10-mynet.conf"), BRIDGE_CONF).expect("write");
        assert!(matches!(
            install(&scratch.options()).expect("reconvert").change,
            ConfChange::Converted { .. }
        ));

        let removed =
            uninstall(&scratch.0.join("net.d"), &scratch.0.join("bin")).expect("uninstall");
        assert_eq!(removed.restored.len(), 1);
        assert_eq!(
            fs::read_to_string(scratch.conf("10-mynet.conf")).expect("restored"),
            BRIDGE_CONF
        );
        assert!(!scratch.conf("10-mynet.conflist").exists());
    }

    #[test]
    fn a_foreign_list_beside_the_conf_is_not_overwritten() {
        let scratch = Scratch::new();
        fs::write(scratch.conf("10-mynet.conf"), BRIDGE_CONF).expect("write");
        fs::write(scratch.conf("10-mynet.conflist"), FLANNEL).expect("write");
        let error = install(&scratch.options()).expect_err("must refuse");
        assert!(
            matches!(error, Error::ConversionTargetExists { .. }),
            "{error}"
        );
        assert_eq!(
            fs::read_to_string(scratch.conf("10-mynet.conflist")).expect("read"),
            FLANNEL
        );
    }

    #[test]
    fn no_config_is_a_clear_error() {
        let scratch = Scratch::new();
        fs::write(scratch.conf("05-broken.conflist"), "{").expect("write");
        let error = install(&scratch.options()).expect_err("no primary");
        let text = error.to_string();
        assert!(matches!(error, Error::NoPrimaryConf { .. }), "{text}");
        assert!(
            text.contains("05-broken.conflist: not valid JSON"),
            "{text}"
        );
        // Nothing was installed.
        assert!(!scratch.0.join("bin/redirector-cni").exists());
    }

    #[test]
    fn install_waits_for_the_network_plugin() {
        let scratch = Scratch::new();
        let options = InstallOptions {
            wait: Duration::from_secs(10),
            ..scratch.options()
        };
        let late = scratch.conf("10-flannel.conflist");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            fs::write(late, FLANNEL).expect("write");
        });
        let installed = install(&options).expect("install");
        writer.join().expect("writer");
        assert_eq!(installed.change, ConfChange::Added);
    }
}
