//! The agent as a XenAPI client: the pool's xapi database is the single source of desired
//! state (DESIGN "Control plane").
//!
//! - [`components`]: the VM's components on this host from the registry (the plan, pure) and
//!   the supervisor that keeps them running, adopts them after an agent restart, restarts a
//!   crashed one with backoff and stops what is no longer wanted;
//! - [`desired`]: the desired state derived from the registry (pool `xenft.pool`, VM
//!   `xenft.level` / `xenft.secondary`), every request checked, refusals with their reason;
//!   this host's [`desired::Role`] per VM;
//! - [`devices`]: a protected VM's domain id, network interfaces and disk, from its `VIF`,
//!   `VBD`, `VDI` and `SR` records (what the relay and the mirror are started with, and
//!   whether the xenft SR mirrors the disk already);
//! - [`domain`]: the VM's domain through XenAPI on xapi hosts (`VM.start_on` on the
//!   surviving host after a take-over, pause / unpause for fencing, hard shutdown);
//! - [`domain_command`]: the domains run by the agent itself from one host-wide command
//!   template (xl hosts whose registry is a XenAPI server), each start recorded in xapi;
//! - [`follower`]: logs in (local socket or HTTPS, credentials from a file), follows the
//!   master (`HOST_IS_SLAVE`), follows the registry with `event.from` and publishes the
//!   desired state; the last state read stays in force while xapi is unreachable;
//! - [`membership`]: the pool's hosts, paths, quorum servers and A-link key from the registry,
//!   when the config file names no peers;
//! - [`bridge`]: the desired state into the core's protect / unprotect inputs, and the core's
//!   view of a VM back into its state line;
//! - [`relay_plan`]: the relay (`xenft-netback`) of a protected VM in the component plan;
//! - [`reservation`]: the memory each protected VM keeps on its secondary, re-checked while
//!   the pool changes;
//! - [`sr_disk`]: a VM whose disk is on the xenft SR: no mirror of the agent's own, the disk
//!   seam led to the SR volume's blkback;
//! - [`roles`]: a component that took the VM over is kept when the plan turns it primary;
//! - [`plane`]: all of it on one host: follower, inputs for the core, states back;
//! - [`state`]: the agent's report back into xapi (`xenft.state`, the `xenft-status` custom
//!   field), coalesced, never over a newer format.

pub mod bridge;
pub mod components;
pub mod desired;
pub mod devices;
pub mod domain;
pub mod domain_command;
pub mod engine_plan;
pub mod follower;
pub mod membership;
pub mod plane;
pub mod relay_plan;
pub mod reservation;
pub mod roles;
pub mod sr_disk;
pub mod state;
