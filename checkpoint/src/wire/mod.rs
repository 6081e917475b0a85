//! Checkpoint stream wire format, the page encoder (primary) and the epoch assembler
//! (secondary).
//!
//! An epoch is a sequence of frames, each one transport message:
//!
//! ```text
//! frame  = "XC" version:u8 kind:u8 body          (all integers little endian)
//! Begin  (1): epoch:u64 memory_pages:u64 page_count:u64 flags:u8   flags bit0 = checkpoint
//! Vcpu   (2): len:u32 bytes[len]                                   checkpoint epochs only
//! Pages  (3): runs:u32 { first_pfn:u64 count:u32 encoding:u8 len:u32 bytes[len] }*
//! End    (4): epoch:u64 checksum:u64 has_digest:u8 digest:u64
//! Ack    (5): epoch:u64                                            secondary -> primary
//! Nack   (6): expected:u64 reason:u8                               secondary -> primary
//! ```
//!
//! `checksum` is XXH3-64 over the bytes of every frame of the epoch before `End`. A run covers
//! `count` consecutive pages; its encoding is `Zero` (no bytes), `Raw` (the pages) or `XorLz4`
//! (LZ4 block of the pages XOR the copy last sent, which is what the secondary holds).
//! Epochs without the checkpoint flag are pre-copy chunks: pages only, no vCPU state, never a
//! resumable state on their own.
//!
//! # Modules
//! Every item is used from here (`wire::Frame`, ...); the files split it by concern:
//! - `frame`: the frames ([`Frame`], [`PageRun`], [`Encoding`], [`NackReason`]) and their
//!   byte layout: encoding and validating decoding.
//! - `error`: [`WireError`], bad bytes on the stream, and the `Nack` reason each gives.
//! - `encoder`: the primary's [`EpochEncoder`], staged pages to frames (zero / XOR + LZ4 / raw).
//! - `assembler`: the secondary's [`EpochAssembler`], frames to a verified [`CompleteEpoch`].
//! - `apply`: writing a verified epoch into the replica ([`apply_epoch`]), whole or not at
//!   all, and the whole-memory digest of verification mode ([`memory_digest`]).

mod apply;
mod assembler;
mod encoder;
mod error;
mod frame;
#[cfg(test)]
mod tests;

pub use apply::{apply_epoch, memory_digest, ApplyError};
pub use assembler::{CompleteEpoch, EpochAssembler, Fed};
pub use encoder::{EncodedEpoch, EpochEncoder, StagedEpoch};
pub use error::WireError;
pub use frame::{Encoding, Frame, NackReason, PageRun, MAX_RUN_PAGES, TARGET_FRAME_BYTES, VERSION};
