//! # xenft-agent: the per-host decision maker
//!
//! One agent runs in dom0 of every host. It exchanges heartbeats with its peers over every
//! A-link path, the management network and an optional storage heartbeat, classifies
//! failures, asks the quorum servers before taking a VM over, fences itself when it cannot
//! prove it may run a VM, drives the block and network shims and the level-3 checkpoint engine
//! through traits, persists each VM's protection state, and serves the status API. The
//! `xenft-quorum` server binary lives here too.
//!
//! What it is not: it moves no disk block, packet or memory page itself — the components do,
//! each a process of its own that the agent drives through the control contract
//! (`xenft_control`) and hears from through its events.
//!
//! Where it sits: above the shims and the checkpoint engine (it promotes, redirects and
//! resyncs them, pauses and starts the VM; they report faults back through xenstore), beside xapi (the registry of
//! protected VMs), and on top of the A-links (`xenft-alink`) for peer traffic.
//!
//! Main pieces:
//! - [`core::HostCore`]: the pure decision core (membership, failure classification, quorum
//!   client, fencing, per-VM lifecycle), driven by ticks and observations, raft-rs style; its
//!   module doc holds the split-brain safety argument. One file per concern:
//!   - `core/mod.rs`: [`core::HostCore`], [`core::CoreConfig`], the entry points and views;
//!   - `core/messages.rs`: what the core is told and asks ([`core::Input`], [`core::Output`],
//!     [`core::Command`]);
//!   - `core/membership.rs`: peers, per-path liveness, heartbeats ([`core::Heartbeat`]);
//!   - `core/lease.rs`: the quorum client's leases, fencing and unfencing;
//!   - `core/vm.rs`: a VM's protection lifecycle (sync, resync, degrade, redirects);
//!   - `core/takeover.rs`: roles settled with the peer, restart and take-over decisions;
//! - [`quorum`]: the quorum server's lease table ([`quorum::table::QuorumTable`]), its
//!   HMAC-authenticated wire frames, the TCP server and client, and the zero/one/two-server
//!   rules with the **no-quorum trade-off** (two-host rule) documented;
//! - [`lifecycle`]: the per-VM protection phases ([`lifecycle::Phase`]) and the atomically
//!   replaced state file ([`lifecycle::StateFile`]);
//! - [`timing::Timing`]: the timeouts, with defaults that fit a take-over in under 1 s;
//! - [`runtime::Agent`]: the daemon around the core (UDP per-path heartbeats or the alink
//!   crate, storage heartbeat files, quorum clients, command execution, persistence);
//! - [`seams`]: the traits of the driven components ([`seams::DomainStarter`],
//!   [`seams::DiskMirror`], [`seams::NetRelay`], [`seams::Checkpointer`]) with a recording
//!   stand-in (`"drivers": "record"` only);
//! - [`drivers`]: the real implementations the binary runs — `xenft-blkback` (sync, remote
//!   mode, promote on take-over with level-3 epoch commit), `xenft-netback` (uplink redirect,
//!   take-over announcement), the checkpoint engine's secondary (freeze at the last committed
//!   checkpoint, resume) over their control sockets, and the local pool's VM as a process.
//!   Not yet: the XenAPI domain starter (`VM.start_on`);
//! - [`xapi`]: the agent as a XenAPI client: the desired state from the pool's registry
//!   (checked, refusals with reasons) and the follower that reads it with `event.from`,
//!   following the master and surviving xapi restarts;
//! - [`xenstore`]: the xenstore seam (trait, in-process store with xenstored semantics, the
//!   xenstore-rs backend plus a wire-protocol client for transactions) and the agent's
//!   xenstore bridge;
//! - [`console`]: the availability console (page, login, snapshot from the registry, this
//!   agent and the other hosts' consoles, protect / unprotect through XenAPI);
//! - [`status`]: the status API (JSON, bounded decision log, server-sent events, Prometheus);
//! - [`sim`]: a deterministic simulated pool (seeded faults, split-brain / false-failover /
//!   missed-failover checker);
//! - [`config`]: the agent's configuration file and its validation;
//! - [`decision`]: decision events with reasons and the bounded event log.
//!
//! Failure classes and the action taken for each:
//!
//! | class | seen | action |
//! |---|---|---|
//! | (a) | one A-link path silent | log only |
//! | (b) | all A-links down, peer alive on mgmt/storage | degrade (replication suspended), never fail over |
//! | (c) | peer silent on every path past `peer_dead_ms` and quorum grants | fail over (secondary) / degrade (primary) |
//! | (d) | a shim reports a local disk or uplink fault | redirect through the peer (level 2/3) |
//! | (e) | not enough memory to start a VM | refuse |
//! | — | primary without lease or peer promise | fence (pause its copy) |

pub mod config;
pub mod console;
pub mod core;
pub mod decision;
pub mod drivers;
pub mod ids;
pub mod lifecycle;
pub mod protection_api;
pub mod quorum;
pub mod runtime;
pub mod seams;
pub mod sim;
pub mod status;
pub mod timing;
pub mod xapi;
pub mod xenstore;
