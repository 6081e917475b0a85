//! The checkpoint channel as the engine sees it: ordered, reliable frames in each direction.
//!
//! Implementations: [`memory_pair`] (in-process, for tests and the benchmark),
//! [`unix_stream`] (length-prefixed frames over a Unix stream socket, used between processes),
//! [`FaultInjector`] (wraps a sender to drop, corrupt or truncate chosen frames) and
//! [`crate::alink::endpoint`] (the A-link `Channel::Checkpoint`).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;

/// Largest frame accepted from a stream (the A-link message limit).
pub const MAX_FRAME: usize = 64 << 20;

/// Failure of the checkpoint channel.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The peer is gone; no more frames will arrive.
    #[error("checkpoint channel closed by the peer")]
    Closed,
    /// I/O error on the underlying socket.
    #[error("checkpoint channel I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer process restarted and lost the stream: protection must start afresh.
    #[error("checkpoint peer restarted; the stream must start afresh")]
    PeerRestarted,
    /// A frame above [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
}

/// Sending half of the checkpoint channel.
pub trait FrameSender: Send {
    /// Queues one frame; frames arrive in order, exactly once, while the peer lives.
    fn send(&mut self, frame: Bytes) -> Result<(), TransportError>;
}

/// Receiving half of the checkpoint channel.
pub trait FrameReceiver: Send {
    /// Waits up to `timeout` for the next frame; `Ok(None)` on timeout.
    fn recv(&mut self, timeout: Duration) -> Result<Option<Bytes>, TransportError>;
}

/// In-memory sender.
pub struct MemSender(mpsc::Sender<Bytes>);
/// In-memory receiver.
pub struct MemReceiver(mpsc::Receiver<Bytes>);

impl FrameSender for MemSender {
    fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        self.0.send(frame).map_err(|_| TransportError::Closed)
    }
}

impl FrameReceiver for MemReceiver {
    fn recv(&mut self, timeout: Duration) -> Result<Option<Bytes>, TransportError> {
        match self.0.recv_timeout(timeout) {
            Ok(b) => Ok(Some(b)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(TransportError::Closed),
        }
    }
}

/// One end of a channel: what it sends and what it receives.
pub type Endpoint = (Box<dyn FrameSender>, Box<dyn FrameReceiver>);

/// Two connected in-memory endpoints (primary, secondary).
pub fn memory_pair() -> (Endpoint, Endpoint) {
    let (atx, brx) = mpsc::channel();
    let (btx, arx) = mpsc::channel();
    (
        (Box::new(MemSender(atx)), Box::new(MemReceiver(arx))),
        (Box::new(MemSender(btx)), Box::new(MemReceiver(brx))),
    )
}

/// Sender over a stream socket: `len:u32le` then the frame.
pub struct StreamSender(UnixStream);

impl FrameSender for StreamSender {
    fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        if frame.len() > MAX_FRAME {
            return Err(TransportError::TooLarge(frame.len()));
        }
        let len = u32::try_from(frame.len()).map_err(|_| TransportError::TooLarge(frame.len()))?;
        let r = self
            .0
            .write_all(&len.to_le_bytes())
            .and_then(|()| self.0.write_all(&frame));
        match r {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(TransportError::Closed),
            Err(e) => Err(e.into()),
            Ok(()) => Ok(()),
        }
    }
}

/// Receiver over a stream socket; partial frames survive timeouts.
pub struct StreamReceiver {
    sock: UnixStream,
    buf: VecDeque<u8>,
}

