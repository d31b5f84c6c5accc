//! The agent's side of the CNI socket: one task per plugin connection, one
//! request line in, one reply line out.

use std::{
    fs::Permissions,
    future::Future,
    io,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::Path,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use super::{
    MAX_LINE,
    wire::{Reply, Request},
};

/// What the agent does with a plugin's request.
pub type Handler =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// How long a plugin has to send its request once connected.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the agent socket at `path`: creates its directory, replaces a
/// stale socket left by a previous agent, and allows root only (0600).
/// A socket another agent still answers on is an upgrade under way: the
/// new socket is renamed over it, so a plugin always finds one that
/// answers (the old agent serves what it already accepted). Never removes
/// anything that is not a socket.
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    // Blocking std::fs: a few metadata calls on a local run dir.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            let probe = tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path));
            if let Ok(Ok(_live)) = probe.await {
                return take_over(path);
            }
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Binds beside `path`, then renames over the live socket there.
fn take_over(path: &Path) -> io::Result<UnixListener> {
    let mut beside = path.as_os_str().to_owned();
    beside.push(format!(".{}", std::process::id()));
    let beside = std::path::PathBuf::from(beside);
    match std::fs::remove_file(&beside) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&beside)?;
    std::fs::set_permissions(&beside, Permissions::from_mode(0o600))?;
    std::fs::rename(&beside, path)?;
    tracing::info!(path = %path.display(), "took the CNI socket over from the agent serving it (upgrade)");
    Ok(listener)
}

/// Answers plugin connections until the task is dropped.
pub async fn serve(listener: UnixListener, handler: Handler) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, handler).await {
                        debug!(error = %e, "CNI plugin connection failed");
                    }
                });
            }
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                warn!(error = %e, "cannot accept on the CNI socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(stream: UnixStream, handler: Handler) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_LINE as u64 + 1);
    let mut line = Vec::new();
    let reply = match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await
    {
        Err(_) => Reply::Failed {
            error: format!("no request within {READ_TIMEOUT:?}"),
        },
        Ok(Err(e)) => return Err(e),
        // A probe (another agent's `bind`, a health check): nothing to answer.
        Ok(Ok(0)) => return Ok(()),
        Ok(Ok(_)) if line.len() > MAX_LINE => Reply::Failed {
            error: format!("request longer than {MAX_LINE} bytes"),
        },
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Ok(request) => {
                debug!(?request, "CNI request");
                handler(request).await
            }
            Err(e) => {
                warn!(error = %e, "malformed CNI request");
                Reply::Failed {
                    error: format!("malformed request: {e}"),
                }
            }
        },
    };
    let mut out = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        os::unix::fs::PermissionsExt as _,
        path::PathBuf,
        sync::Mutex,
    };

    use super::*;
    use crate::cni::{Error, ask, wire::Command};

    /// A scratch dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Self(std::env::temp_dir().join(format!("rdr-cni-sock-{}-{n}", std::process::id())))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    }

    fn request(command: Command) -> Request {
        Request {
            command,
            container_id: "c0ffee".into(),
            netns: Some("/var/run/netns/cni-1".into()),
            pod_namespace: "shop".into(),
            pod_name: "web-0".into(),
            pod_uid: Some("1b2c".into()),
        }
    }

    /// Sends raw bytes, returns the raw reply.
    fn raw(socket: &Path, bytes: &[u8]) -> String {
        let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
        stream.write_all(bytes).expect("send");
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("reply");
        reply
    }

    #[test]
    fn serves_requests_and_refuses_garbage() {
        let scratch = Scratch::new();
        let socket = scratch.0.join("run/cni.sock");
        let rt = runtime();
        let listener = rt.block_on(bind(&socket)).expect("bind");
        let mode = std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = {
            let seen = seen.clone();
            Arc::new(move |request: Request| {
                seen.lock().expect("lock").push(request.clone());
                Box::pin(async move {
                    match request.command {
                        Command::Add => Reply::Enrolled { netns_cookie: 42 },
                        Command::Del => Reply::Unenrolled { was_enrolled: true },
                    }
                })
            })
        };
        rt.spawn(serve(listener, handler));

        let timeout = Duration::from_secs(5);
        assert_eq!(
            ask(&socket, &request(Command::Add), timeout).expect("ADD"),
            Reply::Enrolled { netns_cookie: 42 }
        );
        assert_eq!(
            ask(&socket, &request(Command::Del), timeout).expect("DEL"),
            Reply::Unenrolled { was_enrolled: true }
        );
        assert_eq!(
            *seen.lock().expect("lock"),
            vec![request(Command::Add), request(Command::Del)]
        );

        let failed = |reply: &str| match serde_json::from_str::<Reply>(reply.trim_end()) {
            Ok(Reply::Failed { error }) => error,
            other => panic!("expected Failed, got {other:?} from {reply:?}"),
        };
        assert!(failed(&raw(&socket, b"{\"command\":\"ADD\"}\n")).contains("malformed request"));
        assert!(failed(&raw(&socket, b"not json\n")).contains("malformed request"));
        let huge = vec![b' '; MAX_LINE + 10];
        assert!(failed(&raw(&socket, &huge)).contains("longer than"));
        // Nothing sent: nothing answered, and the server goes on.
        assert_eq!(raw(&socket, b""), "");
        assert_eq!(seen.lock().expect("lock").len(), 2);

        // An upgrade's new agent takes the socket over while this one
        // serves: new plugin connections reach the new agent.
        let successor = rt.block_on(bind(&socket)).expect("take over a live socket");
        let mode = std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "root only, as before");
        let accepted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async { successor.accept().await.map(drop) })
        });
        std::os::unix::net::UnixStream::connect(&socket).expect("connect to the successor");
        accepted
            .join()
            .expect("join")
            .expect("the successor accepted the plugin");
        rt.shutdown_timeout(Duration::from_secs(1));
    }

    #[test]
    fn bind_replaces_a_stale_socket_but_never_a_file() {
        let scratch = Scratch::new();
        std::fs::create_dir_all(&scratch.0).expect("mkdir");
        let socket = scratch.0.join("cni.sock");
        // A socket nobody listens on any more, as a crashed agent leaves it.
        drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale"));
        let rt = runtime();
        rt.block_on(bind(&socket))
            .expect("replaces the stale socket");

        let file = scratch.0.join("not-a-socket");
        std::fs::write(&file, "keep me").expect("write");
        let error = rt.block_on(bind(&file)).expect_err("a file");
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&file).expect("kept"), "keep me");
    }

    #[test]
    fn ask_gives_up_at_its_deadline() {
        let scratch = Scratch::new();
        std::fs::create_dir_all(&scratch.0).expect("mkdir");
        let socket = scratch.0.join("cni.sock");
        // Listening (the kernel completes connects) but never answering.
        let _hung = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let started = std::time::Instant::now();
        let error =
            ask(&socket, &request(Command::Add), Duration::from_millis(300)).expect_err("no reply");
        assert!(matches!(error, Error::AgentTimedOut { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(3));

        let missing = scratch.0.join("missing.sock");
        let error =
            ask(&missing, &request(Command::Add), Duration::from_secs(1)).expect_err("no socket");
        assert!(matches!(error, Error::AgentUnreachable { .. }), "{error}");
    }
}
