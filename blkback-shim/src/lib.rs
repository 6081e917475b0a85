//! # xenft-blkback: the userspace block backend
//!
//! Serves a protected VM's virtual disk over NBD (the front that tapdisk or qemu's qdisk reads
//! on a Xen host) and mirrors every write synchronously to the secondary host's shim
//! (DRBD "protocol C" semantics). Keeps a durable dirty bitmap while the peer is away, resyncs
//! only dirty regions when it returns, and redirects I/O to the peer's copy when the local
//! store fails.
//!
//! Data path: VM → tapdisk/qdisk → **NBD → this crate** → local store + peer link → peer shim.
//!
//! Main types:
//! - [`nbd::server::NbdServer`]: fixed-newstyle NBD server (Unix socket or TCP) over a
//!   [`volume::Volume`];
//! - [`store::Store`] / [`store::FileStore`] / [`store::FaultyStore`]: the local copy;
//! - [`mirror::primary::Primary`]: mirrored writes, degraded mode, resync, remote mode;
//! - [`mirror::secondary::Secondary`]: in-order apply on the peer, level-3 epoch mode;
//! - [`mirror::wire::PeerMsg`]: replication messages; [`mirror::transport`]: sessions;
//! - [`status::Node`]: the agent's control socket.
//!
//! ## Agent interface
//! The binary `xenft-blkback` takes `--role local|primary|secondary`, the disk path, the NBD
//! socket, the peer address and `--control <unix socket>`. On the control socket the agent
//! sends one command per line and reads one JSON line back (see [`status`]): `status` returns
//! the link state (`degraded` / `resyncing` / `in_sync`), `dirty_bytes`, resync progress
//! (`bytes_left`, `rate_bytes_per_sec`, `eta_secs`), `local_failure` (cause of a local store
//! failure, after which the disk runs in remote mode) and counters; `resync-rate`, `epoch`,
//! `commit`, `epoch-mode`, `commit-local` and `discard` drive resync and level 3.
//! The same data is available in-process through [`mirror::primary::Primary::status`] and
//! [`mirror::secondary::Secondary::status`].

pub mod daemon;
pub mod mirror;
pub mod nbd;
pub mod status;
pub mod store;
pub mod volume;
