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

use xenft_control::blkback::{NodeStatus, PeerLink, Reply, Request};
use xenft_control::Blkback;

use super::control::{Client, ControlError};
use crate::ids::{HostId, VmId};
use crate::seams::{DiskMirror, SeamError};

/// How often `sync` polls the shim.
const POLL: Duration = Duration::from_millis(200);
/// How often `sync` logs progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long a promotion may take (drains the old session, syncs the store).
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(30);

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
    ctl: Client<Blkback>,
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

/// A [`PeerLink`]'s wire name.
fn link_name(l: PeerLink) -> &'static str {
    match l {
        PeerLink::Degraded => "degraded",
        PeerLink::Resyncing => "resyncing",
        PeerLink::InSync => "in_sync",
    }
}

impl BlkbackDriver {
    /// A driver for the shim whose control socket client is `ctl`; `sync` gives up after
    /// `sync_timeout`.
    #[must_use]
    pub fn new(ctl: Client<Blkback>, sync_timeout: Duration) -> Self {
        Self { ctl, sync_timeout }
    }

    /// The shim's current role and status.
    ///
    /// # Errors
    /// [`ControlError`]; a reply that is not a status is [`ControlError::Malformed`].
    pub fn status(&self) -> Result<NodeStatus, ControlError> {
        match self.ctl.call(&Request::Status)? {
            Reply::Status(s) => Ok(s.node),
            other => Err(ControlError::unexpected(self.ctl.path(), other)),
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
                NodeStatus::Primary { primary: p } if p.peer == PeerLink::InSync => {
                    tracing::info!(%vm, %peer, full, secs = start.elapsed().as_secs_f64(), "disk in sync");
                    return Ok(());
                }
                NodeStatus::Primary { primary: p } => {
                    if last_log.elapsed() >= PROGRESS_EVERY {
                        last_log = Instant::now();
                        let r = p.resync.unwrap_or_default();
                        tracing::info!(%vm, %peer, link = link_name(p.peer), dirty_bytes = p.dirty_bytes,
                            bytes_left = r.bytes_left, total = r.total_bytes,
                            copied = r.bytes_copied, rate = r.rate_bytes_per_sec, "disk sync progress");
                    }
                }
                NodeStatus::Local => {
                    return Err(seam(
                        "sync",
                        vm,
                        "the shim runs without a peer (role local)",
                    ))
                }
                NodeStatus::Secondary { .. } => {
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
            NodeStatus::Primary { .. } | NodeStatus::Local => Ok(()),
            NodeStatus::Secondary { .. } => {
                Err(seam("suspend", vm, "the local shim is the secondary"))
            }
        }
    }

    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        let st = self.status().map_err(|e| seam("redirect", vm, e))?;
        let NodeStatus::Primary { primary: p } = st else {
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
            Ok(NodeStatus::Local) => serde_json::json!({"role": "local"}),
            Ok(NodeStatus::Primary { primary: p }) => {
                let r = p.resync.unwrap_or_default();
                serde_json::json!({
                    "role": "primary",
                    "peer": link_name(p.peer),
                    "dirty_bytes": p.dirty_bytes,
                    "remote_mode": p.local_failure.is_some(),
                    "resync": {"total_bytes": r.total_bytes, "bytes_left": r.bytes_left,
                               "bytes_copied": r.bytes_copied,
                               "rate_bytes_per_sec": r.rate_bytes_per_sec},
                })
            }
            Ok(NodeStatus::Secondary { secondary: s }) => serde_json::json!({
                "role": "secondary",
                "connected": s.connected,
                "disk": s.disk,
                "held_epochs": s.held_epochs.len(),
            }),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        })
    }

    fn promote(&self, vm: &VmId, commit_epoch: Option<u64>) -> Result<(), SeamError> {
        match self.status().map_err(|e| seam("promote", vm, e))? {
            NodeStatus::Primary { .. } | NodeStatus::Local => Ok(()),
            NodeStatus::Secondary { secondary: s } => {
                let req = Request::Promote {
                    epoch: commit_epoch,
                    force: false,
                };
                let promoted = match self.ctl.call_within(&req, PROMOTE_TIMEOUT) {
                    Ok(Reply::Promoted { promoted }) => promoted,
                    Ok(other) => {
                        return Err(seam(
                            "promote",
                            vm,
                            ControlError::unexpected(self.ctl.path(), other),
                        ))
                    }
                    Err(e) => return Err(seam("promote", vm, e)),
                };
                tracing::warn!(%vm, epoch = ?commit_epoch, held = ?s.held_epochs,
                    was_connected = s.connected, ?promoted,
                    "secondary disk promoted: serving the VM's disk here");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::control::fake::{self, Fake};
    use std::sync::{Arc, Mutex};
    use xenft_control::blkback::{PeerDiskState, PrimaryStatus, Promoted, SecondaryStatus, Status};
    use xenft_control::ErrorReply;

    fn driver(f: &Fake<Blkback>, sync_timeout: Duration) -> BlkbackDriver {
        BlkbackDriver::new(f.client(), sync_timeout)
    }

    fn primary(peer: PeerLink, sessions: u64) -> PrimaryStatus {
        PrimaryStatus {
            peer,
            peer_synced: true,
            sessions,
            ..PrimaryStatus::default()
        }
    }

    fn status(node: NodeStatus) -> Result<Reply, ErrorReply> {
        Ok(Reply::Status(Box::new(Status { node, alink: None })))
    }

    fn secondary(connected: bool, disk: PeerDiskState, held: Vec<u64>) -> NodeStatus {
        NodeStatus::Secondary {
            secondary: SecondaryStatus {
                connected,
                disk,
                bytes_applied: 0,
                resync_bytes: 0,
                last_seq: 0,
                epoch_mode: true,
                held_epochs: held,
                held_bytes: 0,
                committed_epoch: 0,
                failure: None,
            },
        }
    }

    fn vm() -> VmId {
        VmId::new("vm1").unwrap()
    }

    #[test]
    fn a_sync_waits_until_the_shim_is_in_sync() {
        let polls = Arc::new(Mutex::new(0u32));
        let p2 = polls.clone();
        let f = fake::serve::<Blkback>(move |_| {
            let mut n = p2.lock().unwrap();
            *n += 1;
            let link = if *n < 4 {
                PeerLink::Resyncing
            } else {
                PeerLink::InSync
            };
            status(NodeStatus::Primary {
                primary: primary(link, 1),
            })
        });
        driver(&f, Duration::from_secs(3))
            .sync(&vm(), &HostId::new("h2").unwrap(), false)
            .unwrap();
        assert!(*polls.lock().unwrap() >= 4, "sync returned before in_sync");
    }

    #[test]
    fn a_sync_waits_for_a_shim_that_is_still_starting() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("late.ctl");
        let p2 = p.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            fake::serve_at::<Blkback>(&p2, |_| {
                status(NodeStatus::Primary {
                    primary: primary(PeerLink::InSync, 1),
                })
            })
        });
        let drv = BlkbackDriver::new(
            Client::new(&p, Duration::from_secs(2)),
            Duration::from_secs(5),
        );
        drv.sync(&vm(), &HostId::new("h2").unwrap(), true).unwrap();
        drop(server.join().unwrap());
    }

    #[test]
    fn a_sync_that_never_completes_times_out_with_the_reason() {
        let f = fake::serve::<Blkback>(|_| {
            status(NodeStatus::Primary {
                primary: primary(PeerLink::Resyncing, 1),
            })
        });
        let e = driver(&f, Duration::from_secs(1))
            .sync(&vm(), &HostId::new("h2").unwrap(), true)
            .unwrap_err();
        assert!(e.reason.contains("not in sync"), "{e}");
    }

    #[test]
    fn promote_of_a_secondary_commits_up_to_the_checkpoint_epoch() {
        let f = fake::serve::<Blkback>(|req| match req {
            Request::Status => status(secondary(false, PeerDiskState::Consistent, vec![7, 8])),
            _ => Ok(Reply::Promoted {
                promoted: Promoted {
                    committed_writes: 3,
                    discarded_writes: 1,
                    was_connected: false,
                },
            }),
        });
        driver(&f, Duration::from_secs(3))
            .promote(&vm(), Some(7))
            .unwrap();
        assert_eq!(
            f.seen(),
            vec![
                Request::Status,
                Request::Promote {
                    epoch: Some(7),
                    force: false
                }
            ]
        );
    }

    #[test]
    fn promote_of_a_serving_primary_changes_nothing() {
        let f = fake::serve::<Blkback>(|_| {
            status(NodeStatus::Primary {
                primary: primary(PeerLink::InSync, 1),
            })
        });
        driver(&f, Duration::from_secs(3))
            .promote(&vm(), None)
            .unwrap();
        assert_eq!(f.seen(), vec![Request::Status]);
    }

    #[test]
    fn a_refused_promotion_and_a_hostile_status_are_errors() {
        let f = fake::serve::<Blkback>(|req| match req {
            Request::Status => status(secondary(true, PeerDiskState::Inconsistent, vec![])),
            _ => Err(ErrorReply::refused("the local copy is Inconsistent")),
        });
        let e = driver(&f, Duration::from_secs(3))
            .promote(&vm(), None)
            .unwrap_err();
        assert!(e.reason.contains("Inconsistent"), "{e}");
        let (_d, p) = fake::raw("{\"v\":1,\"ok\":{\"reply\":\"status\",\"role\":\"overlord\"}}\n");
        let drv = BlkbackDriver::new(
            Client::new(&p, Duration::from_secs(2)),
            Duration::from_secs(1),
        );
        assert!(drv.promote(&vm(), None).is_err());
        let (_d, p) = fake::raw("{\"v\":1,\"ok\":{\"reply\":\"status\",\"role\":\"primary\"}}\n");
        let drv = BlkbackDriver::new(
            Client::new(&p, Duration::from_secs(2)),
            Duration::from_secs(1),
        );
        assert!(
            drv.suspend(&vm()).is_err(),
            "a primary without its status fields"
        );
    }

    #[test]
    fn the_status_report_keeps_only_known_fields() {
        let f = fake::serve::<Blkback>(|_| {
            let mut p = primary(PeerLink::InSync, 1);
            p.dirty_bytes = 7;
            status(NodeStatus::Primary { primary: p })
        });
        let r = driver(&f, Duration::from_secs(3)).report(&vm()).unwrap();
        assert_eq!(r["role"], "primary");
        assert_eq!(r["dirty_bytes"], 7);
        assert_eq!(r["peer"], "in_sync");
        let (_d2, p2) = fake::raw("garbage\n");
        let drv2 = BlkbackDriver::new(
            Client::new(&p2, Duration::from_secs(2)),
            Duration::from_secs(1),
        );
        assert!(drv2.report(&vm()).unwrap()["error"].is_string());
    }

    #[test]
    fn forcing_remote_mode_on_a_healthy_store_is_refused() {
        let f = fake::serve::<Blkback>(|_| {
            status(NodeStatus::Primary {
                primary: primary(PeerLink::InSync, 1),
            })
        });
        let drv = driver(&f, Duration::from_secs(3));
        let e = drv.redirect(&vm(), true).unwrap_err();
        assert!(e.reason.contains("healthy"), "{e}");
        drv.redirect(&vm(), false).unwrap();
    }
}
