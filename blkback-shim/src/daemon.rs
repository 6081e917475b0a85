//! The `xenft-blkback` process: wires a validated [`Config`] into stores, the mirror, the NBD
//! listeners and the control socket, then runs until killed.
//!
//! ## Take-over in place: `promote {epoch?, force}`
//! On a secondary's control socket (the agent's `BlkbackDriver` sends it when this host takes
//! the VM over): the shim stops taking the old primary's writes (aborts its acceptor, closes
//! its A-link, waits until the session ended and everything received is applied); level 3:
//! applies the held epochs `<= EPOCH` (the checkpoint the memory replica resumes) and drops
//! the later ones; then it stops the secondary cleanly (store synced) and serves the disk on
//! its `--nbd-unix`/`--nbd-tcp` as a primary with the bitmap at `--bitmap`, mirroring to the
//! old primary's host over a new A-link instance when that host returns as secondary. The
//! bitmap file is removed before the clean stop: whatever the stop leaves there is the bitmap
//! for this promotion (with a mirror that writes one, the returning host then gets a
//! dirty-only resync), otherwise the bitmap starts fresh and the first session is a full sync
//! (holes and zero chunks skipped). A copy that is not consistent (resync in flight) is
//! refused unless `force` is set; a plain-TCP primary still connected makes the promotion fail
//! rather than leave two writers. Stopping the secondary (SIGTERM) and starting
//! `--role primary` on the same disk is the out-of-process equivalent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;
use xenft_control::blkback::{Event, Promoted, Reply, Request, Status};
use xenft_control::{Blkback, ErrorReply, Events, Server, ServerOptions};

