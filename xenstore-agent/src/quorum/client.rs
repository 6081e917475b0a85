//! Client side of the quorum protocol: one connection per server, re-established on error.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::table::{QuorumRequest, QuorumResponse};
use super::wire::{read_frame, write_frame, WireError, QUORUM_MAGIC};

/// A request to a quorum server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("cannot connect to quorum server {addr}: {source}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// No reply in time.
    #[error("quorum server {0} did not answer in time")]
    Timeout(SocketAddr),
    /// Framing or authentication failed.
    #[error("quorum server {addr}: {source}")]
    Wire {
        /// The server.
        addr: SocketAddr,
        /// The error.
        source: WireError,
    },
    /// The reply does not answer the request.
    #[error("quorum server {0} answered another request")]
    Mismatch(SocketAddr),
}

/// A connection to one quorum server.
pub struct QuorumClient {
    addr: SocketAddr,
    secret: Vec<u8>,
    timeout: Duration,
    conn: Option<TcpStream>,
}

impl QuorumClient {
    /// A client for the server at `addr` (connects lazily).
    #[must_use]
    pub fn new(addr: SocketAddr, secret: Vec<u8>, timeout: Duration) -> Self {
        Self {
            addr,
            secret,
            timeout,
            conn: None,
        }
    }

    /// Sends one request and waits for its reply (bounded by the timeout).
    ///
    /// # Errors
    /// [`ClientError`]; the connection is dropped and re-made on the next call.
    pub async fn request(&mut self, req: &QuorumRequest) -> Result<QuorumResponse, ClientError> {
        let addr = self.addr;
        let r = tokio::time::timeout(self.timeout, self.exchange(req)).await;
        let r = match r {
            Err(_) => Err(ClientError::Timeout(addr)),
            Ok(r) => r,
        };
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    async fn exchange(&mut self, req: &QuorumRequest) -> Result<QuorumResponse, ClientError> {
        let addr = self.addr;
        if self.conn.is_none() {
            let s = TcpStream::connect(addr)
                .await
                .map_err(|source| ClientError::Connect { addr, source })?;
            let _ = s.set_nodelay(true);
            self.conn = Some(s);
        }
        let conn = self.conn.as_mut().ok_or(ClientError::Timeout(addr))?;
        let wire = |source| ClientError::Wire { addr, source };
        write_frame(conn, QUORUM_MAGIC, &self.secret, req)
            .await
            .map_err(wire)?;
        let reply: QuorumResponse = read_frame(conn, QUORUM_MAGIC, &self.secret)
            .await
            .map_err(wire)?;
        if reply.req_id != req.req_id || reply.results.len() != req.claims.len() {
            return Err(ClientError::Mismatch(addr));
        }
        Ok(reply)
    }
}
