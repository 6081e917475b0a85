//! The checkpoint channel over the A-link: `Channel::Checkpoint` of a [`xenft_alink::Link`].
//!
//! The engine's threads are plain threads; the adapter enters the link's tokio runtime with
//! [`Handle::block_on`], so it must not be used from inside an async task (run the engine on
//! its own threads, as [`crate::engine`] does). A `PeerRestarted` link event ends the stream
//! with [`TransportError::PeerRestarted`]: the restarted peer lost the epochs in flight, so the
//! agent restarts protection (a fresh secondary and a new pre-copy).
//!
//! A link's Checkpoint receiver can be taken once, but one process may run the engine on the
//! same link more than once: a `secondary --control` receives, takes over, then protects the
//! resumed guest toward the returning host's fresh secondary over that same link.
//! [`CheckpointChannel`] keeps the receiver for successive runs: each
//! [`CheckpointChannel::endpoint`] drops what the previous run left unread, listens for peer
//! restarts from then on only, and comes with a [`Cut`] that ends it at once (`unprotect`, a
//! peer judged gone) without shutting the link down.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::runtime::Handle;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use xenft_alink::{Channel, Link, LinkError, LinkEvent};

use crate::engine::transport::{Endpoint, FrameReceiver, FrameSender, TransportError};

/// The A-link cannot serve as a checkpoint channel.
#[derive(Debug, Error)]
pub enum AlinkAdapterError {
    /// Someone already took this link's checkpoint receiver.
    #[error("the link's Checkpoint channel receiver was already taken")]
    ReceiverTaken,
}

struct AlinkSender {
    link: Link,
    rt: Handle,
    cut: Arc<watch::Sender<bool>>,
}

impl FrameSender for AlinkSender {
    fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        let mut cut = self.cut.subscribe();
        if *cut.borrow() {
            return Err(TransportError::Closed);
        }
        let link = &self.link;
        self.rt.block_on(async {
            tokio::select! {
                r = link.send(Channel::Checkpoint, frame) => r.map_err(|e| match e {
                    LinkError::TooLarge { len, .. } => TransportError::TooLarge(len),
                    _ => TransportError::Closed,
                }),
                _ = cut.wait_for(|c| *c) => Err(TransportError::Closed),
            }
        })
    }
}

struct AlinkReceiver {
    rx: Arc<Mutex<xenft_alink::Receiver>>,
    events: tokio::sync::broadcast::Receiver<LinkEvent>,
    rt: Handle,
    cut: Arc<watch::Sender<bool>>,
    link: Link,
    /// Where the session of the peer this run hears from is noted (at its first message).
    heard: Arc<Mutex<Option<u64>>>,
    noted: bool,
}

impl FrameReceiver for AlinkReceiver {
    fn recv(&mut self, timeout: Duration) -> Result<Option<Bytes>, TransportError> {
        let mut cut = self.cut.subscribe();
        if *cut.borrow() {
            return Err(TransportError::Closed);
        }
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        let events = &mut self.events;
        let r = self.rt.block_on(async {
            let sleep = tokio::time::sleep(timeout);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    m = rx.recv() => return m.map(Some).ok_or(TransportError::Closed),
                    e = events.recv() => match e {
                        Ok(LinkEvent::PeerRestarted { .. }) => return Err(TransportError::PeerRestarted),
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return Err(TransportError::Closed),
                    },
                    _ = cut.wait_for(|c| *c) => return Err(TransportError::Closed),
                    () = &mut sleep => return Ok(None),
                }
            }
        });
        drop(rx);
        if matches!(r, Ok(Some(_))) && !self.noted {
            self.noted = true;
            *self.heard.lock().unwrap_or_else(PoisonError::into_inner) =
                self.link.status().peer_session;
        }
        r
    }
}

/// Ends one [`CheckpointChannel::endpoint`] now: its sends and receives fail with
/// [`TransportError::Closed`] (a send waiting for window space included). The link stays up.
#[derive(Clone)]
pub struct Cut(Arc<watch::Sender<bool>>);

impl Cut {
    /// Cuts the endpoint.
    pub fn cut(&self) {
        self.0.send_replace(true);
    }
}

/// The checkpoint channel of one link, for successive engine runs (see the module doc).
pub struct CheckpointChannel {
    link: Link,
    rt: Handle,
    rx: Arc<Mutex<xenft_alink::Receiver>>,
    heard: Arc<Mutex<Option<u64>>>,
}

