//! The `xenft-quorum` server: a TCP listener serving the lease table to authenticated hosts.
//!
//! One request frame in, one reply frame out, repeated on a connection. Bounded: at most
//! `max_connections` connections, an idle timeout per connection, frames of at most
//! [`super::wire::MAX_BODY`] bytes, claims per request bounded by the table.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::table::{QuorumRequest, QuorumTable};
use super::wire::{read_frame, write_frame, WireError, QUORUM_MAGIC};

/// Settings of a quorum server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Pool secret.
    pub secret: Vec<u8>,
    /// Lease length (ms); must match the hosts' `lease_ms`.
    pub lease_ms: u64,
    /// Most VMs in the table.
    pub max_vms: usize,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// A connection idle this long is closed.
    pub idle_timeout: Duration,
}

/// A running quorum server.
pub struct QuorumServer {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    table: Arc<Mutex<QuorumTable>>,
    epoch: Instant,
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// Empty secret.
    #[error("the pool secret is empty")]
    EmptySecret,
}

fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl QuorumServer {
    /// Binds and starts serving.
    ///
    /// # Errors
    /// [`ServerError`].
    pub async fn start(cfg: ServerConfig) -> Result<Self, ServerError> {
        if cfg.secret.is_empty() {
            return Err(ServerError::EmptySecret);
        }
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let epoch = Instant::now();
        let table = Arc::new(Mutex::new(QuorumTable::new(
            0,
            cfg.lease_ms,
            cfg.max_vms,
            rand::random(),
        )));
        let (shutdown, mut rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
        let t = table.clone();
        let cfg = Arc::new(cfg);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = rx.changed() => break,
                    acc = listener.accept() => {
                        let Ok((sock, peer)) = acc else { continue };
                        let Ok(permit) = limit.clone().try_acquire_owned() else {
                            tracing::warn!(%peer, "quorum: too many connections, refusing");
                            continue;
                        };
                        let (t, cfg, mut rx) = (t.clone(), cfg.clone(), rx.clone());
                        tokio::spawn(async move {
                            tokio::select! {
                                r = serve_conn(sock, &t, &cfg, epoch) => {
                                    if let Err(e) = r {
                                        tracing::debug!(%peer, error = %e, "quorum connection closed");
                                    }
                                }
                                _ = rx.changed() => {}
                            }
                            drop(permit);
                        });
                    }
                }
            }
        });
        tracing::info!(%addr, "quorum server listening");
        Ok(Self {
            addr,
            shutdown,
            task,
            table,
            epoch,
        })
    }

    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Current holder of a VM (for tests and status).
    #[must_use]
    pub fn holder(&self, vm: &crate::ids::VmId) -> Option<crate::ids::HostId> {
        let now = ms_since(self.epoch);
        self.table
            .lock()
            .ok()
            .and_then(|t| t.holder(vm, now))
            .map(|(h, _)| h)
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

async fn serve_conn(
    mut sock: TcpStream,
    table: &Mutex<QuorumTable>,
    cfg: &ServerConfig,
    epoch: Instant,
) -> Result<(), WireError> {
    let _ = sock.set_nodelay(true);
    loop {
        let req: QuorumRequest = match tokio::time::timeout(
            cfg.idle_timeout,
            read_frame(&mut sock, QUORUM_MAGIC, &cfg.secret),
        )
        .await
        {
            Err(_) => return Ok(()),
            Ok(r) => r?,
        };
        let reply = {
            let Ok(mut t) = table.lock() else {
                return Ok(());
            };
            t.handle(ms_since(epoch), &req)
        };
        match reply {
            Ok(reply) => write_frame(&mut sock, QUORUM_MAGIC, &cfg.secret, &reply).await?,
            Err(e) => {
                tracing::warn!(host = %req.host, error = %e, "quorum request refused");
                return Ok(());
            }
        }
    }
}
