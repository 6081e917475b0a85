//! # xenft-blkback: the userspace block backend
//!
//! Serves a protected VM's virtual disk over NBD (the front that tapdisk or qemu's qdisk reads
//! on a Xen host) and mirrors every write synchronously to the secondary host's shim over the
//! `alink` disk channel (DRBD "protocol C" semantics). Keeps a durable dirty bitmap while the
//! peer is away, resyncs only dirty regions when it returns, and redirects I/O to the peer's
//! copy when the local store fails.
//!
//! Data path: VM → tapdisk/qdisk → **NBD → this crate** → local store + A-link → peer shim.
