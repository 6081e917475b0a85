//! The checkpoint channel over the A-link: `Channel::Checkpoint` of a [`xenft_alink::Link`].
//!
//! The engine's threads are plain threads; the adapter enters the link's tokio runtime with
//! [`Handle::block_on`], so it must not be used from inside an async task (run the engine on
//! its own threads, as [`crate::engine`] does). A `PeerRestarted` link event ends the stream
//! with [`TransportError::PeerRestarted`]: the restarted peer lost the epochs in flight, so the
//! agent restarts protection (a fresh secondary and a new pre-copy).

use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::runtime::Handle;
use tokio::sync::broadcast::error::RecvError;
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
}

impl FrameSender for AlinkSender {
    fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        self.rt
            .block_on(self.link.send(Channel::Checkpoint, frame))
            .map_err(|e| match e {
                LinkError::TooLarge { len, .. } => TransportError::TooLarge(len),
                _ => TransportError::Closed,
            })
    }
}

struct AlinkReceiver {
    rx: xenft_alink::Receiver,
    events: tokio::sync::broadcast::Receiver<LinkEvent>,
    rt: Handle,
}

impl FrameReceiver for AlinkReceiver {
    fn recv(&mut self, timeout: Duration) -> Result<Option<Bytes>, TransportError> {
        let (rx, events) = (&mut self.rx, &mut self.events);
        self.rt.block_on(async {
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
                    () = &mut sleep => return Ok(None),
                }
            }
        })
    }
}

/// The checkpoint channel of `link` as an engine [`Endpoint`]; `rt` is the runtime the link
/// runs on. Takes the link's Checkpoint receiver (once per link).
pub fn endpoint(link: &Link, rt: Handle) -> Result<Endpoint, AlinkAdapterError> {
    let events = link.subscribe();
    let rx = link
        .receiver(Channel::Checkpoint)
        .ok_or(AlinkAdapterError::ReceiverTaken)?;
    Ok((
        Box::new(AlinkSender {
            link: link.clone(),
            rt: rt.clone(),
        }),
        Box::new(AlinkReceiver { rx, events, rt }),
    ))
}
