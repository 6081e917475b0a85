//! Replication messages between the primary and the secondary shim (one message per A-link
//! frame on `Channel::Disk`).
//!
//! Every message the primary sends carries a sequence number `seq`, assigned in the order the
//! primary applied the operation to its own store; the secondary applies messages strictly in
//! that order and acknowledges with a cumulative [`PeerMsg::Ack`] ("everything up to `seq` is
//! done"), which makes overlapping writes land in the same order on both sides.
//!
//! Layout: one type byte, then the fields in declaration order, big-endian, `data` last with
//! its length implied by the frame. Decoding rejects unknown types, short or trailing bytes and
//! payloads over [`MAX_DATA`] with a [`WireError`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest data payload of one message (the NBD maximum block size).
pub const MAX_DATA: usize = 32 * 1024 * 1024;
/// Protocol version carried in [`PeerMsg::Hello`].
pub const VERSION: u16 = 2;

/// Flag: the write must be durable on the secondary before it is acknowledged (NBD FUA).
pub const FLAG_FUA: u8 = 1 << 0;
/// Flag: the message is resync traffic, not a client write (counted separately).
pub const FLAG_RESYNC: u8 = 1 << 1;
/// Flag ([`PeerMsg::Zero`] only): the range may be deallocated (TRIM / hole).
pub const FLAG_PUNCH: u8 = 1 << 2;

/// What the secondary knows about its own copy, announced in [`PeerMsg::Hello`].
pub use xenft_control::blkback::PeerDiskState;

/// One replication message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMsg {
    /// Secondary → primary, first message of a session.
    Hello {
        /// [`VERSION`].
        version: u16,
        /// Secondary store size in bytes (must equal the primary's).
        size: u64,
        /// State of the secondary's copy.
        state: PeerDiskState,
    },
    /// Primary → secondary: write `data` at `offset`.
    Write {
        /// Sequence number.
        seq: u64,
        /// Checkpoint epoch the write belongs to (level 3; 0 otherwise).
        epoch: u64,
        /// Byte offset.
        offset: u64,
        /// `FLAG_*` bits.
        flags: u8,
        /// The bytes.
        data: Bytes,
    },
    /// Primary → secondary: make `[offset, offset+len)` read as zeroes.
    Zero {
        /// Sequence number.
        seq: u64,
        /// Checkpoint epoch.
        epoch: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// `FLAG_*` bits.
        flags: u8,
    },
    /// Primary → secondary: make everything before this durable.
    Flush {
        /// Sequence number.
        seq: u64,
    },
    /// Primary → secondary: a resync starts; the secondary's copy is inconsistent until the
    /// matching [`PeerMsg::ResyncEnd`].
    ResyncBegin {
        /// Sequence number.
        seq: u64,
        /// Full (initial) sync rather than dirty regions only.
        full: bool,
    },
    /// Primary → secondary: resync complete; the copy is consistent once this is acknowledged.
    ResyncEnd {
        /// Sequence number.
        seq: u64,
    },
    /// Primary → secondary: level-3 epoch `epoch` is committed; apply its held writes.
    EpochCommit {
        /// Sequence number.
        seq: u64,
        /// The committed epoch.
        epoch: u64,
    },
    /// Secondary → primary: every message with sequence ≤ `seq` is applied.
    Ack {
        /// Highest applied sequence number.
        seq: u64,
    },
    /// Secondary → primary: the message `seq` could not be applied (its store failed).
    Fail {
        /// The failed message.
        seq: u64,
        /// Human-readable cause.
        reason: String,
    },
    /// Primary → secondary: read `[offset, offset+len)` (remote mode, local store failed).
    ReadReq {
        /// Request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length (≤ [`MAX_DATA`]).
        len: u32,
    },
    /// Secondary → primary: answer to [`PeerMsg::ReadReq`]; empty `data` with `ok == false` on
    /// failure.
    ReadResp {
        /// Request id.
        id: u64,
        /// Whether the read succeeded.
        ok: bool,
        /// The bytes.
        data: Bytes,
    },
    /// Primary → secondary: checksum `[offset, offset+len)` in blocks of `block` bytes
    /// (online verify; ordered with writes like everything else).
    VerifyReq {
        /// Request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length (≤ [`MAX_DATA`]).
        len: u32,
        /// Block size (> 0).
        block: u32,
    },
    /// Secondary → primary: one checksum per block; empty on failure.
    VerifyResp {
        /// Request id.
        id: u64,
        /// Checksums.
        sums: Vec<u64>,
    },
    /// Secondary → primary, right after [`PeerMsg::Hello`]: the regions this host may have
    /// written as a primary that its peer never acknowledged (its dirty bitmap with its active
    /// activity-log extents folded in), for a dirty-only resync after a failover. `lineage` 0
    /// with no bits: nothing to report.
    DirtyReport {
        /// Lineage id of the bitmap the bits come from (see [`PeerMsg::Lineage`]).
        lineage: u64,
        /// Dirty bitmap bytes (chunk `i` in byte `i / 8`, bit `i % 8`).
        bits: Bytes,
    },
    /// Primary → secondary at the start of a session: the lineage id of the primary's bitmap.
    /// A secondary stopped cleanly while consistent leaves a bitmap for its own promotion that
    /// accepts a [`PeerMsg::DirtyReport`] of this lineage only.
    Lineage {
        /// The primary bitmap's lineage id.
        id: u64,
    },
}

