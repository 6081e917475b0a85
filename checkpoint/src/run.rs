//! Driving the engine from a process: the checkpoint channel over an A-link between two
//! hosts, the secondary's decision that the primary is gone, and the primary's wait for its
//! protection to end. Used by `xenft-checkpoint` and the nested Xen lab's probe.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use xenft_checkpoint::run::{self, Liveness};
//! # fn f(rt: &tokio::runtime::Runtime, cfg: xenft_alink::LinkConfig,
//! #      sec: &xenft_checkpoint::engine::secondary::SecondaryHandle<xenft_checkpoint::testing::MemoryDomain>)
//! #      -> Result<(), run::RunError> {
//! let dead_after = cfg.path_timeout;
//! let link = run::start_link(rt, cfg, None)?;                 // secondary: do not wait
//! // ... endpoint(&link, rt.handle().clone()), start_secondary(replica, endpoint, ..) ...
//! let _last = run::wait_primary_lost(sec, &Liveness::Link { link: &link, dead_after },
//!                                    Duration::from_millis(100), None, |_| {})?;
//! // now fail over: sec.failover()
//! # Ok(()) }
//! ```

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use thiserror::Error;
use xenft_alink::{Link, LinkConfig, LinkError};

use crate::domain::Domain;
use crate::engine::primary::{Phase, Protection, ProtectionStatus};
use crate::engine::secondary::{SecondaryHandle, SecondaryStatus};

/// Why driving the engine stopped short.
#[derive(Debug, Error)]
pub enum RunError {
    /// The A-link could not start (bad configuration, address not bindable).
    #[error("starting the A-link: {0}")]
    Link(#[from] LinkError),
    /// No path of the A-link came up in time.
    #[error("the A-link to {peer} did not connect within {waited:?}")]
    NotConnected {
        /// The peer host's name.
        peer: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The primary did not go away before the deadline.
    #[error("the primary was still alive at the deadline")]
    Deadline,
    /// The primary's process restarted (its host is alive and talks to us again): the epochs
    /// in flight are lost and protection must start over; no failover.
    #[error("the primary restarted: protection must start over (no failover)")]
    PrimaryRestarted,
    /// The checkpoint stream ended before any checkpoint was committed: nothing to fail over
    /// to, and nothing more will arrive.
    #[error("the checkpoint stream ended before any checkpoint was committed: {0}")]
    EndedWithoutCheckpoint(String),
}

/// Starts the A-link on `rt`; with `wait`, waits that long for a first path to come up.
///
/// # Errors
/// [`RunError::Link`] if the link cannot start, [`RunError::NotConnected`] after `wait`.
pub fn start_link(
    rt: &tokio::runtime::Runtime,
    cfg: LinkConfig,
    wait: Option<Duration>,
) -> Result<Link, RunError> {
    let peer = cfg.peer_host.clone();
    let link = rt.block_on(Link::start(cfg))?;
    if let Some(waited) = wait {
        if !rt.block_on(link.wait_connected(waited)) {
            link.shutdown();
            return Err(RunError::NotConnected { peer, waited });
        }
    }
    Ok(link)
}

/// Whether at least one path of `link` is up.
#[must_use]
pub fn link_up(link: &Link) -> bool {
    link.status().paths.iter().any(|p| p.up)
}

/// The judgement that the peer is gone, from what is observed over time: the link has had no
/// live path for `dead_after` **and** a checkpoint was committed. On the secondary, before the
/// first committed checkpoint there is nothing to fail over to, so it keeps waiting; the
/// primary, which gives up protection when its secondary is gone, passes any `Some`.
#[derive(Debug, Clone)]
pub struct PeerLoss {
    dead_after: Duration,
    down_since: Option<Instant>,
}

impl PeerLoss {
    /// A judge that declares the primary gone after `dead_after` without a live path.
    #[must_use]
    pub fn new(dead_after: Duration) -> Self {
        Self {
            dead_after,
            down_since: None,
        }
    }

    /// One observation at `now`: whether the primary is now judged gone.
    pub fn observe(&mut self, now: Instant, link_up: bool, committed: Option<u64>) -> bool {
        if link_up || committed.is_none() {
            self.down_since = None;
            return false;
        }
        let since = *self.down_since.get_or_insert(now);
        now.saturating_duration_since(since) >= self.dead_after
    }
}

/// How the secondary learns that the primary is gone.
pub enum Liveness<'a> {
    /// A stream transport (Unix socket): the engine reports the stream's end
    /// ([`SecondaryStatus::primary_gone`]).
    Stream,
    /// An A-link: the link reconnects by itself, so the primary is gone when no path has been
    /// up for `dead_after` after a checkpoint was committed ([`PeerLoss`]). A stream that
    /// ended while the link is up means the primary restarted
    /// ([`RunError::PrimaryRestarted`]).
    Link {
        /// The link carrying the checkpoint channel.
        link: &'a Link,
        /// How long without a live path.
        dead_after: Duration,
    },
}

/// Polls the secondary every `poll` until the primary is gone (per `liveness`), calling
/// `tick` with each status; returns the last status. The replica is then ready for
/// [`SecondaryHandle::failover`].
///
/// # Errors
/// [`RunError::Deadline`] if `deadline` passes first; over an A-link,
/// [`RunError::PrimaryRestarted`] and [`RunError::EndedWithoutCheckpoint`].
pub fn wait_primary_lost<D: Domain + 'static>(
    sec: &SecondaryHandle<D>,
    liveness: &Liveness<'_>,
    poll: Duration,
    deadline: Option<Instant>,
    mut tick: impl FnMut(&SecondaryStatus),
) -> Result<SecondaryStatus, RunError> {
    let mut loss = match liveness {
        Liveness::Stream => None,
        Liveness::Link { dead_after, .. } => Some(PeerLoss::new(*dead_after)),
    };
    loop {
        let st = sec.status();
        tick(&st);
        let gone = match (liveness, loss.as_mut()) {
            (Liveness::Link { link, .. }, Some(loss)) => {
                let up = link_up(link);
                if st.primary_gone && up {
                    return Err(RunError::PrimaryRestarted);
                }
                if st.primary_gone && st.committed_epoch.is_none() {
                    let why = st.last_error.clone().unwrap_or_else(|| "closed".into());
                    return Err(RunError::EndedWithoutCheckpoint(why));
                }
                loss.observe(Instant::now(), up, st.committed_epoch)
            }
            _ => st.primary_gone,
        };
        if gone {
            return Ok(st);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(RunError::Deadline);
        }
        std::thread::sleep(poll);
    }
}