use crate::mirror::alink::{AlinkAcceptor, AlinkConnector};
use crate::mirror::bitmap::{BitmapError, DirtyBitmap, DEFAULT_CHUNK};
use crate::mirror::primary::{MirrorConfig, Primary};
use crate::mirror::secondary::Secondary;
use crate::mirror::transport::{PeerConnector, PeerSession, TcpAcceptor, TcpConnector};
use crate::mirror::wire::PeerDiskState;
use crate::nbd::server::{ExportConfig, NbdServer};
use crate::status::{self, Node};
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
        /// Dirty bitmap file of the primary this process becomes on `promote` (created
        /// afresh then: the first session with the old primary's host is a full sync).
        bitmap: PathBuf,
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
    let mut promotable = None;
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
        Role::Secondary {
            peer,
            state,
            bitmap,
        } => {
            let s = Secondary::new(store.clone(), state.clone());
            let serve = match peer {
                PeerTransport::Tcp(listen) => {
                    let listener = TcpListener::bind(listen)
                        .await
                        .map_err(sock(format!("bind {listen}")))?;
                    tasks.spawn(s.clone().serve(TcpAcceptor { listener }))
                }
                PeerTransport::Alink(lc) => {
                    let link = xenft_alink::Link::start(lc.clone()).await?;
                    own_link = Some(link.clone());
                    let a = AlinkAcceptor::new(&link).ok_or_else(taken)?;
                    tasks.spawn(s.clone().serve(a))
                }
            };
            promotable = Some(Promotable {
                secondary: s.clone(),
                serve,
                bitmap: bitmap.clone(),
                peer: peer.clone(),
            });
            (Node::Secondary(s), None)
        }
    };
    if let Some(vol) = volume {
        for t in serve_nbd(&cfg, vol).await? {
            tasks.spawn(t);
        }
    }
    let events = Events::new();
    let ctl = Arc::new(Controller {
        node: Mutex::new(node),
        link: Mutex::new(own_link),
        promotable: tokio::sync::Mutex::new(promotable),
        cfg: cfg.clone(),
        store: store.clone(),
        events: Arc::clone(&events),
    });
    let _control = match &cfg.control {
        Some(path) => {
            let (c, rt) = (Arc::clone(&ctl), tokio::runtime::Handle::current());
            let handler = move |req| rt.block_on(c.handle(req));
            let server = Server::start::<Blkback, _>(
                path,
                Arc::new(handler),
                Arc::clone(&events),
                ServerOptions::default(),
            )
            .map_err(sock(format!("bind {}", path.display())))?;
            let c = Arc::clone(&ctl);
            tasks.spawn(status::publish_events(move || c.node(), events));
            Some(server)
        }
        None => None,
    };
    info!("ready");
    let mut term = signal(SignalKind::terminate()).map_err(sock("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(sock("SIGINT handler"))?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
        _ = async { while tasks.join_next().await.is_some() {} } => {}
    }
    // Clean stop: durable local store, bitmap and activity log consistent.
    let node = ctl.node();
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
    drop(_control);
    if let Some(p) = &cfg.nbd_unix {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Binds the configured NBD sockets for `vol`; returns their serving tasks.
async fn serve_nbd(
    cfg: &Config,
    vol: Arc<Volume>,
) -> Result<Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>, DaemonError> {
    let server = NbdServer::new(vol, cfg.export.clone());
    let mut out: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> = Vec::new();
    if let Some(p) = &cfg.nbd_unix {
        let l = bind_unix(p)?;
        let s = server.clone();
        out.push(Box::pin(async move {
            let _ = s.serve_unix(l).await;
        }));
    }
    if let Some(a) = cfg.nbd_tcp {
        let l = TcpListener::bind(a)
            .await
            .map_err(sock(format!("bind {a}")))?;
        let s = server.clone();
        out.push(Box::pin(async move {
            let _ = s.serve_tcp(l).await;
        }));
    }
    Ok(out)
}

/// How long promotion waits for the old session's applier to finish.
const APPLIER_DRAIN: Duration = Duration::from_secs(5);
/// How long promotion retries starting the new A-link (the old one's listeners close
/// asynchronously).
const RELINK_FOR: Duration = Duration::from_secs(5);

/// What a secondary needs to become the primary.
struct Promotable {
    secondary: Arc<Secondary>,
    serve: tokio::task::AbortHandle,
    bitmap: PathBuf,
    peer: PeerTransport,
}

/// The control socket's state: the node it serves, which `promote` turns from a secondary
/// into a primary (take-over), and the process's own A-link.
struct Controller {
    node: Mutex<Node>,
    link: Mutex<Option<xenft_alink::Link>>,
    promotable: tokio::sync::Mutex<Option<Promotable>>,
    cfg: Config,
    store: Arc<dyn Store>,
    events: Arc<Events<Event>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A primary without a reachable peer: plain-TCP secondaries only listen, so a promoted
/// TCP secondary has no address to dial; it runs degraded and records every write as dirty.
struct NoPeer;

impl PeerConnector for NoPeer {
    async fn connect(&mut self) -> std::io::Result<PeerSession> {
        std::future::pending().await
    }
}

/// Why `promote` was refused or failed.
#[derive(Debug, thiserror::Error)]
enum PromoteError {
    #[error("this process is not a secondary (role {0})")]
    NotSecondary(&'static str),
    #[error("the local copy is {0:?}, not consistent (a resync was in flight): serving it would expose a half-copied disk; promote with force overrides")]
    NotConsistent(PeerDiskState),
    #[error("no NBD socket configured (--nbd-unix or --nbd-tcp): nothing to serve the disk on")]
    NoNbd,
    #[error("the old primary's session did not end within {0:?}")]
    SessionStuck(Duration),
    #[error("committing held epochs up to {epoch}: {source}")]
    Commit { epoch: u64, source: StoreError },
    #[error("syncing the local copy: {0}")]
    Sync(StoreError),
    #[error("the promotion task panicked")]
    TaskFailed,
    #[error("removing the old bitmap {path}: {source}")]
    OldBitmap {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

impl Controller {
    fn node(&self) -> Node {
        lock(&self.node).clone()
    }

    /// Take-over: stop accepting the old primary's writes, wait until everything received is
    /// applied, commit held epochs up to `EPOCH` (level 3) and drop the rest, then serve the
    /// disk over NBD as a primary whose bitmap starts fresh (the old primary's host gets a full
    /// sync when it returns as secondary).
    async fn promote(&self, epoch: Option<u64>, force: bool) -> Result<Promoted, PromoteError> {
        let mut slot = self.promotable.lock().await;
        let Some(pr) = slot.take() else {
            return Err(PromoteError::NotSecondary(match self.node() {
                Node::Local => "local",
                Node::Primary(_) => "primary",
                Node::Secondary(_) => "secondary (promotion failed before)",
            }));
        };
        let st = pr.secondary.status();
        if st.disk != PeerDiskState::Consistent && !force {
            *slot = Some(pr);
            return Err(PromoteError::NotConsistent(st.disk));
        }
        if self.cfg.nbd_unix.is_none() && self.cfg.nbd_tcp.is_none() {
            *slot = Some(pr);
            return Err(PromoteError::NoNbd);
        }
        info!(?epoch, force, "promoting the secondary to primary");
        // 1. No more writes from the old primary: stop accepting sessions and close the link
        //    (which ends the current session).
        pr.serve.abort();
        let old_link = lock(&self.link).take();
        if let Some(l) = &old_link {
            l.shutdown();
        }
        let sec = pr.secondary.clone();
        let deadline = tokio::time::Instant::now() + APPLIER_DRAIN;
        // (Over plain TCP the session ends when the old primary's connection does: a primary
        // still connected makes the promotion fail here rather than serve two writers.)
        while sec.status().connected {
            if tokio::time::Instant::now() >= deadline {
                return Err(PromoteError::SessionStuck(APPLIER_DRAIN));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if tokio::time::timeout(APPLIER_DRAIN, sec.wait_applier_done())
            .await
            .is_err()
        {
            return Err(PromoteError::SessionStuck(APPLIER_DRAIN));
        }
        // 2. Level 3: the checkpoint the memory replica holds decides which writes count. The
        //    clean stop that follows may leave the bitmap for this promotion: clear any older
        //    file first.
        if let Err(e) = std::fs::remove_file(&pr.bitmap) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(PromoteError::OldBitmap {
                    path: pr.bitmap.clone(),
                    source: e,
                });
            }
        }
        let s2 = sec.clone();
        let (committed_writes, discarded_writes) = tokio::task::spawn_blocking(move || {
            let c = match epoch {
                Some(e) => s2
                    .commit_epoch(e)
                    .map_err(|source| PromoteError::Commit { epoch: e, source })?,
                None => 0,
            };
            let d = s2.discard_uncommitted();
            s2.shutdown_blocking().map_err(PromoteError::Sync)?;
            Ok::<_, PromoteError>((c, d))
        })
        .await
        .map_err(|_| PromoteError::TaskFailed)??;
        // 3. Serve as primary, mirroring to the old primary's host when it returns.
        let bm = DirtyBitmap::open(&pr.bitmap, self.store.size(), DEFAULT_CHUNK)
            .map_err(DaemonError::from)?;
        let p = Primary::new(self.store.clone(), bm, self.cfg.mirror.clone());
        match &pr.peer {
            PeerTransport::Tcp(_) => {
                tokio::spawn(p.clone().run(NoPeer));
            }
            PeerTransport::Alink(lc) => {
                let link = relink(lc).await?;
                let c = AlinkConnector::new(link.clone()).ok_or_else(taken)?;
                *lock(&self.link) = Some(link);
                tokio::spawn(p.clone().run(c));
            }
        }
        for t in serve_nbd(&self.cfg, Volume::mirrored(self.store.clone(), p.clone())).await? {
            tokio::spawn(t);
        }
        *lock(&self.node) = Node::Primary(p);
        info!(
            committed_writes,
            discarded_writes, "promoted: serving the disk as primary"
        );
        Ok(Promoted {
            committed_writes,
            discarded_writes,
            was_connected: st.connected,
        })
    }

    /// One request of the contract: `promote` here, the others by the current node; `status`
    /// carries the A-link's status too.
    async fn handle(&self, req: Request) -> Result<Reply, ErrorReply> {
        match req {
            Request::Promote { epoch, force } => match self.promote(epoch, force).await {
                Ok(p) => {
                    self.events.publish(&Event::Promoted(p.clone()));
                    Ok(Reply::Promoted { promoted: p })
                }
                Err(
                    e @ (PromoteError::NotSecondary(_)
                    | PromoteError::NotConsistent(_)
                    | PromoteError::NoNbd),
                ) => Err(ErrorReply::refused(e)),
                Err(e) => Err(ErrorReply::failed(e)),
            },
            Request::Status => Ok(Reply::Status(Box::new(Status {
                node: self.node().status(),
                alink: lock(&self.link)
                    .as_ref()
                    .and_then(|l| serde_json::to_value(l.status()).ok()),
            }))),
            req => self.node().handle(req).await,
        }
    }
}

/// Starts a new A-link instance with the old one's configuration, retrying while the old
/// instance's listeners are still closing.
async fn relink(lc: &xenft_alink::LinkConfig) -> Result<xenft_alink::Link, DaemonError> {
    let deadline = tokio::time::Instant::now() + RELINK_FOR;
    loop {
        match xenft_alink::Link::start(lc.clone()).await {
            Ok(l) => return Ok(l),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
