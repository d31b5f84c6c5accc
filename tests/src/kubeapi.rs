//! An in-process Kubernetes API endpoint for the node agent's tests: the
//! list/watch protocol of the core/v1 resources the agent reads
//! (Namespaces, Pods, Services, ConfigMaps), with the parts that make
//! watching hard: resourceVersions, field selectors, bookmarks, and
//! history expiry that answers an old resourceVersion with 410 Gone.
//!
//! No Kubernetes control plane can run on the test machines (no container
//! engine, no apiserver package), so this speaks the wire protocol the real
//! apiserver speaks, as kube-rs sees it: JSON lists with
//! `metadata.resourceVersion`, chunked watch streams of `{"type","object"}`
//! lines, `Status` objects for errors. Tests drive it like `kubectl`:
//! [`ApiServer::apply`], [`ApiServer::delete`], and [`ApiServer::expire`]
//! (etcd compaction: every watch ends with 410 and must relist).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// How often a watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    ConfigMap,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Self::Namespace => "namespaces",
            Self::Pod => "pods",
            Self::Service => "services",
            Self::ConfigMap => "configmaps",
        }
    }

    fn from_plural(plural: &str) -> Option<Self> {
        [Self::Namespace, Self::Pod, Self::Service, Self::ConfigMap]
            .into_iter()
            .find(|k| k.plural() == plural)
    }

    fn from_object(object: &Value) -> Self {
        match object["kind"].as_str() {
            Some("Namespace") => Self::Namespace,
            Some("Pod") => Self::Pod,
            Some("Service") => Self::Service,
            Some("ConfigMap") => Self::ConfigMap,
            other => panic!("the fake API server does not serve kind {other:?}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Pod => "Pod",
            Self::Service => "Service",
            Self::ConfigMap => "ConfigMap",
        }
    }
}

type Key = (Kind, String, String);

struct Event {
    rv: u64,
    kind: Kind,
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    events: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_watchable: u64,
    /// Bumped by `expire`: open watches end.
    epoch: u64,
    next_uid: u64,
}