/// The checksum used by online verify: the first 8 bytes of SHA-256.
#[must_use]
pub fn block_checksum(data: &[u8]) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(data);
    u64::from_be_bytes(d[..8].try_into().unwrap_or_default())
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Frame shorter than its type requires.
    #[error("truncated message (type {0})")]
    Truncated(u8),
    /// Unknown type byte.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// Extra bytes after a fixed-size message.
    #[error("{0} trailing bytes after message type {1}")]
    Trailing(usize, u8),
    /// Data larger than [`MAX_DATA`] or a length field over it.
    #[error("payload of {0} bytes over the {MAX_DATA} byte cap")]
    TooLarge(u64),
    /// Invalid enum or bool byte, or non-UTF-8 text.
    #[error("invalid field value in message type {0}")]
    BadField(u8),
    /// Empty frame.
    #[error("empty frame")]
    Empty,
}

const T_HELLO: u8 = 1;
const T_WRITE: u8 = 2;
const T_ZERO: u8 = 3;
const T_FLUSH: u8 = 4;
const T_RESYNC_BEGIN: u8 = 5;
const T_RESYNC_END: u8 = 6;
const T_EPOCH_COMMIT: u8 = 7;
const T_ACK: u8 = 8;
const T_FAIL: u8 = 9;
const T_READ_REQ: u8 = 10;
const T_READ_RESP: u8 = 11;
const T_VERIFY_REQ: u8 = 12;
const T_VERIFY_RESP: u8 = 13;
const T_DIRTY_REPORT: u8 = 14;
const T_LINEAGE: u8 = 15;

/// One encoded message as it goes to a transport: a small header and a bulk body (the data of
/// a write or read reply), kept apart so transports can send the body without copying it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frame {
    /// Type byte and fixed fields.
    pub head: Bytes,
    /// Bulk data (may be empty).
    pub body: Bytes,
}

impl Frame {
    /// Total length.
    #[must_use]
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Whether the frame is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame as one contiguous buffer (copies when there is a body).
    #[must_use]
    pub fn to_bytes(&self) -> Bytes {
        if self.body.is_empty() {
            return self.head.clone();
        }
        let mut b = BytesMut::with_capacity(self.len());
        b.put_slice(&self.head);
        b.put_slice(&self.body);
        b.freeze()
    }
}

impl From<Bytes> for Frame {
    fn from(head: Bytes) -> Self {
        Self {
            head,
            body: Bytes::new(),
        }
    }
}

impl PeerMsg {
    /// Encodes into one contiguous frame.
    #[must_use]
    pub fn encode(&self) -> Bytes {
        self.frame().to_bytes()
    }

