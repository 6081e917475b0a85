//! The tunnel over the A-link: [`TunnelMsg`](crate::tunnel::TunnelMsg)s travel on
//! `Channel::Net` of an `xenft_alink::Link` (reliable, ordered, authenticated).
//!
//! [`attach`] joins a [`Shim`] to a link: a bounded queue and a tokio task carry outgoing
//! messages (the relay threads never wait on the network), and a dedicated thread hands
//! incoming messages to [`Shim::on_tunnel_message`] (on the relay's real-time priority when it
//! has one, since it takes the relay's lock). Undecodable messages from the peer are counted by
//! the shim as `tunnel_garbage`.
//!
//! If the peer process restarts, unacknowledged messages are lost; the relay re-sends its
//! redirect request every second while it redirects, so the peer resynchronises by itself.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use xenft_alink::{Channel, Link};

use crate::tunnel::{TunnelSendError, TunnelTransport};
use crate::Shim;

/// Messages queued towards the link before the relay counts frames as dropped.
pub const QUEUE_DEPTH: usize = 4096;

/// The sending half: a bounded queue drained into the link by a task.
#[derive(Debug, Clone)]
pub struct AlinkTunnel {
    tx: mpsc::Sender<Bytes>,
}

impl TunnelTransport for AlinkTunnel {
    fn send(&self, msg: Bytes) -> Result<(), TunnelSendError> {
        self.tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TunnelSendError::Full,
            mpsc::error::TrySendError::Closed(_) => TunnelSendError::Closed,
        })
    }
}

/// Why a shim cannot be attached to a link.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Someone already took the link's Net channel receiver.
    #[error("the A-link's Net channel receiver was already taken")]
    ReceiverTaken,
    /// The receiving thread could not start.
    #[error("cannot start the tunnel receiver thread: {0}")]
    Thread(std::io::Error),
}

/// A shim joined to a link; dropping it detaches (stops both directions).
#[derive(Debug)]
pub struct Attachment {
    stop: watch::Sender<bool>,
    sender: tokio::task::JoinHandle<()>,
    receiver: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.sender.abort();
        if let Some(h) = self.receiver.take() {
            let _ = h.join();
        }
    }
}

/// Joins `shim` to its peer over `link`'s Net channel, using `rt` for the link's I/O. Sets the
/// shim's tunnel.
///
/// # Errors
/// [`AttachError::ReceiverTaken`] when the Net receiver is gone, [`AttachError::Thread`].
pub fn attach(
    shim: Arc<Shim>,
    link: &Link,
    rt: &tokio::runtime::Handle,
) -> Result<Attachment, AttachError> {
    let mut rx = link
        .receiver(Channel::Net)
        .ok_or(AttachError::ReceiverTaken)?;
    let (tx, mut queue) = mpsc::channel::<Bytes>(QUEUE_DEPTH);
    let (stop, mut stop_rx) = watch::channel(false);
    let out_link = link.clone();
    let sender = rt.spawn(async move {
        while let Some(msg) = queue.recv().await {
            if let Err(e) = out_link.send(Channel::Net, msg).await {
                tracing::warn!(error = %e, "A-link refused a tunnel message");
                if matches!(e, xenft_alink::LinkError::Closed) {
                    return;
                }
            }
        }
    });
    shim.set_tunnel(Arc::new(AlinkTunnel { tx }));
    let rt = rt.clone();
    let receiver = std::thread::Builder::new()
        .name("netback-alink-rx".into())
        .spawn(move || {
            if let Some(p) = shim.realtime_priority() {
                let _ = crate::sys::set_realtime_priority(p);
            }
            loop {
                let next = rt.block_on(async {
                    tokio::select! {
                        m = rx.recv() => m,
                        _ = stop_rx.wait_for(|s| *s) => None,
                    }
                });
                match next {
                    Some(msg) => shim.on_tunnel_message(&msg),
                    None => return,
                }
            }
        })
        .map_err(AttachError::Thread)?;
    Ok(Attachment {
        stop,
        sender,
        receiver: Some(receiver),
    })
}
