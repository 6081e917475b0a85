//! The engine's side of the shims' epochs: at each checkpoint the VM's disk writes
//! (`xenft-blkback` primary) and its network output (`xenft-netback` relay) move to the next
//! epoch, and at each commit the disk epoch is applied on the secondary and the held output
//! released — all through the control contract (`xenft_control`).
//!
//! A shim that fails a request is logged and the engine goes on: the disk then lags the memory
//! checkpoints (its writes stay held, which the take-over's commit-up-to-checkpoint handles),
//! the relay holds its output longer.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use xenft_control::netback::Mode;
use xenft_control::{blkback, netback, Blkback, Client, ControlError, Netback};

/// How long one shim request may take.
pub const SHIM_TIMEOUT: Duration = Duration::from_secs(10);

fn warn_failed(what: &str, r: Result<impl Sized, ControlError>) {
    if let Err(e) = r {
        tracing::warn!(request = what, error = %e, "shim request failed");
    }
}

/// The relay's output buffering when protection starts on a running guest (re-protection):
/// the relay runs in pass-through with epoch numbers of its own and is switched to buffered
/// at the first checkpoint.
#[derive(Debug, Default)]
pub struct RelayBuffering {
    /// Relay epoch = engine epoch + `base` (the relay's epochs only ever increase).
    base: AtomicU64,
    /// Buffered mode is on.
    on: AtomicBool,
}

impl RelayBuffering {
    /// The relay epoch of engine epoch `epoch`, once buffering is on.
    fn map(&self, epoch: u64) -> Option<u64> {
        self.on
            .load(Ordering::Acquire)
            .then(|| epoch.saturating_add(self.base.load(Ordering::Acquire)))
    }

    /// Turns buffering on, numbering after the relay's own epochs; false if the relay could
    /// not be asked (retried at the next checkpoint; output is not held meanwhile).
    fn start(&self, relay: &Client<Netback>) -> bool {
        if self.on.load(Ordering::Acquire) {
            return true;
        }
        let base = match relay.call(&netback::Request::Counters) {
            Ok(netback::Reply::Counters { counters }) => {
                counters.epoch.max(counters.committed_epoch)
            }
            Ok(other) => {
                tracing::warn!(reply = ?other, "the relay answered counters with something else");
                return false;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the relay's counters could not be read");
                return false;
            }
        };
        if let Err(e) = relay.call(&netback::Request::SetMode {
            mode: Mode::Buffered,
        }) {
            tracing::warn!(error = %e, "the relay did not switch to buffered mode");
            return false;
        }
        self.base.store(base, Ordering::Release);
        self.on.store(true, Ordering::Release);
        true
    }
}

/// The VM's shims as the engine drives them.
#[derive(Debug, Default)]
pub struct Shims {
    /// The blkback primary (`--blkback-control`).
    pub blkback: Option<Client<Blkback>>,
    /// The relay (`--netback-control`).
    pub netback: Option<Client<Netback>>,
    /// Re-protection: the relay's buffering starts at the first checkpoint.
    pub relay: Option<RelayBuffering>,
}

impl Shims {
    /// The shims at these control sockets (either may be absent).
    #[must_use]
    pub fn new(blkback: Option<PathBuf>, netback: Option<PathBuf>) -> Self {
        Self {
            blkback: blkback.map(|p| Client::new(p, SHIM_TIMEOUT)),
            netback: netback.map(|p| Client::new(p, SHIM_TIMEOUT)),
            relay: None,
        }
    }

    /// For a re-protection of a running guest: the relay's buffering starts at the first
    /// checkpoint, numbered after its own epochs.
    #[must_use]
    pub fn reprotecting(mut self) -> Self {
        self.relay = Some(RelayBuffering::default());
        self
    }

    /// Inside the checkpoint's pause: the disk writes and the output from now on belong to
    /// the next epoch.
    pub fn checkpoint(&self, epoch: u64) {
        if let Some(b) = &self.blkback {
            warn_failed(
                "blkback checkpoint",
                b.call(&blkback::Request::Checkpoint { epoch }),
            );
        }
        if let Some(n) = &self.netback {
            let next = match &self.relay {
                None => Some(epoch.saturating_add(1)),
                Some(r) => {
                    r.start(n);
                    r.map(epoch.saturating_add(1))
                }
            };
            if let Some(next) = next {
                warn_failed(
                    "netback begin_epoch",
                    n.call(&netback::Request::BeginEpoch { epoch: next }),
                );
            }
        }
    }

    /// Checkpoint `epoch` is on the secondary: its disk writes are applied there, its output
    /// is released.
    pub fn commit(&self, epoch: u64) {
        if let Some(b) = &self.blkback {
            warn_failed(
                "blkback commit",
                b.call(&blkback::Request::Commit { epoch }),
            );
        }
        if let Some(n) = &self.netback {
            let at = match &self.relay {
                None => Some(epoch),
                Some(r) => r.map(epoch),
            };
            if let Some(at) = at {
                warn_failed(
                    "netback commit",
                    n.call(&netback::Request::Commit { epoch: at }),
                );
            }
        }
    }

    /// Before a new protection numbers its checkpoints from 1 again: writes from now on are
    /// stamped epoch 0 (committed with the first checkpoint), and every write still held on
    /// the secondary under an older, higher number is committed — all of them precede the
    /// first checkpoint, so a take-over from any checkpoint of the new protection must keep
    /// them.
    pub fn restart_disk_epochs(&self) {
        let Some(b) = &self.blkback else { return };
        let current = match b.call(&blkback::Request::Status) {
            Ok(blkback::Reply::Status(s)) => match s.node {
                blkback::NodeStatus::Primary { primary } => Some(primary.epoch),
                _ => None,
            },
            _ => None,
        };
        let Some(current) = current else {
            tracing::warn!("blkback is not a primary: the disk epochs are not stamped");
            return;
        };
        warn_failed(
            "blkback set_epoch",
            b.call(&blkback::Request::SetEpoch { epoch: 0 }),
        );
        if current > 0 {
            warn_failed(
                "blkback commit",
                b.call(&blkback::Request::Commit { epoch: current }),
            );
        }
    }

    /// Unprotected again: the relay releases what it holds and passes output through.
    pub fn relay_passthrough(&self) {
        if let Some(n) = &self.netback {
            warn_failed(
                "netback set_mode passthrough",
                n.call(&netback::Request::SetMode {
                    mode: Mode::Passthrough,
                }),
            );
        }
    }
}
