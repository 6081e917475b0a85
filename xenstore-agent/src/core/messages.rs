//! What the core is told ([`Input`], with [`VmSpec`] from the registry) and what it asks its
//! caller to do ([`Output`], with the [`Command`]s run on a VM or its shims).

use serde::{Deserialize, Serialize};

use super::Heartbeat;
use crate::decision::{Component, Decision};
use crate::ids::{HostId, PathId, VmId};
use crate::lifecycle::{Level, VmRecord};
use crate::quorum::table::{QuorumRequest, QuorumResponse};

/// A VM the agent is asked to protect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM.
    pub vm: VmId,
    /// Level.
    pub level: Level,
    /// Host running it now.
    pub primary: HostId,
    /// Host protecting it.
    pub secondary: HostId,
    /// Memory it needs (MiB).
    pub memory_mb: u64,
}

/// How a VM is started on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartMode {
    /// Level 1: boot from the VM's own (shared) disk. No mirror copy is touched — one that is
    /// half-filled by a raise to level 2 in progress must not become the VM's disk.
    Restart,
    /// Boot from the mirrored copy, promoted first: level 2, or a restart after both copies
    /// were lost.
    Boot,
    /// Resume from the last committed checkpoint (level 3 take-over).
    ResumeCheckpoint,
}

/// Something the caller must do to a VM or its shims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Start the VM here; answer with [`Input::VmStarted`].
    StartVm {
        /// The VM.
        vm: VmId,
        /// How.
        mode: StartMode,
    },
    /// Pause the local copy (fence).
    PauseVm {
        /// The VM.
        vm: VmId,
    },
    /// Unpause the local copy.
    ResumeVm {
        /// The VM.
        vm: VmId,
    },
    /// Destroy the local copy (the peer owns the VM).
    DestroyVm {
        /// The VM.
        vm: VmId,
    },
    /// Start replication to the peer: full sync or resync of dirty regions; answer with
    /// [`Input::SyncDone`] carrying `sync_id`.
    StartSync {
        /// The VM.
        vm: VmId,
        /// The secondary.
        peer: HostId,
        /// Token to match the completion.
        sync_id: u64,
        /// Full copy (first protection) rather than dirty regions only.
        full: bool,
    },
    /// Stop replicating (peer lost): track dirty regions from now on.
    SuspendReplication {
        /// The VM.
        vm: VmId,
    },
    /// Send the component's I/O through the peer.
    Redirect {
        /// The VM.
        vm: VmId,
        /// Which component.
        component: Component,
    },
    /// Use the local component again.
    Restore {
        /// The VM.
        vm: VmId,
        /// Which component.
        component: Component,
    },
}

/// What the core is told.
#[derive(Clone, Debug)]
pub enum Input {
    /// Time passes (call every 10–20 ms).
    Tick,
    /// A heartbeat arrived on a path.
    Heartbeat {
        /// The path.
        path: PathId,
        /// The heartbeat.
        hb: Heartbeat,
    },
    /// A quorum server answered.
    Quorum {
        /// Index of the server (order of preference).
        server: usize,
        /// The reply.
        reply: QuorumResponse,
    },
    /// A shim reports a component fault or recovery (for one VM, or all when `vm` is None).
    Component {
        /// The VM, or None for every VM on this host.
        vm: Option<VmId>,
        /// Which component.
        component: Component,
        /// True when it works again.
        ok: bool,
        /// The shim's words.
        detail: String,
    },
    /// Free memory for VMs on this host (MiB).
    Resources {
        /// Free memory.
        free_memory_mb: u64,
    },
    /// A sync started by [`Command::StartSync`] finished.
    SyncDone {
        /// The VM.
        vm: VmId,
        /// The token.
        sync_id: u64,
    },
    /// A sync started by [`Command::StartSync`] failed; the core tries again after a backoff.
    SyncFailed {
        /// The VM.
        vm: VmId,
        /// The token.
        sync_id: u64,
        /// Why.
        reason: String,
    },
    /// The local replica's consistency changed (reported by the disk mirror on the secondary).
    MirrorConsistent {
        /// The VM.
        vm: VmId,
        /// Consistent now.
        consistent: bool,
    },
    /// A [`Command::StartVm`] finished.
    VmStarted {
        /// The VM.
        vm: VmId,
        /// It runs.
        ok: bool,
        /// Error text when not.
        detail: String,
    },
    /// Protect a VM (from the registry). For a VM the core has already, with the same roles:
    /// its level changes (raised: synced toward while protected at the old one; lowered:
    /// protected at once); with other roles: nothing (they are settled between the hosts).
    Protect(VmSpec),
    /// Stop protecting a VM (from the registry): replication stops, the record is dropped,
    /// the local copy is left as it is (a running primary keeps running).
    Unprotect(VmId),
    /// A transport with its own per-path liveness (the A-link crate) saw the peer on a path
    /// just now. Liveness only: the heartbeat content (acknowledgements, VM reports) still
    /// comes in [`Input::Heartbeat`].
    PathSeen {
        /// The peer.
        peer: HostId,
        /// The path.
        path: PathId,
    },
}

/// What the core asks the caller to do.
#[derive(Clone, Debug)]
pub enum Output {
    /// Send a heartbeat on a path.
    Heartbeat {
        /// The path.
        path: PathId,
        /// The heartbeat.
        hb: Heartbeat,
    },
    /// Send a request to a quorum server.
    Quorum {
        /// Index of the server.
        server: usize,
        /// The request.
        req: QuorumRequest,
    },
    /// Act on a VM or its shims.
    Command(Command),
    /// A decision with its reason.
    Decision(Decision),
    /// Persist these records (state changed).
    Persist(Vec<VmRecord>),
}
