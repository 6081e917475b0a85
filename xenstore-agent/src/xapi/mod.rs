//! The agent as a XenAPI client: the pool's xapi database is the single source of desired
//! state (DESIGN "Control plane").
//!
//! - [`components`]: the VM's components on this host from the registry (the plan, pure) and
//!   the supervisor that keeps them running, adopts them after an agent restart, restarts a
//!   crashed one with backoff and stops what is no longer wanted;
//! - [`desired`]: the desired state derived from the registry (pool `xenft.pool`, VM
//!   `xenft.level` / `xenft.secondary`), every request checked, refusals with their reason;
//!   this host's [`desired::Role`] per VM;
//! - [`domain`]: the VM's domain through XenAPI on xapi hosts (`VM.start_on` on the
//!   surviving host after a take-over, pause / unpause for fencing, hard shutdown);
//! - [`follower`]: logs in (local socket or HTTPS, credentials from a file), follows the
//!   master (`HOST_IS_SLAVE`), follows the registry with `event.from` and publishes the
//!   desired state; the last state read stays in force while xapi is unreachable;
//! - [`bridge`]: the desired state into the core's protect / unprotect inputs, and the core's
//!   view of a VM back into its state line;
//! - [`plane`]: all of it on one host: follower, inputs for the core, states back;
//! - [`state`]: the agent's report back into xapi (`xenft.state`, the `xenft-status` custom
//!   field), coalesced, never over a newer format.

pub mod bridge;
pub mod components;
pub mod desired;
pub mod domain;
pub mod engine_plan;
pub mod follower;
pub mod plane;
pub mod state;
