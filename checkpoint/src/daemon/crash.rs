//! Crash injection for tests (`--crash-at K --crash-point P`): the primary kills its own
//! process with SIGKILL at point P of the K-th checkpoint, so a test sees what the secondary
//! keeps. The sender and receiver wrap the checkpoint channel; the commit sink, which also
//! stamps and commits the VM's shims per epoch, holds the commit-side points.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::engine::commit::{CommitSink, RecordingSink};
use crate::engine::transport::{Endpoint, FrameReceiver, FrameSender, TransportError};
use crate::shims::Shims;
use crate::wire::Frame;

/// Where in a checkpoint the primary dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Before the first frame of the checkpoint is sent.
    BeforeSend,
    /// After the checkpoint's first frame, before the rest.
    MidStream,
    /// When the secondary's ack arrives, before the primary acts on it.
    AfterAck,
    /// In the commit hook, before the commit is recorded (output not released).
    BeforeCommit,
    /// Right after the commit was recorded (output released).
    AfterCommit,
}

/// Kill the primary at `point` of its `checkpoint`-th checkpoint (1 = the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashAt {
    /// Which checkpoint, counting each once (not its re-sends).
    pub checkpoint: u64,
    /// Where in it.
    pub point: CrashPoint,
}

fn die() -> ! {
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    std::process::abort()
}

/// Which epoch number the K-th checkpoint got (0 until known).
pub(super) struct Crash {
    k: u64,
    point: CrashPoint,
    seen: AtomicU64,
    epoch: AtomicU64,
}

impl Crash {
    pub(super) fn new(at: CrashAt) -> Arc<Self> {
        Arc::new(Crash {
            k: at.checkpoint,
            point: at.point,
            seen: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
        })
    }

    /// The channel `endpoint`, dying where this crash says on the way.
    pub(super) fn wrap(self: &Arc<Self>, endpoint: Endpoint) -> Endpoint {
        let (tx, rx) = endpoint;
        (
            Box::new(CrashSender {
                inner: tx,
                crash: Arc::clone(self),
                in_target: false,
                last_epoch: 0,
            }),
            Box::new(CrashReceiver {
                inner: rx,
                crash: Arc::clone(self),
            }),
        )
    }
}

struct CrashSender {
    inner: Box<dyn FrameSender>,
    crash: Arc<Crash>,
    in_target: bool,
    last_epoch: u64,
}

impl FrameSender for CrashSender {
    fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        if self.in_target && self.crash.point == CrashPoint::MidStream {
            die();
        }
        if let Ok(Frame::Begin {
            epoch,
            checkpoint: true,
            ..
        }) = Frame::decode(&frame)
        {
            // Count each checkpoint once, not its re-sends.
            if epoch <= self.last_epoch {
                return self.inner.send(frame);
            }
            self.last_epoch = epoch;
            let n = self.crash.seen.fetch_add(1, Ordering::SeqCst) + 1;
            if n == self.crash.k {
                self.crash.epoch.store(epoch, Ordering::SeqCst);
                if self.crash.point == CrashPoint::BeforeSend {
                    die();
                }
                self.in_target = true;
            }
        }
        self.inner.send(frame)
    }
}

struct CrashReceiver {
    inner: Box<dyn FrameReceiver>,
    crash: Arc<Crash>,
}

impl FrameReceiver for CrashReceiver {
    fn recv(&mut self, timeout: Duration) -> Result<Option<Bytes>, TransportError> {
        let r = self.inner.recv(timeout)?;
        if let Some(f) = &r {
            let target = self.crash.epoch.load(Ordering::SeqCst);
            if let (Ok(Frame::Ack { epoch }), true) = (Frame::decode(f), target != 0) {
                if epoch >= target && self.crash.point == CrashPoint::AfterAck {
                    die();
                }
            }
        }
        Ok(r)
    }
}

/// The primary's commit sink: stamps and commits the VM's shims per epoch, records the
/// commits, and dies at the commit-side crash points.
pub(super) struct CrashSink {
    pub(super) inner: RecordingSink,
    pub(super) crash: Option<Arc<Crash>>,
    /// The VM's shims, stamped and committed per epoch.
    pub(super) shims: Shims,
}

impl CommitSink for CrashSink {
    fn checkpoint(&self, epoch: u64) {
        // Inside the pause: the disk writes issued from now on belong to the next epoch.
        self.shims.checkpoint(epoch);
        self.inner.checkpoint(epoch);
    }
    fn commit(&self, epoch: u64) {
        let hit = self.crash.as_ref().filter(|c| {
            let t = c.epoch.load(Ordering::SeqCst);
            t != 0 && epoch == t
        });
        if hit.is_some_and(|c| c.point == CrashPoint::BeforeCommit) {
            die();
        }
        self.shims.commit(epoch);
        self.inner.commit(epoch);
        if hit.is_some_and(|c| c.point == CrashPoint::AfterCommit) {
            die();
        }
    }
}
