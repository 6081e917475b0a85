//! The tunnel between the two hosts' shims for one VM, used when the primary's uplink fails.
//!
//! Messages (one per transport message; the transport keeps them whole and in order):
//!
//! ```text
//! byte 0: version (1)   byte 1: kind   bytes 2..8: VM MAC   bytes 8..: payload
//! kind 1 RedirectStart  "my uplink is down, carry frames of this MAC for me" (no payload)
//! kind 2 RedirectStop   "my uplink is back" (no payload)
//! kind 3 FromVm         a frame the VM sent, for the peer's uplink   (payload: virtio_net_hdr + frame)
//! kind 4 ToVm           a frame from the peer's uplink, for the VM   (payload: virtio_net_hdr + frame)
//! kind 5 UplinkStatus   one byte: 1 when the sender's uplink received frames recently, else 0
//! ```
//!
//! Frames keep their `virtio_net_hdr` (see [`crate::frame::VnetHdr`]) so that offloaded frames
//! (partial checksums, GSO super-frames) are completed by the kernel of the host that finally
//! transmits them; the receiver checks them exactly as frames from its own sockets.
//!
//! The transport is a trait so the relay is tested with an in-memory pair; the A-link adapter
//! implements it over `Channel::Net`.

use std::sync::mpsc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::MacAddr;

const VERSION: u8 = 1;
const HEADER_LEN: usize = 8;

/// One tunnel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelMsg {
    /// The sender's uplink is down: carry this MAC's frames.
    RedirectStart(MacAddr),
    /// The sender's uplink is back.
    RedirectStop(MacAddr),
    /// A frame sent by the VM, to be put on the receiver's uplink.
    FromVm(MacAddr, Bytes),
    /// A frame for the VM, received on the sender's uplink.
    ToVm(MacAddr, Bytes),
    /// Whether the sender's uplink received frames recently (sent periodically).
    UplinkStatus(MacAddr, bool),
}

/// A tunnel message that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelDecodeError {
    /// Shorter than the 8-byte header.
    #[error("tunnel message of {0} bytes is shorter than its header")]
    Short(usize),
    /// Unknown version byte.
    #[error("tunnel message version {0} is not supported")]
    Version(u8),
    /// Unknown kind byte.
    #[error("tunnel message kind {0} is unknown")]
    Kind(u8),
    /// A control message with a payload, or a frame message without one.
    #[error("tunnel message kind {kind} has a payload of {len} bytes")]
    Payload {
        /// The kind.
        kind: u8,
        /// The payload length.
        len: usize,
    },
}

impl TunnelMsg {
    /// Encodes the message.
    #[must_use]
    pub fn encode(&self) -> Bytes {
        let (kind, mac, payload): (u8, &MacAddr, &[u8]) = match self {
            TunnelMsg::RedirectStart(m) => (1, m, &[]),
            TunnelMsg::RedirectStop(m) => (2, m, &[]),
            TunnelMsg::FromVm(m, f) => (3, m, f),
            TunnelMsg::ToVm(m, f) => (4, m, f),
            TunnelMsg::UplinkStatus(m, alive) => (5, m, if *alive { &[1] } else { &[0] }),
        };
        let mut b = BytesMut::with_capacity(HEADER_LEN + payload.len());
        b.put_u8(VERSION);
        b.put_u8(kind);
        b.put_slice(&mac.0);
        b.put_slice(payload);
        b.freeze()
    }

    /// Decodes a message. Frame payloads are NOT validated here (the relay checks them as it
    /// checks any frame).
    ///
    /// # Errors
    /// [`TunnelDecodeError`] naming what is wrong.
    pub fn decode(msg: &Bytes) -> Result<TunnelMsg, TunnelDecodeError> {
        if msg.len() < HEADER_LEN {
            return Err(TunnelDecodeError::Short(msg.len()));
        }
        if msg[0] != VERSION {
            return Err(TunnelDecodeError::Version(msg[0]));
        }
        let kind = msg[1];
        let mac = MacAddr::from_slice(&msg[2..8]).ok_or(TunnelDecodeError::Short(msg.len()))?;
        let payload = msg.slice(HEADER_LEN..);
        let bad_payload = TunnelDecodeError::Payload {
            kind,
            len: payload.len(),
        };
        match kind {
            1 | 2 if !payload.is_empty() => Err(bad_payload),
            1 => Ok(TunnelMsg::RedirectStart(mac)),
            2 => Ok(TunnelMsg::RedirectStop(mac)),
            3 | 4 if payload.is_empty() => Err(bad_payload),
            3 => Ok(TunnelMsg::FromVm(mac, payload)),
            4 => Ok(TunnelMsg::ToVm(mac, payload)),
            5 => match payload.as_ref() {
                [0] => Ok(TunnelMsg::UplinkStatus(mac, false)),
                [1] => Ok(TunnelMsg::UplinkStatus(mac, true)),
                _ => Err(bad_payload),
            },
            k => Err(TunnelDecodeError::Kind(k)),
        }
    }
}