impl CheckpointChannel {
    /// Takes `link`'s Checkpoint receiver (once per link); `rt` is the runtime the link runs
    /// on.
    ///
    /// # Errors
    /// [`AlinkAdapterError::ReceiverTaken`].
    pub fn new(link: &Link, rt: Handle) -> Result<Self, AlinkAdapterError> {
        let rx = link
            .receiver(Channel::Checkpoint)
            .ok_or(AlinkAdapterError::ReceiverTaken)?;
        Ok(Self {
            link: link.clone(),
            rt,
            rx: Arc::new(Mutex::new(rx)),
            heard: Arc::new(Mutex::new(None)),
        })
    }

    /// An endpoint for one engine run. Messages the previous run left unread are dropped
    /// (they belong to it), and only peer restarts from now on end this run. Use one run at a
    /// time: end (or [`Cut`]) the previous one first.
    pub fn endpoint(&self) -> (Endpoint, Cut) {
        let events = self.link.subscribe();
        {
            let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
            while rx.try_recv().is_some() {}
        }
        let cut = Arc::new(watch::channel(false).0);
        (
            (
                Box::new(AlinkSender {
                    link: self.link.clone(),
                    rt: self.rt.clone(),
                    cut: Arc::clone(&cut),
                }),
                Box::new(AlinkReceiver {
                    rx: Arc::clone(&self.rx),
                    events,
                    rt: self.rt.clone(),
                    cut: Arc::clone(&cut),
                    link: self.link.clone(),
                    heard: Arc::clone(&self.heard),
                    noted: false,
                }),
            ),
            Cut(cut),
        )
    }

    /// The session of the peer process the latest run heard from (its first message), if any
    /// run heard anything: a later run toward the same session would talk to a process that
    /// already played its part (an old primary, a secondary that already received).
    #[must_use]
    pub fn last_peer_session(&self) -> Option<u64> {
        *self.heard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes `session` as the peer the latest run talks to, before it heard anything (a
    /// primary run toward a known peer: that peer is then not a fresh secondary any more).
    pub fn note_peer_session(&self, session: Option<u64>) {
        *self.heard.lock().unwrap_or_else(PoisonError::into_inner) = session;
    }

    /// The link.
    #[must_use]
    pub fn link(&self) -> &Link {
        &self.link
    }
}

/// The checkpoint channel of `link` as an engine [`Endpoint`] for a single run; `rt` is the
/// runtime the link runs on. Takes the link's Checkpoint receiver (once per link).
///
/// # Errors
/// [`AlinkAdapterError::ReceiverTaken`].
pub fn endpoint(link: &Link, rt: Handle) -> Result<Endpoint, AlinkAdapterError> {
    Ok(CheckpointChannel::new(link, rt)?.endpoint().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_on_the_channel_skips_leftovers_and_a_cut_ends_it_at_once() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (l1, l2) = rt.block_on(xenft_alink::testing::loopback_pair(2)).unwrap();
        assert!(rt.block_on(l2.wait_connected(Duration::from_secs(5))));
        let ch = CheckpointChannel::new(&l2, rt.handle().clone()).unwrap();
        assert!(matches!(
            CheckpointChannel::new(&l2, rt.handle().clone()),
            Err(AlinkAdapterError::ReceiverTaken)
        ));
        let ((_tx, mut rx), _cut) = ch.endpoint();
        for m in [&b"one"[..], b"two", b"left over"] {
            rt.block_on(l1.send(Channel::Checkpoint, Bytes::from_static(m)))
                .unwrap();
        }
        let first = rx.recv(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(&first[..], b"one");
        assert!(ch.last_peer_session().is_some());
        assert_eq!(ch.last_peer_session(), l2.status().peer_session);
        assert_eq!(
            &rx.recv(Duration::from_secs(5)).unwrap().unwrap()[..],
            b"two"
        );
        // Let the leftover arrive, then end the run.
        std::thread::sleep(Duration::from_millis(300));
        drop(rx);
        let ((mut tx2, mut rx2), cut2) = ch.endpoint();
        assert!(rx2.recv(Duration::from_millis(200)).unwrap().is_none());
        rt.block_on(l1.send(Channel::Checkpoint, Bytes::from_static(b"fresh")))
            .unwrap();
        assert_eq!(
            &rx2.recv(Duration::from_secs(5)).unwrap().unwrap()[..],
            b"fresh"
        );
        tx2.send(Bytes::from_static(b"to l1")).unwrap();
        cut2.cut();
        assert!(matches!(
            rx2.recv(Duration::from_secs(5)),
            Err(TransportError::Closed)
        ));
        assert!(matches!(
            tx2.send(Bytes::from_static(b"x")),
            Err(TransportError::Closed)
        ));
        // The link itself is still up.
        assert!(l2.is_connected());
    }
}
