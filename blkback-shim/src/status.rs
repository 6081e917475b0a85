//! What the control socket serves: a [`Node`] (this process's role) answers the requests of
//! the contract `xenft_control::blkback` (the daemon adds `promote` and the A-link's status),
//! and [`EventWatch`] turns changes of its status into the contract's events.
//!
//! Requests by role (anything else is refused with `refused`):
//! - any: `status` → the role and its status (`peer` `degraded` / `resyncing` / `in_sync`,
//!   `dirty_bytes`, `resync` progress with bytes left / rate / ETA, `local_failure`, counters;
//!   or the secondary's `connected`, `disk`, `held_epochs`, ...);
//! - primary: `resync_rate`, `verify`, `checkpoint` (the checkpoint engine's
//!   `CommitSink::checkpoint`: later writes belong to epoch `n + 1`), `set_epoch`, `commit`
//!   (replies once the secondary applied epoch `n`);
//! - secondary: `epoch_mode`, `commit_local` (applies held epochs `<= n`), `discard`
//!   (failover: drops uncommitted epochs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use xenft_control::blkback::{Event, NodeStatus, PeerLink, PrimaryStatus, Reply, Request, Status};
use xenft_control::{ErrorReply, Events};

use crate::mirror::primary::Primary;
use crate::mirror::secondary::Secondary;

/// What this process is.
#[derive(Clone)]
pub enum Node {
    /// Serving the disk without a peer.
    Local,
    /// Serving the disk and mirroring it.
    Primary(Arc<Primary>),
    /// Holding the copy.
    Secondary(Arc<Secondary>),
}

impl Node {
    /// The role's name.
    #[must_use]
    pub fn role(&self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Primary(_) => "primary",
            Self::Secondary(_) => "secondary",
        }
    }

    /// The role and its status.
    #[must_use]
    pub fn status(&self) -> NodeStatus {
        match self {
            Self::Local => NodeStatus::Local,
            Self::Primary(p) => NodeStatus::Primary {
                primary: p.status(),
            },
            Self::Secondary(s) => NodeStatus::Secondary {
                secondary: s.status(),
            },
        }
    }

    /// Carries out one request (everything but `promote`, which the daemon owns).
    ///
    /// # Errors
    /// `refused` for a request of another role, `failed` when the operation failed.
    pub async fn handle(&self, req: Request) -> Result<Reply, ErrorReply> {
        match (req, self) {
            (Request::Status, _) => Ok(Reply::Status(Box::new(Status {
                node: self.status(),
                alink: None,
            }))),
            (Request::ResyncRate { bytes_per_sec }, Self::Primary(p)) => {
                p.set_resync_rate(bytes_per_sec);
                Ok(Reply::Done)
            }
            (Request::Verify { block }, Self::Primary(p)) => p
                .verify(block.unwrap_or(64 * 1024))
                .await
                .map(|verify| Reply::Verify { verify })
                .map_err(ErrorReply::failed),
            (Request::Checkpoint { epoch }, Self::Primary(p)) => {
                p.checkpoint_boundary(epoch);
                Ok(Reply::Checkpoint {
                    next_epoch: epoch.saturating_add(1),
                })
            }
            (Request::SetEpoch { epoch }, Self::Primary(p)) => {
                p.set_epoch(epoch);
                Ok(Reply::Done)
            }
            (Request::Commit { epoch }, Self::Primary(p)) => match p.commit_epoch(epoch).await {
                Ok(Ok(())) => Ok(Reply::Done),
                _ => Err(ErrorReply::failed(format!(
                    "commit of epoch {epoch} failed: no session with the secondary"
                ))),
            },
            (Request::EpochMode { on }, Self::Secondary(s)) => {
                s.set_epoch_mode(on);
                Ok(Reply::Done)
            }
            (Request::CommitLocal { epoch }, Self::Secondary(s)) => {
                let s = s.clone();
                match tokio::task::spawn_blocking(move || s.commit_epoch(epoch)).await {
                    Ok(Ok(applied)) => Ok(Reply::Applied { applied }),
                    Ok(Err(e)) => Err(ErrorReply::failed(e)),
                    Err(_) => Err(ErrorReply::failed("commit task failed")),
                }
            }
            (Request::Discard, Self::Secondary(s)) => Ok(Reply::Discarded {
                discarded: s.discard_uncommitted(),
            }),
            (req, node) => Err(ErrorReply::refused(format!(
                "{} is not a request for a {} (see xenft_control::blkback)",
                op_name(&req),
                node.role()
            ))),
        }
    }
}

