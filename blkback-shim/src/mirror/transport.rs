//! How the two shims reach each other.
//!
//! The mirror works on [`PeerSession`]s: an ordered, reliable message pipe to one live instance
//! of the peer. A session ends (its receiver yields `None`) when the peer dies, restarts or
//! becomes unreachable; the primary then goes degraded and opens a new session later, which
//! starts with a resync. Implementations:
//!
//! - [`memory_pair`]: in-process, for unit tests;
//! - [`TcpConnector`] / [`TcpAcceptor`]: length-prefixed frames over one TCP connection (the
//!   binary's `--peer-transport tcp`, and loopback tests);
//! - the `xenft-alink` adapter in [`super::alink`] (`Channel::Disk`).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::wire::Frame;

/// Largest frame accepted from the peer (data cap plus headers).
pub const MAX_FRAME: usize = super::wire::MAX_DATA + 4096;

/// The sending end of a session: frames go out in the order of the `send` calls. Cheap to
/// clone; never blocks (unbounded: the primary bounds what it has in flight).
#[derive(Clone)]
pub struct SessionTx(TxInner);

type DirectSend = std::sync::Arc<dyn Fn(Frame) -> Result<(), Frame> + Send + Sync>;

#[derive(Clone)]
enum TxInner {
    /// Through a channel to a writer task.
    Channel(mpsc::UnboundedSender<Frame>),
    /// Straight into a transport that queues without blocking (the A-link adapter), saving
    /// a task hop per message.
    Direct(DirectSend),
}

impl SessionTx {
    /// A sender feeding `tx`.
    #[must_use]
    pub fn channel(tx: mpsc::UnboundedSender<Frame>) -> Self {
        Self(TxInner::Channel(tx))
    }

    /// A sender calling `f` for each frame (`f` must not block, and returns the frame when the
    /// session is gone).
    pub fn direct(f: impl Fn(Frame) -> Result<(), Frame> + Send + Sync + 'static) -> Self {
        Self(TxInner::Direct(std::sync::Arc::new(f)))
    }

    /// Sends a frame; gives it back when the session is gone.
    pub fn send(&self, f: Frame) -> Result<(), Frame> {
        match &self.0 {
            TxInner::Channel(tx) => tx.send(f).map_err(|e| e.0),
            TxInner::Direct(send) => send(f),
        }
    }
}

impl std::fmt::Debug for SessionTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            TxInner::Channel(_) => "SessionTx::Channel",
            TxInner::Direct(_) => "SessionTx::Direct",
        })
    }
}

/// One live connection to the peer instance.
#[derive(Debug)]
pub struct PeerSession {
    /// Outgoing frames.
    pub tx: SessionTx,
    /// Incoming frames; `None` means the session is over.
    pub rx: mpsc::Receiver<Bytes>,
}

/// Opens sessions to the peer (primary side).
pub trait PeerConnector: Send + 'static {
    /// Tries once to open a session.
    fn connect(&mut self)
        -> impl std::future::Future<Output = std::io::Result<PeerSession>> + Send;
}

/// Accepts sessions from the peer (secondary side).
pub trait PeerAcceptor: Send + 'static {
    /// Waits for the next session.
    fn accept(&mut self) -> impl std::future::Future<Output = std::io::Result<PeerSession>> + Send;
}

/// Two connected in-memory sessions (`(primary end, secondary end)`).
#[must_use]
pub fn memory_pair() -> (PeerSession, PeerSession) {
    let (atx, arx) = mpsc::unbounded_channel::<Frame>();
    let (btx, brx) = mpsc::unbounded_channel::<Frame>();
    (pipe_end(atx, brx), pipe_end(btx, arx))
}

/// Adapts an unbounded receiver to the bounded receiver a session exposes.
fn pipe_end(
    tx: mpsc::UnboundedSender<Frame>,
    mut urx: mpsc::UnboundedReceiver<Frame>,
) -> PeerSession {
    let (btx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        while let Some(m) = urx.recv().await {
            if btx.send(m.to_bytes()).await.is_err() {
                break;
            }
        }
    });
    PeerSession {
        tx: SessionTx::channel(tx),
        rx,
    }
}

