//! [`BlkbackDriver`]: the [`DiskMirror`] seam over one VM's `xenft-blkback` control socket.
//!
//! | seam call | control commands | notes |
//! |---|---|---|
//! | `sync` | `status` polled | blkback opens a session (full sync or dirty-only resync) by itself whenever the peer is reachable; the driver waits for `in_sync`, logging progress, bounded by `sync_timeout_ms` |
//! | `suspend` | `status` | blkback goes degraded by itself when the session drops; the driver checks the shim answers as primary |
//! | `redirect on` | `status` | blkback switches to remote mode by itself on a local store failure (`local_failure`); the driver confirms it, and refuses to force remote mode on a healthy store |
//! | `redirect off` | `status` | returning to the local disk after remote mode needs the local copy resynced, which blkback does not do: refused with that reason |
//! | `promote` | `status`, `promote [EPOCH]` | on a secondary: stop taking the old primary's writes, commit held epochs `<= EPOCH`, discard the rest, serve NBD as primary; a primary or local shim is left alone |

use std::time::{Duration, Instant};

use serde::Deserialize;

use super::control::{field, ControlError, ControlSocket};
use crate::ids::{HostId, VmId};
use crate::seams::{DiskMirror, SeamError};

/// How often `sync` polls the shim.
const POLL: Duration = Duration::from_millis(200);
/// How often `sync` logs progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long a promotion may take (drains the old session, syncs the store).
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(30);

/// The resync progress fields the driver reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResyncView {
    /// Bytes to copy.
    #[serde(default)]
    pub total_bytes: u64,
    /// Bytes still dirty.
    #[serde(default)]
    pub bytes_left: u64,
    /// Data bytes copied.
    #[serde(default)]
    pub bytes_copied: u64,
    /// Copy rate.
    #[serde(default)]
    pub rate_bytes_per_sec: f64,
}

/// The primary's status fields the driver reads.
#[derive(Debug, Clone, Deserialize)]
pub struct PrimaryView {
    /// `degraded`, `resyncing` or `in_sync`.
    pub peer: String,
    /// Bytes the secondary may lack.
    #[serde(default)]
    pub dirty_bytes: u64,
    /// Current resync.
    #[serde(default)]
    pub resync: Option<ResyncView>,
    /// Local store failure (remote mode) if any.
    #[serde(default)]
    pub local_failure: Option<String>,
}

/// The secondary's status fields the driver reads.
#[derive(Debug, Clone, Deserialize)]
pub struct SecondaryView {
    /// A primary session is up.
    pub connected: bool,
    /// `fresh`, `inconsistent` or `consistent`.
    pub disk: String,
    /// Epochs with held writes.
    #[serde(default)]
    pub held_epochs: Vec<u64>,
}

/// The shim's role and role-specific status.
#[derive(Debug, Clone)]
pub enum BlkStatus {
    /// Serving without a peer.
    Local,
    /// Serving and mirroring.
    Primary(PrimaryView),
    /// Holding the copy.
    Secondary(SecondaryView),
}

/// Drives one VM's `xenft-blkback`.
#[derive(Debug, Clone)]
pub struct BlkbackDriver {
    ctl: ControlSocket,
    sync_timeout: Duration,
}

#[allow(clippy::needless_pass_by_value)] // callers pass temporaries (errors, literals)
fn seam(op: &'static str, vm: &VmId, e: impl ToString) -> SeamError {
    SeamError {
        component: "blkback",
        operation: op,
        vm: vm.clone(),
        reason: e.to_string(),
    }
}

impl BlkbackDriver {
    /// A driver for the shim whose control socket is `ctl`; `sync` gives up after
    /// `sync_timeout`.
    #[must_use]
    pub fn new(ctl: ControlSocket, sync_timeout: Duration) -> Self {
        Self { ctl, sync_timeout }
    }