impl StreamReceiver {
    fn take_frame(&mut self) -> Result<Option<Bytes>, TransportError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let mut l = [0u8; 4];
        for (d, s) in l.iter_mut().zip(self.buf.iter()) {
            *d = *s;
        }
        let len = usize::try_from(u32::from_le_bytes(l)).unwrap_or(usize::MAX);
        if len > MAX_FRAME {
            return Err(TransportError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.drain(..4);
        let frame: Vec<u8> = self.buf.drain(..len).collect();
        Ok(Some(Bytes::from(frame)))
    }
}

impl FrameReceiver for StreamReceiver {
    fn recv(&mut self, timeout: Duration) -> Result<Option<Bytes>, TransportError> {
        if let Some(f) = self.take_frame()? {
            return Ok(Some(f));
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.read(&mut chunk) {
                Ok(0) => return Err(TransportError::Closed),
                Ok(n) => {
                    self.buf.extend(&chunk[..n]);
                    if let Some(f) = self.take_frame()? {
                        return Ok(Some(f));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(TransportError::Closed)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Splits a connected stream socket into a checkpoint channel endpoint.
pub fn unix_stream(sock: UnixStream) -> io::Result<Endpoint> {
    let rx = sock.try_clone()?;
    Ok((
        Box::new(StreamSender(sock)),
        Box::new(StreamReceiver {
            sock: rx,
            buf: VecDeque::new(),
        }),
    ))
}

/// What to do with one frame passing a [`FaultInjector`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Deliver it unchanged.
    Pass,
    /// Lose it.
    Drop,
    /// Flip the bits of the byte at this offset (modulo the frame length).
    Corrupt(usize),
    /// Deliver only the first this-many bytes.
    Truncate(usize),
}

/// A fault plan: frame index (from 0) and frame -> fault.
pub type FaultPlan = Box<dyn FnMut(u64, &Bytes) -> Fault + Send>;

/// Sender wrapper that damages frames according to a plan (tests).
pub struct FaultInjector {
    inner: Box<dyn FrameSender>,
    plan: FaultPlan,
    index: u64,
}

impl FaultInjector {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn FrameSender>, plan: FaultPlan) -> Self {
        Self {
            inner,
            plan,
            index: 0,
        }
    }
}

impl FrameSender for FaultInjector {
    fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        let fault = (self.plan)(self.index, &frame);
        self.index += 1;
        match fault {
            Fault::Pass => self.inner.send(frame),
            Fault::Drop => Ok(()),
            Fault::Corrupt(at) => {
                let mut v = frame.to_vec();
                if !v.is_empty() {
                    let i = at % v.len();
                    v[i] ^= 0xff;
                }
                self.inner.send(Bytes::from(v))
            }
            Fault::Truncate(n) => self.inner.send(frame.slice(..n.min(frame.len()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_frames_survive_split_writes_and_timeouts() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (_tx, mut rx) = unix_stream(a).unwrap();
        b.write_all(&5u32.to_le_bytes()).unwrap();
        b.write_all(b"he").unwrap();
        assert!(rx.recv(Duration::from_millis(20)).unwrap().is_none());
        b.write_all(b"llo").unwrap();
        b.write_all(&1u32.to_le_bytes()).unwrap();
        b.write_all(b"!").unwrap();
        assert_eq!(
            rx.recv(Duration::from_secs(1)).unwrap().unwrap(),
            &b"hello"[..]
        );
        assert_eq!(rx.recv(Duration::from_secs(1)).unwrap().unwrap(), &b"!"[..]);
        drop(b);
        assert!(matches!(
            rx.recv(Duration::from_secs(1)),
            Err(TransportError::Closed)
        ));
    }

    #[test]
    fn an_oversized_length_is_refused_before_allocating() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (_tx, mut rx) = unix_stream(a).unwrap();
        b.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            rx.recv(Duration::from_secs(1)),
            Err(TransportError::TooLarge(_))
        ));
    }

    #[test]
    fn fault_injector_damages_only_the_planned_frames() {
        let ((tx, _), (_, mut rx)) = memory_pair();
        let mut f = FaultInjector::new(
            tx,
            Box::new(|i, _| match i {
                1 => Fault::Drop,
                2 => Fault::Corrupt(0),
                3 => Fault::Truncate(2),
                _ => Fault::Pass,
            }),
        );
        for _ in 0..5 {
            f.send(Bytes::from_static(b"abcd")).unwrap();
        }
        let got: Vec<Bytes> =
            std::iter::from_fn(|| rx.recv(Duration::from_millis(10)).ok().flatten()).collect();
        assert_eq!(
            got,
            vec![
                Bytes::from_static(b"abcd"),
                Bytes::from(vec![b'a' ^ 0xff, b'b', b'c', b'd']),
                Bytes::from_static(b"ab"),
                Bytes::from_static(b"abcd"),
            ]
        );
    }
}
