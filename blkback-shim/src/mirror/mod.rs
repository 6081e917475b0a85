//! Synchronous mirroring to the peer shim (DRBD protocol C), dirty bitmap, resync, epochs.
//!
//! - [`wire`]: replication messages and their codec;
//! - [`transport`]: sessions to the peer (in-memory, TCP, and the alink adapter);
//! - [`alink`]: sessions over an `xenft-alink` link (`Channel::Disk`);
//! - [`bitmap`]: the persistent dirty bitmap and activity log;
//! - [`primary`]: the primary engine (mirrored writes, degraded mode, remote mode), with its
//!   online resync (`primary/resync.rs`) and online verify (`primary/verify.rs`);
//! - [`secondary`]: the secondary applier (in-order apply, acks, epoch mode).

pub mod alink;
pub mod bitmap;
pub mod primary;
pub mod secondary;
pub mod transport;
pub mod wire;