/// Looks at the protection every `poll` (first after one period), calling `tick` with each
/// status, until it ends by itself (stopped after its checkpoint budget, or failed) or `tick`
/// breaks; returns the last status. The caller then stops it ([`Protection::stop`]).
pub fn drive_primary<D: Domain + 'static>(
    protection: &Protection<D>,
    poll: Duration,
    mut tick: impl FnMut(&ProtectionStatus) -> ControlFlow<()>,
) -> ProtectionStatus {
    loop {
        std::thread::sleep(poll);
        let finished = protection.is_finished();
        let st = protection.status();
        if tick(&st).is_break() || finished || matches!(st.phase, Phase::Stopped | Phase::Failed(_))
        {
            return st;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primary_is_gone_only_after_a_commit_and_a_dead_link_for_the_timeout() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut loss = PeerLoss::new(Duration::from_millis(1000));
        // Link down but nothing committed: keep waiting, however long.
        assert!(!loss.observe(s(0), false, None));
        assert!(!loss.observe(s(5000), false, None));
        // Committed, link down: the clock starts now.
        assert!(!loss.observe(s(6000), false, Some(3)));
        assert!(!loss.observe(s(6900), false, Some(3)));
        // A path comes back: the clock resets.
        assert!(!loss.observe(s(7000), true, Some(4)));
        assert!(!loss.observe(s(7500), false, Some(4)));
        assert!(!loss.observe(s(8400), false, Some(4)));
        assert!(loss.observe(s(8500), false, Some(4)));
    }

    #[test]
    fn a_dead_link_before_any_commit_keeps_the_secondary_waiting() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (l1, l2) = rt.block_on(xenft_alink::testing::loopback_pair(2)).unwrap();
        assert!(rt.block_on(l2.wait_connected(Duration::from_secs(5))));
        let ep = crate::alink::endpoint(&l2, rt.handle().clone()).unwrap();
        let sec = crate::engine::secondary::start_secondary(
            crate::testing::MemoryDomain::new(16),
            ep,
            crate::engine::secondary::SecondaryConfig::default(),
        )
        .unwrap();
        l1.shutdown();
        drop(l1);
        let liveness = Liveness::Link {
            link: &l2,
            dead_after: Duration::from_millis(200),
        };
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut saw_down = false;
        let r = wait_primary_lost(
            &sec,
            &liveness,
            Duration::from_millis(20),
            Some(deadline),
            |_| {
                saw_down |= !link_up(&l2);
            },
        );
        assert!(saw_down, "the link never went down");
        assert!(matches!(r, Err(RunError::Deadline)), "{r:?}");
        assert_eq!(sec.status().committed_epoch, None);
    }
}
