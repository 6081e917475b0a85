//! Failure-detection and lease timeouts, with the defaults that let a level-3 failover complete
//! within 1 s of a host dying.
//!
//! Budget (defaults): the secondary declares the primary silent `peer_dead_ms` (500) after the
//! last heartbeat it heard; a quorum server grants the claim once the primary's lease has
//! expired, at most `lease_ms` (600) after the primary's last renewal, i.e. after its death.
//! The claim round trip and the resume of the last committed checkpoint add tens of ms, so the
//! VM runs again 600–700 ms after the host died (measured by the simulator, see
//! `tests/sim_pool.rs`). Heartbeats go every `heartbeat_ms` (100) on every path; a path is
//! declared down after `path_down_ms` (350), i.e. three lost heartbeats.
//!
//! `margin_ms` (200) is how much earlier than the server a host considers its lease (or its
//! peer's promise) expired: it must exceed the worst delay between the moment a lease runs out
//! and the moment the agent has paused its copy (scheduling delay of the agent, clock-rate
//! drift). 100 ms proved too tight on a loaded machine (two copies for a few ms in the
//! namespace tests); run the agent with a real-time priority in production.

use serde::{Deserialize, Serialize};

use crate::ids::Millis;

/// Timeouts of failure detection and quorum leases, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timing {
    /// Interval between heartbeats on every path, and between lease renewals.
    pub heartbeat_ms: Millis,
    /// A path is down after this long without a heartbeat on it.
    pub path_down_ms: Millis,
    /// The peer is silent (candidate for failover) after this long without a heartbeat on any
    /// path. Also the length of the promise each host makes by acknowledging a heartbeat: "I
    /// will not claim your VMs until I have not heard you for this long".
    pub peer_dead_ms: Millis,
    /// Length of a quorum lease, counted by the server from the moment it receives a claim.
    pub lease_ms: Millis,
    /// Safety margin subtracted by hosts from every lease and promise (covers clock-rate
    /// drift and scheduling delay).
    pub margin_ms: Millis,
    /// A quorum request without a reply after this long is abandoned and re-sent.
    pub quorum_request_timeout_ms: Millis,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            path_down_ms: 350,
            peer_dead_ms: 500,
            lease_ms: 600,
            margin_ms: 200,
            quorum_request_timeout_ms: 150,
        }
    }
}

/// A timing that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    /// A value is zero or absurdly large.
    #[error("{0} must be between 1 and 600000 ms")]
    OutOfRange(&'static str),
    /// The relation between two values is wrong.
    #[error("{0}")]
    Inconsistent(&'static str),
}

impl Timing {
    /// Checks the relations the safety argument relies on.
    ///
    /// # Errors
    /// [`TimingError`] naming the offending value.
    pub fn validate(&self) -> Result<(), TimingError> {
        for (name, v) in [
            ("heartbeat_ms", self.heartbeat_ms),
            ("path_down_ms", self.path_down_ms),
            ("peer_dead_ms", self.peer_dead_ms),
            ("lease_ms", self.lease_ms),
            ("margin_ms", self.margin_ms),
            ("quorum_request_timeout_ms", self.quorum_request_timeout_ms),
        ] {
            if v == 0 || v > 600_000 {
                return Err(TimingError::OutOfRange(name));
            }
        }
        if self.path_down_ms < 2 * self.heartbeat_ms {
            return Err(TimingError::Inconsistent(
                "path_down_ms must be at least two heartbeat intervals",
            ));
        }
        if self.peer_dead_ms < self.path_down_ms {
            return Err(TimingError::Inconsistent(
                "peer_dead_ms must be at least path_down_ms",
            ));
        }
        if self.margin_ms >= self.peer_dead_ms
            || self.margin_ms + self.heartbeat_ms >= self.lease_ms
        {
            return Err(TimingError::Inconsistent(
                "margin_ms plus one heartbeat must be shorter than lease_ms and peer_dead_ms",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_fit_the_one_second_budget() {
        let t = Timing::default();
        t.validate().unwrap();
        assert!(t.peer_dead_ms.max(t.lease_ms) + t.heartbeat_ms < 1000);
    }

    #[test]
    fn margin_longer_than_lease_is_rejected() {
        let t = Timing {
            margin_ms: 700,
            ..Timing::default()
        };
        assert!(matches!(t.validate(), Err(TimingError::Inconsistent(_))));
    }
}
