//! `--workers N`: thread per core. Each worker is a thread with its own
//! current-thread runtime, its own listening sockets on the proxy addresses
//! (`SO_REUSEPORT`: the kernel spreads accepted connections over them), and
//! its own routes ([`Front`]) to its own copy of every backend (pools,
//! leases, slot map, metric shards); see `serving`. A client's session,
//! and the upstream connections it uses, live on the worker that accepted
//! it, so the request path never waits for another worker.
//!
//! The first worker is the daemon's main runtime, which also runs the
//! control tasks (heartbeat, admin, discovery, the node agent): with one
//! worker nothing changes from a plain current-thread proxy.

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::watch;

use crate::proxy::{
    self,
    front::{Front, Proxy},
};

/// One worker, as the daemon's control side sees it.
pub struct Worker {
    pub index: usize,
    /// Its routes to the backends (sessions and their upstream connections
    /// run on the worker that accepted the client).
    pub front: Arc<Front>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start proxy worker {index}: {source}")]
    Runtime {
        index: usize,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bind(#[from] proxy::Error),
}

/// Workers past the first, bound but not accepting until [`Extra::serve`].
pub struct Extra {
    go: watch::Sender<bool>,
}

impl Extra {
    /// Starts accepting on every extra worker.
    pub fn serve(&self) {
        self.go.send_replace(true);
    }

    /// Closes every extra worker's listeners; their clients stay served.
    pub fn stop_accepting(&self) {
        self.go.send_replace(false);
    }
}

/// Starts workers `1..count` on their own threads, each with sockets bound
/// on `addrs` (the first worker's, with `SO_REUSEPORT`) and the routes
/// `front(index)` makes for it. They listen and accept from
/// [`Extra::serve`] on, as the first worker's do.
pub fn start_extra(
    count: usize,
    addrs: &[SocketAddr],
    front: impl Fn(usize) -> Arc<Front>,
) -> Result<(Vec<Worker>, Extra), Error> {
    let (go, ready) = watch::channel(false);
    let mut workers = Vec::new();
    for index in 1..count {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::Runtime { index, source })?;
        // Bound now (a conflict fails the start); the sockets join this
        // worker's reactor when it serves.
        let proxy = Proxy::bind(addrs)?;
        let routes = front(index);
        let serving = Arc::clone(&routes);
        let mut ready = ready.clone();
        std::thread::Builder::new()
            .name(format!("redirector-worker-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    // No go (the daemon stopped before serving): the
                    // listeners just wait for the process to end.
                    if ready.wait_for(|go| *go).await.is_ok() {
                        if let Err(e) = proxy.listen() {
                            tracing::error!(worker = index, error = %e, "cannot listen");
                        }
                        // Until told to stop: the listeners close with
                        // `serve`'s future, the sessions live on.
                        tokio::select! {
                            () = proxy.serve(serving) => {}
                            _ = ready.wait_for(|go| !*go) => {}
                        }
                    }
                    std::future::pending::<()>().await;
                });
            })
            .map_err(|source| Error::Runtime { index, source })?;
        workers.push(Worker {
            index,
            front: routes,
        });
    }
    Ok((workers, Extra { go }))
}
