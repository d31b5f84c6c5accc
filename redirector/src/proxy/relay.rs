//! The plain TCP relay that stands in for the Redis-aware proxy: bytes are
//! copied both ways until either side closes.

use tokio::{io::copy_bidirectional, net::TcpStream};

/// Relays until both directions are done; returns (client->upstream,
/// upstream->client) byte counts.
pub async fn relay(mut client: TcpStream, mut upstream: TcpStream) -> std::io::Result<(u64, u64)> {
    copy_bidirectional(&mut client, &mut upstream).await
}
