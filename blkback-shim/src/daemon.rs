//! The `xenft-blkback` process: wires a validated [`Config`] into stores, the mirror, the NBD
//! listeners and the control socket, then runs until killed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
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
    /// One plain TCP connection, unauthenticated (loopback and tests only): the primary dials
    /// this address, the secondary listens on it.
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

/// Runs the daemon until SIGTERM/SIGINT (clean stop) or until every task ended.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let store: Arc<dyn Store> = Arc::new(FileStore::open(&cfg.disk, cfg.create_size)?);
    info!(disk = %cfg.disk.display(), size = store.size(), role = ?cfg.role, "starting");
    let mut tasks = tokio::task::JoinSet::new();
    let mut own_link = None;
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
                    own_link = Some(link.clone());
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
                    own_link = Some(link.clone());
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
            let _ = n.serve(l, own_link).await;
        });
    }
    info!("ready");
    let mut term = signal(SignalKind::terminate()).map_err(sock("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(sock("SIGINT handler"))?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
        _ = async { while tasks.join_next().await.is_some() {} } => {}
    }
    // Clean stop: durable local store, bitmap and activity log consistent.
    if let Node::Primary(p) = &node {
        let p = p.clone();
        match tokio::task::spawn_blocking(move || p.shutdown_blocking()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "unclean stop"),
            Err(_) => tracing::warn!("shutdown task failed"),
        }
    } else if let Node::Secondary(sec) = &node {
        let sec = sec.clone();
        match tokio::task::spawn_blocking(move || sec.shutdown_blocking()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "unclean stop"),
            Err(_) => tracing::warn!("shutdown task failed"),
        }
    } else {
        let s = store.clone();
        let _ = tokio::task::spawn_blocking(move || s.sync()).await;
    }
    tasks.abort_all();
    for p in [&cfg.nbd_unix, &cfg.control].into_iter().flatten() {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
