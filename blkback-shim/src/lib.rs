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
//!   [`volume::Volume`]; [`nbd::proto`] mirrors the spec's names; [`nbd::client`] is a minimal
//!   client for tests and benchmarks;
//! - [`store::Store`] / [`store::FileStore`] / [`store::FaultyStore`]: the local copy;
//! - [`mirror::primary::Primary`]: protocol-C mirrored writes, degraded mode with the persistent
//!   [`mirror::bitmap::DirtyBitmap`] (64 KiB chunks) and activity log (4 MiB extents), online
//!   resync (rate-limited, racing writes handled by sequencing), full initial sync skipping
//!   holes and zero chunks, remote mode when the local store fails, online verify;
//! - [`mirror::secondary::Secondary`]: in-order apply on the peer, cumulative acks, level-3
//!   epoch mode;
//! - [`mirror::wire::PeerMsg`]: replication messages; [`mirror::transport`]: sessions over
//!   memory or TCP; [`mirror::alink`]: sessions over an `xenft-alink` link (`Channel::Disk`);
//! - [`daemon`]: the process; [`status::Node`]: the agent's control socket.
//!
//! ## Agent interface
//! The binary `xenft-blkback` takes `--role local|primary|secondary`, `--disk` (raw file or
//! block device; `--size` creates a sparse file), `--nbd-unix`/`--nbd-tcp`, the peer transport
//! (`--peer ADDR` / `--listen ADDR` for plain TCP, or `--alink-path LOCAL=PEER` (repeat),
//! `--host`, `--peer-host`, `--secret-file` for an A-link), `--resync-rate`,
//! `--ack-timeout-ms`, and `--control <unix socket>`.
//!
//! On the control socket the agent sends one command per line and reads one JSON line back
//! (details in [`status`]):
//! - `status` → `{"role":"primary","primary":{...}}` with `peer` (`degraded` / `resyncing` /
//!   `in_sync`), `peer_disk` (`fresh` / `inconsistent` / `consistent`), `dirty_bytes`,
//!   `resync` (`total_bytes`, `bytes_left`, `bytes_copied`, `rate_bytes_per_sec`, `eta_secs`),
//!   `last_resync`, `local_failure` (the cause; non-null means remote mode), counters; or
//!   `{"role":"secondary","secondary":{...}}` with `connected`, `disk`, `held_epochs`, ...;
//! - `resync-rate <bytes/s>`, `verify [block]` (primary);
//! - level 3: `checkpoint <n>` / `epoch <n>` and `commit <n>` (primary), `epoch-mode on|off`,
//!   `commit-local <n>` and `discard` (secondary, on failover);
//! - `promote [EPOCH] [force]` (secondary): take-over in place, see [`daemon`].
//!
//! The checkpoint engine's `CommitSink` maps directly: `checkpoint(n)` → [`mirror::primary::Primary::checkpoint_boundary`],
//!   `commit(n)` → [`mirror::primary::Primary::commit_epoch`] (resolves once the secondary
//!   applied epoch `n`).
//!
//! The agent's `DiskMirror` seam needs no calls beyond these: a session (and its full or
//! dirty-only resync) starts whenever the peer is reachable — `sync` is "wait for `in_sync`";
//! a lost peer makes the primary degraded by itself (`suspend`); a failed local store switches
//! to remote mode by itself (`redirect`), reported in `local_failure`.
//!
//! In-process, the same is available through [`mirror::primary::Primary::status`],
//! [`mirror::primary::Primary::subscribe_failures`], [`mirror::primary::Primary::set_epoch`],
//! [`mirror::primary::Primary::commit_epoch`], [`mirror::secondary::Secondary::commit_epoch`]
//! and [`mirror::secondary::Secondary::discard_uncommitted`].
//!
//! ## Failover (what the agent does)
//! 1. Level 3 only: `discard` on the secondary's control socket drops uncommitted epochs.
//! 2. Stop the secondary shim (SIGTERM: its store is synced) and start `--role primary` on the
//!    same disk with a new bitmap file; serve the VM from its NBD socket.
//! 3. When the old primary's host returns, start it as `--role secondary`. The new primary's
//!    bitmap has never seen a synced peer, so the first session is a full sync (holes and zero
//!    chunks are not copied). There is no bitmap exchange yet: writes the old primary had in
//!    flight when it died are overwritten by that full sync, not merged.
//!
//! ## Guarantees
//! - A client write is acknowledged only when it is on the local store and the secondary
//!   applied it (or, without a session, after its chunks are durably marked dirty).
//! - FLUSH and FUA are durable on both copies before the reply.
//! - Both copies apply overlapping writes in the same order (one sequence, assigned under the
//!   lock that orders local writes).
//! - The secondary acknowledges a write once applied (page cache), FLUSH/FUA once durable, as
//!   DRBD does. Its state file carries the boot id: after a host crash (not a process crash)
//!   without a clean stop it reports itself fresh and gets a full sync, since acknowledged
//!   writes may have been lost with the page cache. The primary's activity log covers its own
//!   crash while connected.
//! - Bad NBD input gets the spec's error or a disconnect of that client; no write lands outside
//!   the export; payloads are capped at 32 MiB per request and 128 MiB in flight per client.

pub mod daemon;
pub mod mirror;
pub mod nbd;
pub mod status;
pub mod store;
pub mod volume;