    /// The shim's current status.
    ///
    /// # Errors
    /// [`ControlError`]; an unknown role is [`ControlError::Malformed`].
    pub fn status(&self) -> Result<BlkStatus, ControlError> {
        let v = self.ctl.request("status")?;
        let p = self.ctl.path();
        let role: String = field(p, &v, "role")?;
        match role.as_str() {
            "local" => Ok(BlkStatus::Local),
            "primary" => Ok(BlkStatus::Primary(field(p, &v, "primary")?)),
            "secondary" => Ok(BlkStatus::Secondary(field(p, &v, "secondary")?)),
            other => Err(ControlError::Malformed {
                path: p.to_path_buf(),
                detail: format!(
                    "unknown role {:?}",
                    other.chars().take(32).collect::<String>()
                ),
            }),
        }
    }
}

impl DiskMirror for BlkbackDriver {
    fn sync(&self, vm: &VmId, peer: &HostId, full: bool) -> Result<(), SeamError> {
        let start = Instant::now();
        let mut last_log = start;
        loop {
            match self.status().map_err(|e| seam("sync", vm, e))? {
                BlkStatus::Primary(p) if p.peer == "in_sync" => {
                    tracing::info!(%vm, %peer, full, secs = start.elapsed().as_secs_f64(), "disk in sync");
                    return Ok(());
                }
                BlkStatus::Primary(p) => {
                    if last_log.elapsed() >= PROGRESS_EVERY {
                        last_log = Instant::now();
                        let r = p.resync.unwrap_or_default();
                        tracing::info!(%vm, %peer, link = %p.peer, dirty_bytes = p.dirty_bytes,
                            bytes_left = r.bytes_left, total = r.total_bytes,
                            copied = r.bytes_copied, rate = r.rate_bytes_per_sec, "disk sync progress");
                    }
                }
                BlkStatus::Local => {
                    return Err(seam(
                        "sync",
                        vm,
                        "the shim runs without a peer (role local)",
                    ))
                }
                BlkStatus::Secondary(_) => {
                    return Err(seam(
                        "sync",
                        vm,
                        "the local shim is the secondary: the primary's host syncs",
                    ))
                }
            }
            if start.elapsed() >= self.sync_timeout {
                return Err(seam(
                    "sync",
                    vm,
                    format!("not in sync after {:?}", self.sync_timeout),
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    fn suspend(&self, vm: &VmId) -> Result<(), SeamError> {
        // The primary records writes as dirty as soon as its session drops; nothing to ask.
        match self.status().map_err(|e| seam("suspend", vm, e))? {
            BlkStatus::Primary(_) | BlkStatus::Local => Ok(()),
            BlkStatus::Secondary(_) => Err(seam("suspend", vm, "the local shim is the secondary")),
        }
    }

    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        let st = self.status().map_err(|e| seam("redirect", vm, e))?;
        let BlkStatus::Primary(p) = st else {
            return Err(seam(
                "redirect",
                vm,
                "only a primary shim has a peer copy to use",
            ));
        };
        match (on, p.local_failure) {
            (true, Some(cause)) => {
                tracing::warn!(%vm, %cause, "disk I/O served from the peer's copy (remote mode)");
                Ok(())
            }
            (true, None) => Err(seam(
                "redirect",
                vm,
                "the local store is healthy: blkback enters remote mode only on a local store failure",
            )),
            (false, None) => Ok(()),
            (false, Some(cause)) => Err(seam(
                "redirect",
                vm,
                format!("still in remote mode ({cause}): going back to the local disk needs it resynced from the peer, which blkback does not do; restart the shim as secondary"),
            )),
        }
    }

    fn promote(&self, vm: &VmId, commit_epoch: Option<u64>) -> Result<(), SeamError> {
        match self.status().map_err(|e| seam("promote", vm, e))? {
            BlkStatus::Primary(_) | BlkStatus::Local => Ok(()),
            BlkStatus::Secondary(s) => {
                let cmd = match commit_epoch {
                    Some(e) => format!("promote {e}"),
                    None => "promote".to_string(),
                };
                let v = self
                    .ctl
                    .request_within(&cmd, PROMOTE_TIMEOUT)
                    .map_err(|e| seam("promote", vm, e))?;
                tracing::warn!(%vm, epoch = ?commit_epoch, held = ?s.held_epochs,
                    was_connected = s.connected, promoted = %v.get("promoted").cloned().unwrap_or_default(),
                    "secondary disk promoted: serving the VM's disk here");
                Ok(())
            }
        }
    }
}
