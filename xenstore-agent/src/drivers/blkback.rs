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
    /// Sessions opened so far.
    #[serde(default)]
    pub sessions: u64,
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
///
/// `sync` trusts the shim's `in_sync`: the agent's heartbeats and the shim's A-link are
/// separate, so the agent may see all A-links down (and suspend) while the shim's session
/// survives and stays in sync. A peer whose shim restarted is noticed by the shim when the new
/// process connects (`PeerRestarted` ends the session); in the short window before that the old
/// session may still read `in_sync`. A take-over in that window is safe: `promote` refuses a
/// copy that is not consistent.
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
            let st = match self.status() {
                Ok(st) => st,
                // The shim may be (re)starting: keep waiting within the sync timeout.
                Err(e @ (ControlError::Connect { .. } | ControlError::NoReply(_)))
                    if start.elapsed() < self.sync_timeout =>
                {
                    if last_log.elapsed() >= PROGRESS_EVERY {
                        last_log = Instant::now();
                        tracing::warn!(%vm, error = %e, "waiting for blkback's control socket");
                    }
                    std::thread::sleep(POLL);
                    continue;
                }
                Err(e) => return Err(seam("sync", vm, e)),
            };
            match st {
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

    fn report(&self, _vm: &VmId) -> Option<serde_json::Value> {
        // Re-serialised from the typed view: only known fields reach the status API.
        Some(match self.status() {
            Ok(BlkStatus::Local) => serde_json::json!({"role": "local"}),
            Ok(BlkStatus::Primary(p)) => {
                let r = p.resync.unwrap_or_default();
                serde_json::json!({
                    "role": "primary",
                    "peer": p.peer.chars().take(32).collect::<String>(),
                    "dirty_bytes": p.dirty_bytes,
                    "remote_mode": p.local_failure.is_some(),
                    "resync": {"total_bytes": r.total_bytes, "bytes_left": r.bytes_left,
                               "bytes_copied": r.bytes_copied,
                               "rate_bytes_per_sec": r.rate_bytes_per_sec},
                })
            }
            Ok(BlkStatus::Secondary(s)) => serde_json::json!({
                "role": "secondary",
                "connected": s.connected,
                "disk": s.disk.chars().take(32).collect::<String>(),
                "held_epochs": s.held_epochs.len(),
            }),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::control::fake::{serve, Reply};
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    /// A scripted blkback control socket; records every command it got.
    fn fake(reply: Reply) -> (tempfile::TempDir, BlkbackDriver, Arc<Mutex<Vec<String>>>) {
        let (d, p, seen) = serve(reply);
        let drv = BlkbackDriver::new(
            ControlSocket::new(&p, Duration::from_secs(2)),
            Duration::from_secs(3),
        );
        (d, drv, seen)
    }

    fn primary(peer: &str, sessions: u64) -> String {
        format!(
            r#"{{"ok":true,"role":"primary","primary":{{"peer":"{peer}","dirty_bytes":0,"sessions":{sessions},"local_failure":null}}}}"#
        )
    }

    fn vm() -> VmId {
        VmId::new("vm1").unwrap()
    }

    #[test]
    fn a_sync_waits_until_the_shim_is_in_sync() {
        let polls = Arc::new(Mutex::new(0u32));
        let p2 = polls.clone();
        let (_d, drv, _) = fake(Box::new(move |_| {
            let mut n = p2.lock().unwrap();
            *n += 1;
            primary(if *n < 4 { "resyncing" } else { "in_sync" }, 1)
        }));
        drv.sync(&vm(), &HostId::new("h2").unwrap(), false).unwrap();
        assert!(*polls.lock().unwrap() >= 4, "sync returned before in_sync");
    }

    #[test]
    fn a_sync_waits_for_a_shim_that_is_still_starting() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("late.ctl");
        let p2 = p.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let l = UnixListener::bind(&p2).unwrap();
            let (mut s, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            s.write_all(format!("{}\n", primary("in_sync", 1)).as_bytes())
                .unwrap();
        });
        let drv = BlkbackDriver::new(
            ControlSocket::new(&p, Duration::from_secs(2)),
            Duration::from_secs(5),
        );
        drv.sync(&vm(), &HostId::new("h2").unwrap(), true).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn a_sync_that_never_completes_times_out_with_the_reason() {
        let (_d, drv, _) = fake(Box::new(|_| primary("resyncing", 1)));
        let e = drv
            .sync(&vm(), &HostId::new("h2").unwrap(), true)
            .unwrap_err();
        assert!(e.reason.contains("not in sync"), "{e}");
    }

    #[test]
    fn promote_of_a_secondary_commits_up_to_the_checkpoint_epoch() {
        let (_d, drv, seen) = fake(Box::new(|cmd| {
            if cmd == "status" {
                r#"{"ok":true,"role":"secondary","secondary":{"connected":false,"disk":"consistent","held_epochs":[7,8]}}"#.into()
            } else {
                r#"{"ok":true,"role":"primary","promoted":{}}"#.into()
            }
        }));
        drv.promote(&vm(), Some(7)).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["status", "promote 7"]);
    }

    #[test]
    fn promote_of_a_serving_primary_changes_nothing() {
        let (_d, drv, seen) = fake(Box::new(|_| primary("in_sync", 1)));
        drv.promote(&vm(), None).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["status"]);
    }

    #[test]
    fn a_refused_promotion_and_a_hostile_status_are_errors() {
        let (_d, drv, _) = fake(Box::new(|cmd| {
            if cmd == "status" {
                r#"{"ok":true,"role":"secondary","secondary":{"connected":true,"disk":"inconsistent"}}"#.into()
            } else {
                r#"{"ok":false,"error":"the local copy is Inconsistent"}"#.into()
            }
        }));
        let e = drv.promote(&vm(), None).unwrap_err();
        assert!(e.reason.contains("Inconsistent"), "{e}");
        let (_d2, drv2, _) = fake(Box::new(|_| r#"{"ok":true,"role":"overlord"}"#.into()));
        assert!(drv2.promote(&vm(), None).is_err());
        let (_d3, drv3, _) = fake(Box::new(|_| r#"{"ok":true,"role":"primary"}"#.into()));
        assert!(
            drv3.suspend(&vm()).is_err(),
            "a primary without its status fields"
        );
    }

    #[test]
    fn the_status_report_keeps_only_known_bounded_fields() {
        let (_d, drv, _) = fake(Box::new(|_| {
            format!(
                r#"{{"ok":true,"role":"primary","secret":"x","primary":{{"peer":"{}","dirty_bytes":7,"sessions":1}}}}"#,
                "y".repeat(5000)
            )
        }));
        let r = drv.report(&vm()).unwrap();
        assert_eq!(r["role"], "primary");
        assert_eq!(r["dirty_bytes"], 7);
        assert!(r.get("secret").is_none());
        assert_eq!(r["peer"].as_str().unwrap().len(), 32);
        let (_d2, drv2, _) = fake(Box::new(|_| "garbage".into()));
        assert!(drv2.report(&vm()).unwrap()["error"].is_string());
    }

    #[test]
    fn forcing_remote_mode_on_a_healthy_store_is_refused() {
        let (_d, drv, _) = fake(Box::new(|_| primary("in_sync", 1)));
        let e = drv.redirect(&vm(), true).unwrap_err();
        assert!(e.reason.contains("healthy"), "{e}");
        drv.redirect(&vm(), false).unwrap();
    }
}
