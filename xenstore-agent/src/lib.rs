//! # xenft-agent: the per-host decision maker
//!
//! One agent runs in dom0 of every host. It watches xenstore, exchanges heartbeats with its
//! peers over the A-links, the management network and an optional storage heartbeat,
//! classifies failures, asks the quorum servers before acting, drives the block and network
//! shims and the level-3 checkpoint engine, and serves the status API and metrics. The
//! `xenft-quorum` server binary lives here too.
//!
//! Main pieces:
//! - [`core::HostCore`]: the pure decision core (membership, failure classification, quorum
//!   client, fencing, per-VM lifecycle), driven by ticks and observations, raft-rs style;
//! - [`quorum`]: the quorum server's lease table, its authenticated wire protocol and the
//!   zero/one/two-server rules (with the no-quorum trade-off documented there);
//! - [`lifecycle`]: the per-VM protection states and the atomically replaced state file;
//! - [`sim`]: a deterministic simulated pool (seeded faults, split-brain/false-failover checker);
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
pub mod core;
pub mod decision;
pub mod ids;
pub mod lifecycle;
pub mod quorum;
pub mod runtime;
pub mod seams;
pub mod sim;
pub mod status;
pub mod timing;
pub mod xenstore;
