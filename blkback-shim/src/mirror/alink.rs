//! Replication sessions over an `xenft-alink` [`Link`] (`Channel::Disk`).
//!
//! A `Link` lives as long as both processes and hides path failures, so a mirror *session* is
//! an application-level notion on top of it: every frame on the disk channel starts with an
//! 8-byte session id. The primary opens a session by sending an empty frame with a fresh id;
//! the secondary treats the first frame with a new id as a new session (and answers with its
//! `Hello`). Frames of other sessions (stale acknowledgements, writes queued before a session
//! was abandoned) are dropped. A session ends when the link reports `PeerRestarted` (the
//! peer's unacknowledged messages were dropped, so the peer must be resynced) or shuts down;
//! on the primary a session also ends when no path has been up for [`UNREACHABLE_AFTER`], and
//! the acknowledgement timeout covers a peer that hangs with its paths up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use xenft_alink::{Channel, Link, LinkEvent};

use super::transport::{PeerAcceptor, PeerConnector, PeerSession, SessionTx};
use super::wire::Frame;

/// How long no path may be up before the primary ends the session (goes degraded).
pub const UNREACHABLE_AFTER: Duration = Duration::from_millis(1000);

type Route = Arc<Mutex<Option<(u64, mpsc::Sender<Bytes>)>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn split(frame: &Bytes) -> Option<(u64, Bytes)> {
    let id = u64::from_be_bytes(frame.get(..8)?.try_into().ok()?);
    Some((id, frame.slice(8..)))
}

/// The per-session sender: each frame is prefixed with `id` and queued on the link's disk
/// channel at once (the link keeps the order of the calls), with no task in between.
fn session_sender(link: Link, id: u64) -> SessionTx {
    SessionTx::direct(move |m: Frame| {
        // No copy of the data: the session id and the message head form the link message's
        // head, the data its body (one vectored socket write).
        let mut b = BytesMut::with_capacity(m.head.len() + 8);
        b.put_u64(id);
        b.put_slice(&m.head);
        link.send_parts_now(Channel::Disk, b.freeze(), m.body.clone())
            .map_err(|_| m)
    })
}

/// Closes the current session whenever the peer restarts, and (`on_unreachable`) when no path
/// has been up for [`UNREACHABLE_AFTER`]: the primary then goes degraded without waiting for
/// its acknowledgement timeout (which still covers a peer that hangs with its paths up).
fn watch_restarts(link: &Link, route: Route, on_unreachable: bool) {
    let mut events = link.subscribe();
    let link = link.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut down_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(LinkEvent::PeerRestarted { .. }) => {
                        lock(&route).take();
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        lock(&route).take();
                        break;
                    }
                },
                _ = tick.tick(), if on_unreachable => {
                    if link.is_connected() {
                        down_since = None;
                    } else {
                        let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() >= UNREACHABLE_AFTER {
                            lock(&route).take();
                        }
                    }
                }
            }
        }
    });
}

/// Primary side: opens sessions on a link.
pub struct AlinkConnector {
    link: Link,
    route: Route,
    next_id: u64,
}

impl AlinkConnector {
    /// Takes the link's disk-channel receiver (`None` if already taken).
    pub fn new(link: Link) -> Option<Self> {
        let mut rx = link.receiver(Channel::Disk)?;
        let route: Route = Arc::new(Mutex::new(None));
        let r = route.clone();
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                let Some((id, body)) = split(&frame) else {
                    continue;
                };
                let target = lock(&r)
                    .as_ref()
                    .filter(|(cur, _)| *cur == id)
                    .map(|(_, tx)| tx.clone());
                if let Some(tx) = target {
                    if tx.send(body).await.is_err() {
                        let mut g = lock(&r);
                        if g.as_ref().is_some_and(|(cur, _)| *cur == id) {
                            *g = None;
                        }
                    }
                }
            }
            lock(&r).take();
        });
        watch_restarts(&link, route.clone(), true);
        // Session ids differ across primary restarts: time-based start.
        let next_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(1))
            .unwrap_or(1);
        Some(Self {
            link,
            route,
            next_id,
        })
    }
}

impl PeerConnector for AlinkConnector {
    async fn connect(&mut self) -> std::io::Result<PeerSession> {
        if !self.link.wait_connected(Duration::from_secs(1)).await {
            return Err(std::io::Error::from(std::io::ErrorKind::NotConnected));
        }
        self.next_id += 1;
        let id = self.next_id;
        let (btx, rx) = mpsc::channel(1024);
        *lock(&self.route) = Some((id, btx));
        let tx = session_sender(self.link.clone(), id);
        // The empty frame opens the session on the secondary.
        tx.send(Frame::default())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(PeerSession { tx, rx })
    }
}

/// Secondary side: a new session id on the disk channel is a new session.
pub struct AlinkAcceptor {
    sessions: mpsc::Receiver<PeerSession>,
}

impl AlinkAcceptor {
    /// Takes the link's disk-channel receiver (`None` if already taken).
    pub fn new(link: &Link) -> Option<Self> {
        let mut rx = link.receiver(Channel::Disk)?;
        let route: Route = Arc::new(Mutex::new(None));
        let (stx, sessions) = mpsc::channel(4);
        let r = route.clone();
        let l = link.clone();
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                let Some((id, body)) = split(&frame) else {
                    continue;
                };
                let current = lock(&r).as_ref().map(|(cur, tx)| (*cur, tx.clone()));
                match current {
                    Some((cur, tx)) if cur == id && tx.send(body.clone()).await.is_err() => {
                        lock(&r).take();
                    }
                    Some((cur, _)) if cur == id => {}
                    _ if body.is_empty() => {
                        // Session opener: replaces any current session.
                        let (btx, brx) = mpsc::channel(1024);
                        *lock(&r) = Some((id, btx));
                        let tx = session_sender(l.clone(), id);
                        if stx.send(PeerSession { tx, rx: brx }).await.is_err() {
                            break;
                        }
                    }
                    _ => {} // stale frame of an abandoned session
                }
            }
            lock(&r).take();
        });
        watch_restarts(link, route, false);
        Some(Self { sessions })
    }
}

impl PeerAcceptor for AlinkAcceptor {
    async fn accept(&mut self) -> std::io::Result<PeerSession> {
        self.sessions
            .recv()
            .await
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::ConnectionAborted))
    }
}
