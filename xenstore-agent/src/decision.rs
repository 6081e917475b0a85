//! Decisions: every classification the agent makes becomes an event with its reason, kept in a
//! bounded log (served by the status API).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::ids::{HostId, Millis, PathId, VmId};

/// What the agent saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultClass {
    /// (a) one heartbeat path to a peer fell silent (others still carry heartbeats).
    PathDown,
    /// A path came back.
    PathUp,
    /// (b) every A-link path to a peer is down but the peer is alive on the management network
    /// or the storage heartbeat.
    AllAlinksDown,
    /// (c) every path to the peer is silent past the timeout (and, to act, quorum agrees).
    PeerSilent,
    /// The peer is heard again after being silent.
    PeerBack,
    /// The peer's agent restarted (new incarnation).
    PeerRestarted,
    /// (d) a local component (disk, uplink) reported a fault.
    ComponentFault,
    /// A local component recovered.
    ComponentRecovered,
    /// (e) not enough resources (memory) to run a VM here.
    LackOfResources,
    /// This host could not prove quorum while running a VM copy.
    QuorumLost,
    /// Roles of a VM changed because of what a peer reported.
    RoleChange,
    /// Protection progress: sync or resync started or finished.
    Protection,
}

/// A local component a shim reports on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The VM's local disk (blkback-shim reported an I/O error).
    Disk,
    /// The host's uplink for the VM's network (netback-shim reported the bridge down).
    Uplink,
}

/// What the agent did about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "component")]
pub enum Action {
    /// Nothing to do beyond recording it.
    LogOnly,
    /// Protection degraded: the VM keeps running, replication is suspended (dirty tracking).
    Degrade,
    /// A component is redirected through the peer (disk reads/writes or network over A-link).
    Redirect(Component),
    /// Undo a redirect.
    Restore(Component),
    /// This host takes the VM over (promotion of the secondary).
    FailOver,
    /// Restart of the VM from its disk (level 1, or after both copies were lost).
    Restart,
    /// This host stops (pauses) its copy because it cannot prove it may run it.
    Fence,
    /// A fenced copy is resumed because this host proved it still owns the VM.
    Unfence,
    /// This host's copy is discarded because the peer owns the VM.
    StepDown,
    /// An action was needed but is refused (not enough resources, inconsistent copy).
    Refuse,
    /// Resynchronisation (initial or of dirty regions) starts.
    Resync,
    /// The VM is fully protected.
    Protected,
}

/// One decision with its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// When (agent clock, ms).
    pub at_ms: Millis,
    /// The host that decided.
    pub host: HostId,
    /// The peer concerned, if any.
    pub peer: Option<HostId>,
    /// The path concerned, if any.
    pub path: Option<PathId>,
    /// The VM concerned, if any.
    pub vm: Option<VmId>,
    /// What was seen.
    pub class: FaultClass,
    /// What was done.
    pub action: Action,
    /// Why, in words.
    pub reason: String,
}

/// A bounded log of decisions: the newest `capacity` are kept, older ones are dropped and
/// counted.
#[derive(Debug, Clone)]
pub struct EventLog {
    capacity: usize,
    events: VecDeque<Decision>,
    total: u64,
}

impl EventLog {
    /// A log keeping at most `capacity` events (at least 1).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            events: VecDeque::with_capacity(capacity.min(1024)),
            total: 0,
        }
    }

    /// Appends an event, dropping the oldest when full.
    pub fn push(&mut self, d: Decision) {
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(d);
        self.total += 1;
    }

    /// The kept events, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Decision> {
        self.events.iter()
    }

    /// How many events were ever pushed.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.total
    }

    /// How many are kept now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_log_keeps_only_the_newest() {
        let mut log = EventLog::new(3);
        for i in 0..5 {
            log.push(Decision {
                at_ms: i,
                host: HostId::new("h").unwrap(),
                peer: None,
                path: None,
                vm: None,
                class: FaultClass::PathUp,
                action: Action::LogOnly,
                reason: String::new(),
            });
        }
        assert_eq!(log.len(), 3);
        assert_eq!(log.total(), 5);
        assert_eq!(
            log.iter().map(|d| d.at_ms).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
    }
}
