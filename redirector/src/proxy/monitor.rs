//! MONITOR for one client, as one Redis prints it: the commands of every
//! client of this proxy (fed by the sessions through the registry), and
//! the commands scripts and functions run inside the nodes (`[0 lua]`
//! lines), read from each master's own MONITOR while this one lasts.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::Shared;
use crate::resp::Protocol;

/// Starts a MONITOR feed; it ends when the receiver is dropped. The
/// second receiver resolves to MONITOR's reply once every master's own
/// monitor runs (so no script's line is missed after it).
pub fn start(shared: &Arc<Shared>) -> (mpsc::UnboundedReceiver<Bytes>, oneshot::Receiver<Bytes>) {
    let (tx, rx) = mpsc::unbounded_channel();
    shared.clients.monitor(tx.clone());
    let mut started = Vec::new();
    for master in shared.topology.view().masters() {
        let (shared, tx) = (Arc::clone(shared), tx.clone());
        let (ready, ready_rx) = oneshot::channel::<()>();
        started.push(ready_rx);
        tokio::spawn(async move {
            let pool = shared.pools.node(master, Protocol::Resp2);
            let Ok(lease) = pool.lease().await else {
                return;
            };
            let (mut reader, mut writer) = lease.split();
            let relay = async {
                use tokio::io::AsyncWriteExt as _;
                writer.write_all(b"*1\r\n$7\r\nMONITOR\r\n").await.ok()?;
                // Its +OK.
                reader.next().await.ok()?;
                let _ = ready.send(());
                loop {
                    let line = reader.next().await.ok()?;
                    if is_script_line(&line.raw) && tx.send(line.raw).is_err() {
                        return Some(());
                    }
                }
            };
            tokio::select! {
                _ = relay => {}
                () = tx.closed() => {}
            }
            // A monitoring connection is never reused.
            pool.forget();
        });
    }
    let (reply, reply_rx) = oneshot::channel();
    tokio::spawn(async move {
        // A master that cannot be monitored costs only its scripts' lines.
        let all = all_started(started);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), all).await;
        let _ = reply.send(Bytes::from_static(b"+OK\r\n"));
    });
    (rx, reply_rx)
}

async fn all_started(waits: Vec<oneshot::Receiver<()>>) {
    for wait in waits {
        let _ = wait.await;
    }
}

/// `+1700000000.000000 [0 lua] "set" "k" "v"`: a command a script ran.
fn is_script_line(raw: &[u8]) -> bool {
    raw.windows(9).any(|w| w == b" [0 lua] ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_script_lines_are_relayed() {
        assert!(is_script_line(b"+1.000001 [0 lua] \"set\" \"foo\"\r\n"));
        assert!(!is_script_line(
            b"+1.000001 [0 127.0.0.1:5000] \"get\" \"foo\"\r\n"
        ));
        assert!(!is_script_line(b"+OK\r\n"));
    }
}