struct Shared {
    store: Mutex<Store>,
    changed: Condvar,
    requests: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The endpoint; stops (and ends every watch) on drop.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves on `listener` (bound where the agent can reach it, e.g. in
    /// the node's network namespace).
    pub fn serve(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("listener address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 100,
                oldest_watchable: 0,
                ..Store::default()
            }),
            changed: Condvar::new(),
            requests: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            while !accept_shared.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let shared = Arc::clone(&accept_shared);
                        std::thread::spawn(move || {
                            let _ = answer(stream, &shared);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            shared,
            addr,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object (as `kubectl apply` would), giving it
    /// a UID (unless it has one) and a new resourceVersion.
    pub fn apply(&self, mut object: Value) -> Value {
        let kind = Kind::from_object(&object);
        let mut store = self.shared.store();
        store.rv += 1;
        let rv = store.rv;
        let meta = &object["metadata"];
        let key = (
            kind,
            meta["namespace"].as_str().unwrap_or_default().to_string(),
            meta["name"].as_str().expect("metadata.name").to_string(),
        );
        let existing_uid = store
            .objects
            .get(&key)
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string));
        if object["metadata"]["uid"].is_null() {
            let uid = existing_uid.clone().unwrap_or_else(|| {
                store.next_uid += 1;
                format!("00000000-0000-4000-8000-{:012x}", store.next_uid)
            });
            object["metadata"]["uid"] = json!(uid);
        }
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["apiVersion"] = json!("v1");
        let kind_of_event = if store.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store.objects.insert(key, object.clone());
        store.events.push(Event {
            rv,
            kind,
            kind_of_event,
            object: object.clone(),
        });
        drop(store);
        self.shared.changed.notify_all();
        object
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut store = self.shared.store();
        let Some(mut object) =
            store
                .objects
                .remove(&(kind, namespace.to_string(), name.to_string()))
        else {
            return false;
        };
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        store.events.push(Event {
            rv,
            kind,
            kind_of_event: "DELETED",
            object,
        });
        drop(store);
        self.shared.changed.notify_all();
        true
    }

    /// Compacts history, as etcd does: every open watch ends with 410 Gone
    /// and resuming from any resourceVersion seen so far is refused, so
    /// clients must relist. Changes made right after are only in lists.
    pub fn expire(&self) {
        let mut store = self.shared.store();
        store.rv += 1;
        store.oldest_watchable = store.rv;
        store.epoch += 1;
        store.events.clear();
        drop(store);
        self.shared.changed.notify_all();
    }

    /// Request lines served so far (`GET /api/v1/pods?...`).
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many lists (not watches) of `plural` were served.
    pub fn lists_of(&self, plural: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| {
                let path = r.split_whitespace().nth(1).unwrap_or_default();
                let (path, query) = path.split_once('?').unwrap_or((path, ""));
                path.ends_with(&format!("/{plural}")) && !is_watch(&parse_query(query))
            })
            .count()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_watch(query: &BTreeMap<String, String>) -> bool {
    matches!(query.get("watch").map(String::as_str), Some("true" | "1"))
}

/// What a request path names.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

fn route(path: &str) -> Option<Target> {
    let rest = path.strip_prefix("/api/v1/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts[..] {
        [plural] => Some(Target {
            kind: Kind::from_plural(plural)?,
            namespace: None,
            name: None,
        }),
        ["namespaces", name] => Some(Target {
            kind: Kind::Namespace,
            namespace: None,
            name: Some(name.to_string()),
        }),
        ["namespaces", ns, plural] => Some(Target {
            kind: Kind::from_plural(plural)?,
            namespace: Some(ns.to_string()),
            name: None,
        }),
        ["namespaces", ns, plural, name] => Some(Target {
            kind: Kind::from_plural(plural)?,
            namespace: Some(ns.to_string()),
            name: Some(name.to_string()),
        }),
        _ => None,
    }
}

/// A field selector as the agent uses them: `a=b,c=d`.
fn field_matches(selector: &str, object: &Value) -> Result<bool, String> {
    for requirement in selector.split(',').filter(|r| !r.is_empty()) {
        let (field, wanted) = requirement
            .split_once('=')
            .ok_or_else(|| format!("unsupported field selector `{requirement}`"))?;
        let wanted = wanted.strip_prefix('=').unwrap_or(wanted);
        let actual = match field {
            "spec.nodeName" => &object["spec"]["nodeName"],
            "metadata.name" => &object["metadata"]["name"],
            "metadata.namespace" => &object["metadata"]["namespace"],
            other => return Err(format!("field selector on `{other}` is not supported")),
        };
        if actual.as_str().unwrap_or_default() != wanted {
            return Ok(false);
        }
    }
    Ok(true)
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn chunk(stream: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let mut text = line.to_string();
    text.push('\n');
    write!(stream, "{:x}\r\n{text}\r\n", text.len())?;
    stream.flush()
}

fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let request_line = request_line.trim_end().to_string();
    shared
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(request_line.clone());
    let mut words = request_line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = parse_query(query);
    let Some(target) = route(path).filter(|_| method == "GET") else {
        return respond(
            &mut stream,
            404,
            &status(
                404,
                "NotFound",
                &format!("{method} {path} is not served here"),
            ),
        );
    };
    let selector = query.get("fieldSelector").cloned().unwrap_or_default();
    let selected = |kind: Kind, object: &Value| -> Result<bool, String> {
        if kind != target.kind {
            return Ok(false);
        }
        if let Some(ns) = &target.namespace
            && object["metadata"]["namespace"].as_str() != Some(ns)
        {
            return Ok(false);
        }
        field_matches(&selector, object)
    };

    if let Some(name) = &target.name {
        let key = (
            target.kind,
            target.namespace.clone().unwrap_or_default(),
            name.clone(),
        );
        let found = shared.store().objects.get(&key).cloned();
        return match found {
            Some(object) => respond(&mut stream, 200, &object),
            None => respond(
                &mut stream,
                404,
                &status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", target.kind.plural()),
                ),
            ),
        };
    }

    if !is_watch(&query) {
        let store = shared.store();
        let mut items = Vec::new();
        for ((kind, _, _), object) in &store.objects {
            match selected(*kind, object) {
                Ok(true) => items.push(object.clone()),
                Ok(false) => {}
                Err(e) => {
                    drop(store);
                    return respond(&mut stream, 400, &status(400, "BadRequest", &e));
                }
            }
        }
        let list = json!({
            "kind": format!("{}List", target.kind.name()), "apiVersion": "v1",
            "metadata": {"resourceVersion": store.rv.to_string()},
            "items": items,
        });
        drop(store);
        return respond(&mut stream, 200, &list);
    }

    // A watch: events after `resourceVersion`, then live ones, chunked.
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let deadline = Instant::now()
        + query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(Duration::from_secs(300), Duration::from_secs);
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let gone =
        || json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
    let mut store = shared.store();
    if from != 0 && from < store.oldest_watchable {
        drop(store);
        chunk(&mut stream, &gone())?;
        return write!(stream, "0\r\n\r\n");
    }
    let epoch = store.epoch;
    let mut sent = from;
    if from == 0 {
        // "Any version": the current state as ADDED events.
        let current: Vec<Value> = store
            .objects
            .iter()
            .filter(|((kind, _, _), o)| selected(*kind, o).unwrap_or(false))
            .map(|(_, o)| json!({"type": "ADDED", "object": o}))
            .collect();
        sent = store.rv;
        drop(store);
        for event in &current {
            chunk(&mut stream, event)?;
        }
        store = shared.store();
    }
    let mut last_bookmark = Instant::now();
    loop {
        if shared.stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        if store.epoch != epoch {
            drop(store);
            chunk(&mut stream, &gone())?;
            return write!(stream, "0\r\n\r\n");
        }
        let due: Vec<Value> = store
            .events
            .iter()
            .filter(|e| e.rv > sent && selected(e.kind, &e.object).unwrap_or(false))
            .map(|e| json!({"type": e.kind_of_event, "object": e.object}))
            .collect();
        sent = sent.max(store.rv);
        let bookmark = (bookmarks && last_bookmark.elapsed() >= BOOKMARK_EVERY).then(|| {
            json!({"type": "BOOKMARK", "object": {
                "kind": target.kind.name(), "apiVersion": "v1",
                "metadata": {"resourceVersion": store.rv.to_string()},
            }})
        });
        drop(store);
        for event in &due {
            chunk(&mut stream, event)?;
        }
        if let Some(bookmark) = bookmark {
            chunk(&mut stream, &bookmark)?;
            last_bookmark = Instant::now();
        }
        store = shared.store();
        store = shared
            .changed
            .wait_timeout(store, Duration::from_millis(250))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    drop(store);
    write!(stream, "0\r\n\r\n")
}
