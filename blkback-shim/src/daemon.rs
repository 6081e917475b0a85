//! The `xenft-blkback` process: wires a validated [`Config`] into stores, the mirror, the NBD
//! listeners and the control socket, then runs until killed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tracing::info;

use crate::mirror::alink::{AlinkAcceptor, AlinkConnector};
use crate::mirror::bitmap::{BitmapError, DirtyBitmap, DEFAULT_CHUNK};
use crate::mirror::primary::{MirrorConfig, Primary};
use crate::mirror::secondary::Secondary;
use crate::mirror::transport::{TcpAcceptor, TcpConnector};
use crate::nbd::server::{ExportConfig, NbdServer};
use crate::status::Node;
use crate::store::{FileStore, Store, StoreError};
use crate::volume::Volume;

/// How the two shims reach each other.
#[derive(Debug, Clone)]
pub enum PeerTransport {
    /// One plain TCP connection: the primary dials this address, the secondary listens on it.
    Tcp(SocketAddr),
    /// An authenticated multi-path A-link (`Channel::Disk`); this process runs the link.
    Alink(xenft_alink::LinkConfig),
}

/// What this process does.
#[derive(Debug, Clone)]
pub enum Role {
    /// Serve the disk over NBD, no peer.
    Local,
    /// Serve the disk over NBD and mirror it to the secondary.
    Primary {
        /// How to reach the secondary.
        peer: PeerTransport,
        /// Dirty bitmap file.
        bitmap: PathBuf,
    },
    /// Hold the copy for the primary.
    Secondary {
        /// How the primary reaches us.
        peer: PeerTransport,
        /// Consistency state file.
        state: PathBuf,
    },
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Role.
    pub role: Role,
    /// Backing file or block device.
    pub disk: PathBuf,
    /// Create a sparse file of this size if missing or smaller.
    pub create_size: Option<u64>,
    /// NBD Unix socket.
    pub nbd_unix: Option<PathBuf>,
    /// NBD TCP address.
    pub nbd_tcp: Option<SocketAddr>,
    /// Export settings.
    pub export: ExportConfig,
    /// Control socket.
    pub control: Option<PathBuf>,
    /// Mirror tunables.
    pub mirror: MirrorConfig,
}

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Opening the disk.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Opening the bitmap.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// Starting the A-link.
    #[error("a-link: {0}")]
    Link(#[from] xenft_alink::LinkError),
    /// Binding or serving a socket.
    #[error("{what}: {source}")]
    Socket {
        /// Which socket.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn sock(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Socket { what, source }
}

fn taken() -> DaemonError {
    DaemonError::Link(xenft_alink::LinkError::Config(
        "disk channel receiver already taken".into(),
    ))
}

fn bind_unix(path: &PathBuf) -> Result<UnixListener, DaemonError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(sock(format!("bind {}", path.display())))
}

/// Runs the daemon until a listener fails.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let store: Arc<dyn Store> = Arc::new(FileStore::open(&cfg.disk, cfg.create_size)?);
    info!(disk = %cfg.disk.display(), size = store.size(), role = ?cfg.role, "starting");
    let mut tasks = tokio::task::JoinSet::new();
    let (node, volume) = match &cfg.role {
        Role::Local => (Node::Local, Some(Volume::local(store.clone()))),
        Role::Primary { peer, bitmap } => {
            let bm = DirtyBitmap::open(bitmap, store.size(), DEFAULT_CHUNK)?;
            let p = Primary::new(store.clone(), bm, cfg.mirror.clone());
            match peer {
                PeerTransport::Tcp(addr) => {
                    tasks.spawn(p.clone().run(TcpConnector { addr: *addr }));
                }
                PeerTransport::Alink(lc) => {
                    let link = xenft_alink::Link::start(lc.clone()).await?;
                    let c = AlinkConnector::new(link).ok_or_else(taken)?;
                    tasks.spawn(p.clone().run(c));
                }
            }
            (
                Node::Primary(p.clone()),
                Some(Volume::mirrored(store.clone(), p)),
            )
        }
        Role::Secondary { peer, state } => {
            let s = Secondary::new(store.clone(), state.clone());
            match peer {
                PeerTransport::Tcp(listen) => {
                    let listener = TcpListener::bind(listen)
                        .await
                        .map_err(sock(format!("bind {listen}")))?;
                    tasks.spawn(s.clone().serve(TcpAcceptor { listener }));
                }
                PeerTransport::Alink(lc) => {
                    let link = xenft_alink::Link::start(lc.clone()).await?;
                    let a = AlinkAcceptor::new(&link).ok_or_else(taken)?;
                    tasks.spawn(s.clone().serve(a));
                }
            }
            (Node::Secondary(s), None)
        }
    };
    if let Some(vol) = volume {
        let server = NbdServer::new(vol, cfg.export.clone());
        if let Some(p) = &cfg.nbd_unix {
            let l = bind_unix(p)?;
            let s = server.clone();
            tasks.spawn(async move {
                let _ = s.serve_unix(l).await;
            });
        }
        if let Some(a) = cfg.nbd_tcp {
            let l = TcpListener::bind(a)
                .await
                .map_err(sock(format!("bind {a}")))?;
            let s = server.clone();
            tasks.spawn(async move {
                let _ = s.serve_tcp(l).await;
            });
        }
    }
    if let Some(c) = &cfg.control {
        let l = bind_unix(c)?;
        let n = node.clone();
        tasks.spawn(async move {
            let _ = n.serve(l).await;
        });
    }
    info!("ready");
    while tasks.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