/// The request's `op`, for messages.
fn op_name(req: &Request) -> String {
    serde_json::to_value(req)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str().map(str::to_string)))
        .unwrap_or_else(|| "request".into())
}

/// How often [`EventWatch`] looks at the status.
pub const EVENT_POLL: Duration = Duration::from_millis(50);
/// How often a running resync's progress is published.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Turns changes of a primary's status into events: the session lost (`peer_lost`), the copy
/// in sync again (`in_sync`), a running resync's progress, the local store failing
/// (`disk_redirected`: the mirror serves from the peer's copy by itself).
#[derive(Debug, Default)]
pub struct EventWatch {
    last: Option<(PeerLink, bool)>,
    progress_at: Option<Instant>,
}

impl EventWatch {
    /// The events between the last status seen and `st` (pure: `now` is given).
    pub fn observe(&mut self, st: &PrimaryStatus, now: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        let failed = st.local_failure.is_some();
        let (was_link, was_failed) = self.last.unwrap_or((PeerLink::InSync, false));
        let first = self.last.is_none();
        if failed && !was_failed {
            out.push(Event::DiskRedirected {
                cause: st.local_failure.clone().unwrap_or_default(),
            });
        }
        if st.peer != was_link || first {
            match st.peer {
                PeerLink::Degraded if !first || st.sessions > 0 => out.push(Event::PeerLost {
                    reason: st.peer_failure.clone(),
                }),
                PeerLink::InSync if !first => out.push(Event::InSync),
                _ => {}
            }
        }
        match &st.resync {
            Some(r) if self.progress_at.is_none_or(|t| now >= t + PROGRESS_EVERY) => {
                out.push(Event::ResyncProgress(r.clone()));
                self.progress_at = Some(now);
            }
            Some(_) => {}
            None => self.progress_at = None,
        }
        self.last = Some((st.peer, failed));
        out
    }
}

/// Publishes `node`'s events on `events` until the task is aborted (the node may change from
/// secondary to primary on `promote`: `current` is read each time).
pub async fn publish_events(current: impl Fn() -> Node + Send, events: Arc<Events<Event>>) {
    let mut watch = EventWatch::default();
    let mut tick = tokio::time::interval(EVENT_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Node::Primary(p) = current() {
            for e in watch.observe(&p.status(), Instant::now()) {
                tracing::info!(event = ?e, "blkback event");
                events.publish(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenft_control::blkback::ResyncProgress;

    fn st(peer: PeerLink) -> PrimaryStatus {
        PrimaryStatus {
            peer,
            peer_synced: true,
            sessions: 1,
            ..PrimaryStatus::default()
        }
    }

    #[test]
    fn a_lost_session_a_resync_and_the_return_to_sync_are_events() {
        let t0 = Instant::now();
        let mut w = EventWatch::default();
        assert!(w.observe(&st(PeerLink::InSync), t0).is_empty());
        let mut lost = st(PeerLink::Degraded);
        lost.peer_failure = Some("A-link: no path".into());
        assert_eq!(
            w.observe(&lost, t0),
            vec![Event::PeerLost {
                reason: Some("A-link: no path".into())
            }]
        );
        assert!(w.observe(&lost, t0).is_empty(), "said once");
        let mut resync = st(PeerLink::Resyncing);
        resync.resync = Some(ResyncProgress {
            total_bytes: 100,
            bytes_left: 60,
            ..ResyncProgress::default()
        });
        assert!(matches!(
            w.observe(&resync, t0)[..],
            [Event::ResyncProgress(_)]
        ));
        assert!(w
            .observe(&resync, t0 + Duration::from_millis(500))
            .is_empty());
        assert_eq!(
            w.observe(&resync, t0 + Duration::from_millis(1100)).len(),
            1,
            "progress about once a second"
        );
        assert_eq!(w.observe(&st(PeerLink::InSync), t0), vec![Event::InSync]);
    }

    #[test]
    fn a_failed_local_store_is_a_redirect_event_once() {
        let mut w = EventWatch::default();
        let t0 = Instant::now();
        let mut failed = st(PeerLink::InSync);
        failed.local_failure = Some("Write of 4096 bytes at offset 0: EIO".into());
        assert_eq!(
            w.observe(&failed, t0),
            vec![Event::DiskRedirected {
                cause: "Write of 4096 bytes at offset 0: EIO".into()
            }]
        );
        assert!(w.observe(&failed, t0).is_empty());
    }

    #[test]
    fn a_primary_that_starts_without_its_peer_has_lost_nothing() {
        let mut w = EventWatch::default();
        let mut fresh = st(PeerLink::Degraded);
        fresh.sessions = 0;
        assert!(w.observe(&fresh, Instant::now()).is_empty());
    }
}