    /// Encodes into a [`Frame`] without copying bulk data.
    #[must_use]
    pub fn frame(&self) -> Frame {
        let mut b = BytesMut::with_capacity(64);
        let mut body = Bytes::new();
        match self {
            Self::Hello {
                version,
                size,
                state,
            } => {
                b.put_u8(T_HELLO);
                b.put_u16(*version);
                b.put_u64(*size);
                b.put_u8(match state {
                    PeerDiskState::Fresh => 0,
                    PeerDiskState::Inconsistent => 1,
                    PeerDiskState::Consistent => 2,
                });
            }
            Self::Write {
                seq,
                epoch,
                offset,
                flags,
                data,
            } => {
                b.put_u8(T_WRITE);
                b.put_u64(*seq);
                b.put_u64(*epoch);
                b.put_u64(*offset);
                b.put_u8(*flags);
                body = data.clone();
            }
            Self::Zero {
                seq,
                epoch,
                offset,
                len,
                flags,
            } => {
                b.put_u8(T_ZERO);
                b.put_u64(*seq);
                b.put_u64(*epoch);
                b.put_u64(*offset);
                b.put_u64(*len);
                b.put_u8(*flags);
            }
            Self::Flush { seq } => {
                b.put_u8(T_FLUSH);
                b.put_u64(*seq);
            }
            Self::ResyncBegin { seq, full } => {
                b.put_u8(T_RESYNC_BEGIN);
                b.put_u64(*seq);
                b.put_u8(u8::from(*full));
            }
            Self::ResyncEnd { seq } => {
                b.put_u8(T_RESYNC_END);
                b.put_u64(*seq);
            }
            Self::EpochCommit { seq, epoch } => {
                b.put_u8(T_EPOCH_COMMIT);
                b.put_u64(*seq);
                b.put_u64(*epoch);
            }
            Self::Ack { seq } => {
                b.put_u8(T_ACK);
                b.put_u64(*seq);
            }
            Self::Fail { seq, reason } => {
                b.put_u8(T_FAIL);
                b.put_u64(*seq);
                b.put_slice(reason.as_bytes());
            }
            Self::ReadReq { id, offset, len } => {
                b.put_u8(T_READ_REQ);
                b.put_u64(*id);
                b.put_u64(*offset);
                b.put_u32(*len);
            }
            Self::ReadResp { id, ok, data } => {
                b.put_u8(T_READ_RESP);
                b.put_u64(*id);
                b.put_u8(u8::from(*ok));
                body = data.clone();
            }
            Self::VerifyReq {
                id,
                offset,
                len,
                block,
            } => {
                b.put_u8(T_VERIFY_REQ);
                b.put_u64(*id);
                b.put_u64(*offset);
                b.put_u32(*len);
                b.put_u32(*block);
            }
            Self::DirtyReport { lineage, bits } => {
                b.put_u8(T_DIRTY_REPORT);
                b.put_u64(*lineage);
                body = bits.clone();
            }
            Self::Lineage { id } => {
                b.put_u8(T_LINEAGE);
                b.put_u64(*id);
            }
            Self::VerifyResp { id, sums } => {
                b.reserve(sums.len() * 8 + 16);
                b.put_u8(T_VERIFY_RESP);
                b.put_u64(*id);
                for s in sums {
                    b.put_u64(*s);
                }
            }
        }
        Frame {
            head: b.freeze(),
            body,
        }
    }