/// In-memory connector: each `connect` takes the next session the test pushes.
pub struct MemoryConnector {
    /// Sessions handed out by `connect`, in order.
    pub sessions: mpsc::UnboundedReceiver<PeerSession>,
}

impl PeerConnector for MemoryConnector {
    async fn connect(&mut self) -> std::io::Result<PeerSession> {
        match tokio::time::timeout(Duration::from_millis(50), self.sessions.recv()).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => {
                // No more sessions will come: behave like an unreachable peer.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::from(std::io::ErrorKind::NotConnected))
            }
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
        }
    }
}

/// Connects to the secondary over TCP.
pub struct TcpConnector {
    /// Secondary's replication address.
    pub addr: SocketAddr,
}

impl PeerConnector for TcpConnector {
    async fn connect(&mut self) -> std::io::Result<PeerSession> {
        let s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(self.addr))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        Ok(tcp_session(s))
    }
}

/// Accepts the primary over TCP.
pub struct TcpAcceptor {
    /// Bound listener.
    pub listener: TcpListener,
}

impl PeerAcceptor for TcpAcceptor {
    async fn accept(&mut self) -> std::io::Result<PeerSession> {
        let (s, _) = self.listener.accept().await?;
        Ok(tcp_session(s))
    }
}

/// Runs length-prefixed framing (u32 big-endian length, then the frame) over a TCP stream.
#[must_use]
pub fn tcp_session(stream: TcpStream) -> PeerSession {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let (tx, mut urx) = mpsc::unbounded_channel::<Frame>();
    let (btx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let mut wr = BufWriter::with_capacity(1 << 20, wr);
        while let Some(m) = urx.recv().await {
            let mut batch = vec![m];
            while let Ok(m) = urx.try_recv() {
                batch.push(m);
                if batch.len() >= 64 {
                    break;
                }
            }
            for m in batch {
                let Ok(len) = u32::try_from(m.len()) else {
                    return;
                };
                // Head and body go out separately: the body (write data) is not copied.
                if wr.write_all(&len.to_be_bytes()).await.is_err()
                    || wr.write_all(&m.head).await.is_err()
                    || wr.write_all(&m.body).await.is_err()
                {
                    return;
                }
            }
            if wr.flush().await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    tokio::spawn(async move {
        loop {
            let Ok(len) = rd.read_u32().await else {
                return;
            };
            let len = len as usize;
            if len > MAX_FRAME {
                tracing::warn!(len, "peer frame over the cap; dropping the session");
                return;
            }
            let mut buf = BytesMut::with_capacity(len);
            while buf.len() < len {
                // read_buf fills spare capacity without zeroing it first.
                match (&mut rd)
                    .take((len - buf.len()) as u64)
                    .read_buf(&mut buf)
                    .await
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            if btx.send(buf.freeze()).await.is_err() {
                return;
            }
        }
    });
    PeerSession {
        tx: SessionTx::channel(tx),
        rx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_session_carries_frames_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut acc = TcpAcceptor { listener };
        let mut con = TcpConnector { addr };
        let (a, b) = tokio::join!(con.connect(), acc.accept());
        let (a, mut b) = (a.unwrap(), b.unwrap());
        for i in 0..100u32 {
            let f = Frame {
                head: Bytes::from(i.to_be_bytes()[..2].to_vec()),
                body: Bytes::from(i.to_be_bytes()[2..].to_vec()),
            };
            a.tx.send(f).unwrap();
        }
        for i in 0..100u32 {
            assert_eq!(
                b.rx.recv().await.unwrap(),
                Bytes::from(i.to_be_bytes().to_vec())
            );
        }
        drop(a);
        assert!(
            b.rx.recv().await.is_none(),
            "session must end when the peer goes"
        );
    }
}
