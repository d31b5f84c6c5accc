//! `tcp` backends: a plain L4 relay for Redis-port services the proxy
//! should not parse (a module's protocol, a Redis fork). The steered
//! connection is carried to its original destination as bytes, directly or
//! through the destination node's HBONE listener when it is meshed, as
//! ztunnel carries any TCP; it is still admitted, counted and drained.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{dial::Dialer, front::Place, metrics::ProxyMetrics};

pub struct TcpBackend {
    pub name: String,
    dialer: Arc<Dialer>,
    pub metrics: Arc<ProxyMetrics>,
}

impl TcpBackend {
    pub fn new(name: String, dialer: Arc<Dialer>, metrics: Arc<ProxyMetrics>) -> Self {
        Self {
            name,
            dialer,
            metrics,
        }
    }

    /// Carries `client` to `destination` until either side closes; `place`
    /// holds the client's admission slot that long.
    pub async fn relay(
        self: Arc<Self>,
        mut client: TcpStream,
        destination: SocketAddr,
        place: Place,
    ) {
        self.metrics.client_opened();
        let _open = Opened(&self.metrics);
        let _place = place;
        let mut upstream = match self.dialer.connect(destination).await {
            Ok(upstream) => upstream,
            Err(e) => {
                // The client sees what a direct connect would have shown
                // it: the connection ends.
                self.metrics.upstream_connect_failed(destination);
                tracing::warn!(backend = %self.name, %destination, error = %e, "relay: cannot connect");
                return;
            }
        };
        self.metrics.upstream_opened(destination);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => self.metrics.relayed(up, down),
            Err(e) => tracing::debug!(backend = %self.name, error = %e, "relay ended"),
        }
        self.metrics.upstream_closed(destination);
    }
}

/// Counts the relayed client as closed however the relay ends.
struct Opened<'a>(&'a ProxyMetrics);

impl Drop for Opened<'_> {
    fn drop(&mut self) {
        self.0.client_closed();
    }
}