    /// Decodes one frame.
    pub fn decode(mut f: Bytes) -> Result<Self, WireError> {
        if f.is_empty() {
            return Err(WireError::Empty);
        }
        let t = f.get_u8();
        let need = |f: &Bytes, n: usize| {
            if f.remaining() < n {
                Err(WireError::Truncated(t))
            } else {
                Ok(())
            }
        };
        let done = |f: &Bytes| {
            if f.has_remaining() {
                Err(WireError::Trailing(f.remaining(), t))
            } else {
                Ok(())
            }
        };
        let flag = |v: u8| match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::BadField(t)),
        };
        let data_cap = |f: &Bytes| {
            if f.remaining() > MAX_DATA {
                Err(WireError::TooLarge(f.remaining() as u64))
            } else {
                Ok(())
            }
        };
        let msg = match t {
            T_HELLO => {
                need(&f, 11)?;
                let version = f.get_u16();
                let size = f.get_u64();
                let state = match f.get_u8() {
                    0 => PeerDiskState::Fresh,
                    1 => PeerDiskState::Inconsistent,
                    2 => PeerDiskState::Consistent,
                    _ => return Err(WireError::BadField(t)),
                };
                done(&f)?;
                Self::Hello {
                    version,
                    size,
                    state,
                }
            }
            T_WRITE => {
                need(&f, 25)?;
                let seq = f.get_u64();
                let epoch = f.get_u64();
                let offset = f.get_u64();
                let flags = f.get_u8();
                data_cap(&f)?;
                Self::Write {
                    seq,
                    epoch,
                    offset,
                    flags,
                    data: f,
                }
            }
            T_ZERO => {
                need(&f, 33)?;
                let m = Self::Zero {
                    seq: f.get_u64(),
                    epoch: f.get_u64(),
                    offset: f.get_u64(),
                    len: f.get_u64(),
                    flags: f.get_u8(),
                };
                done(&f)?;
                m
            }
            T_FLUSH | T_RESYNC_END | T_ACK => {
                need(&f, 8)?;
                let seq = f.get_u64();
                done(&f)?;
                match t {
                    T_FLUSH => Self::Flush { seq },
                    T_RESYNC_END => Self::ResyncEnd { seq },
                    _ => Self::Ack { seq },
                }
            }
            T_RESYNC_BEGIN => {
                need(&f, 9)?;
                let seq = f.get_u64();
                let full = flag(f.get_u8())?;
                done(&f)?;
                Self::ResyncBegin { seq, full }
            }
            T_EPOCH_COMMIT => {
                need(&f, 16)?;
                let m = Self::EpochCommit {
                    seq: f.get_u64(),
                    epoch: f.get_u64(),
                };
                done(&f)?;
                m
            }
            T_FAIL => {
                need(&f, 8)?;
                let seq = f.get_u64();
                if f.remaining() > 4096 {
                    return Err(WireError::TooLarge(f.remaining() as u64));
                }
                let reason = String::from_utf8(f.to_vec()).map_err(|_| WireError::BadField(t))?;
                Self::Fail { seq, reason }
            }
            T_READ_REQ => {
                need(&f, 20)?;
                let id = f.get_u64();
                let offset = f.get_u64();
                let len = f.get_u32();
                done(&f)?;
                if len as usize > MAX_DATA {
                    return Err(WireError::TooLarge(u64::from(len)));
                }
                Self::ReadReq { id, offset, len }
            }
            T_READ_RESP => {
                need(&f, 9)?;
                let id = f.get_u64();
                let ok = flag(f.get_u8())?;
                data_cap(&f)?;
                Self::ReadResp { id, ok, data: f }
            }
            T_VERIFY_REQ => {
                need(&f, 24)?;
                let id = f.get_u64();
                let offset = f.get_u64();
                let len = f.get_u32();
                let block = f.get_u32();
                done(&f)?;
                if len as usize > MAX_DATA {
                    return Err(WireError::TooLarge(u64::from(len)));
                }
                if block == 0 {
                    return Err(WireError::BadField(t));
                }
                Self::VerifyReq {
                    id,
                    offset,
                    len,
                    block,
                }
            }
            T_DIRTY_REPORT => {
                need(&f, 8)?;
                let lineage = f.get_u64();
                data_cap(&f)?;
                Self::DirtyReport { lineage, bits: f }
            }
            T_LINEAGE => {
                need(&f, 8)?;
                let id = f.get_u64();
                done(&f)?;
                Self::Lineage { id }
            }
            T_VERIFY_RESP => {
                need(&f, 8)?;
                let id = f.get_u64();
                data_cap(&f)?;
                if !f.remaining().is_multiple_of(8) {
                    return Err(WireError::Trailing(f.remaining() % 8, t));
                }
                let mut sums = Vec::with_capacity(f.remaining() / 8);
                while f.has_remaining() {
                    sums.push(f.get_u64());
                }
                Self::VerifyResp { id, sums }
            }
            other => return Err(WireError::UnknownType(other)),
        };
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_msg() -> impl Strategy<Value = PeerMsg> {
        let data = proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Bytes::from);
        prop_oneof![
            (any::<u64>(), data.clone())
                .prop_map(|(lineage, bits)| PeerMsg::DirtyReport { lineage, bits }),
            any::<u64>().prop_map(|id| PeerMsg::Lineage { id }),
            (any::<u16>(), any::<u64>(), 0u8..3).prop_map(|(version, size, s)| PeerMsg::Hello {
                version,
                size,
                state: [
                    PeerDiskState::Fresh,
                    PeerDiskState::Inconsistent,
                    PeerDiskState::Consistent
                ][usize::from(s)],
            }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u8>(),
                data.clone()
            )
                .prop_map(|(seq, epoch, offset, flags, data)| PeerMsg::Write {
                    seq,
                    epoch,
                    offset,
                    flags,
                    data
                }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u8>()
            )
                .prop_map(|(seq, epoch, offset, len, flags)| PeerMsg::Zero {
                    seq,
                    epoch,
                    offset,
                    len,
                    flags
                }),
            any::<u64>().prop_map(|seq| PeerMsg::Flush { seq }),
            (any::<u64>(), any::<bool>())
                .prop_map(|(seq, full)| PeerMsg::ResyncBegin { seq, full }),
            any::<u64>().prop_map(|seq| PeerMsg::ResyncEnd { seq }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(seq, epoch)| PeerMsg::EpochCommit { seq, epoch }),
            any::<u64>().prop_map(|seq| PeerMsg::Ack { seq }),
            (any::<u64>(), "[a-z ]{0,64}").prop_map(|(seq, reason)| PeerMsg::Fail { seq, reason }),
            (any::<u64>(), any::<u64>(), 0u32..=32 * 1024 * 1024)
                .prop_map(|(id, offset, len)| PeerMsg::ReadReq { id, offset, len }),
            (any::<u64>(), any::<u64>(), 0u32..=32 * 1024 * 1024, 1u32..).prop_map(
                |(id, offset, len, block)| PeerMsg::VerifyReq {
                    id,
                    offset,
                    len,
                    block
                }
            ),
            (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..64))
                .prop_map(|(id, sums)| PeerMsg::VerifyResp { id, sums }),
            (any::<u64>(), any::<bool>(), data).prop_map(|(id, ok, data)| PeerMsg::ReadResp {
                id,
                ok,
                data
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_roundtrips(m in arb_msg()) {
            prop_assert_eq!(PeerMsg::decode(m.encode()).unwrap(), m);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = PeerMsg::decode(Bytes::from(b));
        }

        #[test]
        fn truncated_fixed_messages_are_rejected(m in arb_msg(), cut in 1usize..8) {
            let enc = m.encode();
            let fixed = !matches!(m, PeerMsg::Write { .. } | PeerMsg::ReadResp { .. } | PeerMsg::Fail { .. } | PeerMsg::VerifyResp { .. } | PeerMsg::DirtyReport { .. });
            if fixed && cut < enc.len() {
                prop_assert!(PeerMsg::decode(enc.slice(..enc.len() - cut)).is_err());
            }
        }
    }

    #[test]
    fn unknown_type_and_bad_state_are_typed_errors() {
        assert_eq!(
            PeerMsg::decode(Bytes::from_static(&[99])),
            Err(WireError::UnknownType(99))
        );
        let mut h = PeerMsg::Hello {
            version: 1,
            size: 1,
            state: PeerDiskState::Fresh,
        }
        .encode()
        .to_vec();
        *h.last_mut().unwrap() = 7;
        assert_eq!(
            PeerMsg::decode(Bytes::from(h)),
            Err(WireError::BadField(T_HELLO))
        );
        assert_eq!(PeerMsg::decode(Bytes::new()), Err(WireError::Empty));
    }
}