/// The transport's sending half. Sending must not block for long: the relay calls it from its
/// forwarding threads. Received messages are handed to [`crate::Shim::on_tunnel_message`] by
/// whoever owns the receiving half.
pub trait TunnelTransport: Send + Sync + 'static {
    /// Queues one message for the peer.
    ///
    /// # Errors
    /// When the transport is closed or its queue is full; the relay counts the frame as dropped.
    fn send(&self, msg: Bytes) -> Result<(), TunnelSendError>;
}

/// The transport refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelSendError {
    /// The peer end is gone.
    #[error("tunnel closed")]
    Closed,
    /// The queue is full.
    #[error("tunnel queue full")]
    Full,
}

/// One end of an in-memory tunnel: a bounded queue to the other end.
#[derive(Debug)]
pub struct MemoryTunnel {
    tx: mpsc::SyncSender<Bytes>,
}

impl TunnelTransport for MemoryTunnel {
    fn send(&self, msg: Bytes) -> Result<(), TunnelSendError> {
        self.tx.try_send(msg).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => TunnelSendError::Full,
            mpsc::TrySendError::Disconnected(_) => TunnelSendError::Closed,
        })
    }
}

/// Two connected in-memory tunnel ends, each with the receiver of messages sent by the other:
/// `(a_sender, a_inbox, b_sender, b_inbox)`; what `a_sender` sends arrives in `b_inbox`.
#[must_use]
pub fn memory_pair(
    depth: usize,
) -> (
    MemoryTunnel,
    mpsc::Receiver<Bytes>,
    MemoryTunnel,
    mpsc::Receiver<Bytes>,
) {
    let (a_tx, b_rx) = mpsc::sync_channel(depth);
    let (b_tx, a_rx) = mpsc::sync_channel(depth);
    (
        MemoryTunnel { tx: a_tx },
        a_rx,
        MemoryTunnel { tx: b_tx },
        b_rx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: MacAddr = MacAddr([2, 0, 0, 0, 0, 5]);

    #[test]
    fn every_message_kind_round_trips() {
        for msg in [
            TunnelMsg::RedirectStart(M),
            TunnelMsg::RedirectStop(M),
            TunnelMsg::FromVm(M, Bytes::from_static(b"0123456789abcdef")),
            TunnelMsg::ToVm(M, Bytes::from_static(b"fedcba9876543210")),
            TunnelMsg::UplinkStatus(M, true),
            TunnelMsg::UplinkStatus(M, false),
        ] {
            assert_eq!(TunnelMsg::decode(&msg.encode()), Ok(msg));
        }
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert_eq!(
            TunnelMsg::decode(&Bytes::from_static(b"abc")),
            Err(TunnelDecodeError::Short(3))
        );
        assert_eq!(
            TunnelMsg::decode(&Bytes::from_static(&[9, 1, 0, 0, 0, 0, 0, 0])),
            Err(TunnelDecodeError::Version(9))
        );
        assert_eq!(
            TunnelMsg::decode(&Bytes::from_static(&[1, 7, 0, 0, 0, 0, 0, 0])),
            Err(TunnelDecodeError::Kind(7))
        );
        assert!(matches!(
            TunnelMsg::decode(&Bytes::from_static(&[1, 1, 0, 0, 0, 0, 0, 0, 1])),
            Err(TunnelDecodeError::Payload { .. })
        ));
        assert!(matches!(
            TunnelMsg::decode(&Bytes::from_static(&[1, 3, 0, 0, 0, 0, 0, 0])),
            Err(TunnelDecodeError::Payload { .. })
        ));
        assert!(matches!(
            TunnelMsg::decode(&Bytes::from_static(&[1, 5, 0, 0, 0, 0, 0, 0, 2])),
            Err(TunnelDecodeError::Payload { .. })
        ));
    }

    #[test]
    fn memory_pair_delivers_to_the_other_end_and_bounds_its_queue() {
        let (a, a_in, b, b_in) = memory_pair(1);
        a.send(Bytes::from_static(b"x")).unwrap();
        assert_eq!(a.send(Bytes::from_static(b"y")), Err(TunnelSendError::Full));
        assert_eq!(b_in.recv().unwrap(), Bytes::from_static(b"x"));
        b.send(Bytes::from_static(b"z")).unwrap();
        assert_eq!(a_in.recv().unwrap(), Bytes::from_static(b"z"));
    }
}
