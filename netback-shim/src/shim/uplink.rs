//! When the uplink is lost, when the VM's frames go to the peer, and when they come back: the
//! uplink monitor's decisions as a pure state machine, fed with one observation per poll and
//! the time. The monitor thread (`monitor`) reads the carrier and the counters, feeds them
//! here, and carries out the [`Step`] it gets (tunnel messages, announcements).
//!
//! The uplink has failed when it loses carrier, or when it keeps carrier but received nothing
//! for the silence timeout while the VM's frames went out and the peer reports its own uplink
//! receiving. A redirect for lost carrier ends after carrier for two polls in a row; one for
//! silence when frames arrive again; one the agent forced when it lifts or reverses its
//! override.

use std::time::{Duration, Instant};

use super::RedirectReason;

/// How often each relay tells its peer whether its uplink receives.
pub(super) const STATUS_INTERVAL: Duration = Duration::from_millis(250);
/// How often a redirecting relay repeats its request to the peer.
const REDIRECT_REPEAT: Duration = Duration::from_secs(1);

/// What the monitor sees of the uplink at one poll.
#[derive(Debug, Clone, Copy)]
pub(super) struct Poll {
    /// When.
    pub(super) now: Instant,
    /// The uplink is up with carrier.
    pub(super) carrier: bool,
    /// Valid frames received on the uplink so far, for anyone (its sign of life).
    pub(super) rx_frames: u64,
    /// The VM's frames sent on the uplink so far.
    pub(super) tx_frames: u64,
}

/// What the redirect decision depends on besides the uplink itself.
#[derive(Debug, Clone, Copy)]
pub(super) struct Context {
    /// The peer's last report says its uplink receives, and that report is recent.
    pub(super) peer_uplink_alive: bool,
    /// The agent's override: `Some(true)` redirect, `Some(false)` stay local.
    pub(super) forced: Option<bool>,
    /// The relay forwards the VM's frames (not standby).
    pub(super) active: bool,
}

/// What to do after a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Nothing.
    Stay,
    /// Ask the peer to carry the VM's frames; once the request left, report it with
    /// [`UplinkMonitor::redirect_started`].
    StartRedirect(RedirectReason),
    /// Repeat the redirect request (a peer that restarted lost it with the link's session);
    /// once it left, report it with [`UplinkMonitor::request_sent`].
    RepeatRequest,
    /// The local path is back: the redirect has ended; tell the peer and announce locally.
    EndRedirect,
}

/// What the uplink monitor remembers between polls.
#[derive(Debug, Clone)]
pub(super) struct UplinkMonitor {
    interval: Duration,
    silence_timeout: Option<Duration>,
    carrier: bool,
    up_polls: u32,
    seen_rx: u64,
    seen_tx: u64,
    last_rx: Instant,
    last_tx: Instant,
    last_request: Instant,
    last_status: Instant,
    redirect: Option<RedirectReason>,
}

/// Whether the peer's last status report (when, its uplink receives) says its uplink is alive.
pub(super) fn peer_uplink_alive(report: Option<(Instant, bool)>, now: Instant) -> bool {
    report.is_some_and(|(at, alive)| alive && now.duration_since(at) < STATUS_INTERVAL * 4)
}

impl UplinkMonitor {
    /// A monitor polled every `interval` from `now` on; `silence_timeout` as in
    /// [`super::ShimConfig::silence_timeout`].
    pub(super) fn new(now: Instant, interval: Duration, silence_timeout: Option<Duration>) -> Self {
        UplinkMonitor {
            interval,
            silence_timeout,
            carrier: false,
            up_polls: 0,
            seen_rx: 0,
            seen_tx: 0,
            last_rx: now,
            last_tx: now,
            last_request: now,
            last_status: now,
            redirect: None,
        }
    }

    /// Why the VM's frames go to the peer now (`None`: they leave locally).
    pub(super) fn redirect(&self) -> Option<RedirectReason> {
        self.redirect
    }

    /// Records one poll: carrier, and whether frames came in or went out since the last one.
    pub(super) fn observe(&mut self, p: Poll) {
        self.carrier = p.carrier;
        self.up_polls = if p.carrier {
            self.up_polls.saturating_add(1)
        } else {
            0
        };
        if p.rx_frames != self.seen_rx {
            self.seen_rx = p.rx_frames;
            self.last_rx = p.now;
        }
        if p.tx_frames != self.seen_tx {
            self.seen_tx = p.tx_frames;
            self.last_tx = p.now;
        }
    }

    /// Whether a status report to the peer is due at `now`: then what it says (this uplink
    /// has carrier and receives). Counts the report as sent.
    pub(super) fn status_due(&mut self, now: Instant) -> Option<bool> {
        if now.duration_since(self.last_status) < STATUS_INTERVAL {
            return None;
        }
        self.last_status = now;
        let receiving = self
            .silence_timeout
            .is_none_or(|t| now.duration_since(self.last_rx) < t);
        Some(self.carrier && receiving)
    }

    /// Decides, after [`UplinkMonitor::observe`], whether a redirect starts, goes on or ends.
    pub(super) fn decide(&mut self, now: Instant, cx: Context) -> Step {
        let Some(reason) = self.redirect else {
            let reason = if let Some(on) = cx.forced {
                on.then_some(RedirectReason::Forced)
            } else if !self.carrier {
                Some(RedirectReason::Carrier)
            } else if self.silent(now, cx.peer_uplink_alive) {
                Some(RedirectReason::Silence)
            } else {
                None
            };
            return match reason {
                Some(reason) if cx.active => Step::StartRedirect(reason),
                _ => Step::Stay,
            };
        };
        let back = match (cx.forced, reason) {
            (Some(on), _) => !on,
            // The override was lifted: back, and judged again from the next poll.
            (None, RedirectReason::Forced) => true,
            // Carrier for two polls in a row.
            (None, RedirectReason::Carrier) => self.up_polls >= 2,
            // Carrier, and frames arriving again.
            (None, RedirectReason::Silence) => {
                self.carrier && now.duration_since(self.last_rx) < self.interval * 2
            }
        };
        if back {
            self.redirect = None;
            // Give the local path a full silence period before judging it again.
            self.last_rx = now;
            Step::EndRedirect
        } else if now.duration_since(self.last_request) >= REDIRECT_REPEAT {
            Step::RepeatRequest
        } else {
            Step::Stay
        }
    }

    /// The request of a [`Step::StartRedirect`] left at `now`: the redirect is on.
    pub(super) fn redirect_started(&mut self, reason: RedirectReason, now: Instant) {
        self.redirect = Some(reason);
        self.last_request = now;
    }

    /// The request of a [`Step::RepeatRequest`] left at `now`.
    pub(super) fn request_sent(&mut self, now: Instant) {
        self.last_request = now;
    }

    /// Carrier, but nothing received for the silence timeout while the VM's frames went out
    /// and the peer's uplink receives.
    fn silent(&self, now: Instant, peer_uplink_alive: bool) -> bool {
        self.silence_timeout.is_some_and(|t| {
            self.carrier
                && now.duration_since(self.last_rx) >= t
                && now.duration_since(self.last_tx) < t
                && peer_uplink_alive
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(50);
    const SILENCE: Duration = Duration::from_secs(2);

    /// A monitor and its uplink, polled every [`INTERVAL`] on a clock of its own.
    struct Uplink {
        m: UplinkMonitor,
        start: Instant,
        now: Instant,
        carrier: bool,
        rx: u64,
        tx: u64,
    }

    impl Uplink {
        fn new() -> Self {
            let start = Instant::now();
            Uplink {
                m: UplinkMonitor::new(start, INTERVAL, Some(SILENCE)),
                start,
                now: start,
                carrier: true,
                rx: 0,
                tx: 0,
            }
        }

        /// An uplink that worked for a second, then lost carrier.
        fn carrier_lost_after_a_second() -> Self {
            let mut u = Uplink::new();
            u.run(Duration::from_secs(1), BOTH, AUTO);
            u.carrier = false;
            u
        }

        /// One poll; a started redirect or a repeated request is reported as sent.
        fn poll(&mut self, cx: Context) -> Step {
            self.now += INTERVAL;
            self.m.observe(Poll {
                now: self.now,
                carrier: self.carrier,
                rx_frames: self.rx,
                tx_frames: self.tx,
            });
            let step = self.m.decide(self.now, cx);
            match step {
                Step::StartRedirect(reason) => self.m.redirect_started(reason, self.now),
                Step::RepeatRequest => self.m.request_sent(self.now),
                Step::Stay | Step::EndRedirect => {}
            }
            step
        }

        /// Polls for `d`, the uplink receiving and sending when `traffic`; returns every step
        /// other than [`Step::Stay`].
        fn run(&mut self, d: Duration, traffic: (bool, bool), cx: Context) -> Vec<Step> {
            let end = self.now + d;
            let mut steps = Vec::new();
            while self.now < end {
                self.rx += u64::from(traffic.0);
                self.tx += u64::from(traffic.1);
                let s = self.poll(cx);
                if s != Step::Stay {
                    steps.push(s);
                }
            }
            steps
        }
    }

    const AUTO: Context = Context {
        peer_uplink_alive: true,
        forced: None,
        active: true,
    };
    const BOTH: (bool, bool) = (true, true);
    const SENDING_ONLY: (bool, bool) = (false, true);

    #[test]
    fn a_healthy_uplink_is_never_redirected() {
        let mut u = Uplink::new();
        assert!(u.run(Duration::from_secs(10), BOTH, AUTO).is_empty());
        assert_eq!(u.m.redirect(), None);
    }

    #[test]
    fn carrier_loss_redirects_at_once_and_ends_after_two_polls_with_carrier() {
        let mut u = Uplink::carrier_lost_after_a_second();
        assert_eq!(u.poll(AUTO), Step::StartRedirect(RedirectReason::Carrier));
        assert_eq!(u.m.redirect(), Some(RedirectReason::Carrier));
        u.carrier = true;
        assert_eq!(
            u.poll(AUTO),
            Step::Stay,
            "one poll with carrier is not enough"
        );
        assert_eq!(u.poll(AUTO), Step::EndRedirect);
        assert_eq!(u.m.redirect(), None);
    }

    #[test]
    fn a_standby_relay_never_starts_a_redirect() {
        let mut u = Uplink::new();
        u.carrier = false;
        let standby = Context {
            active: false,
            ..AUTO
        };
        assert!(u.run(Duration::from_secs(3), BOTH, standby).is_empty());
    }

    #[test]
    fn a_redirect_not_yet_requested_is_asked_for_again_at_the_next_poll() {
        let mut u = Uplink::new();
        u.carrier = false;
        u.now += INTERVAL;
        u.m.observe(Poll {
            now: u.now,
            carrier: false,
            rx_frames: 0,
            tx_frames: 0,
        });
        // The tunnel refused the request: nothing is recorded.
        assert_eq!(
            u.m.decide(u.now, AUTO),
            Step::StartRedirect(RedirectReason::Carrier)
        );
        assert_eq!(u.m.redirect(), None);
        assert_eq!(u.poll(AUTO), Step::StartRedirect(RedirectReason::Carrier));
    }

    #[test]
    fn silence_while_sending_redirects_only_when_the_peer_receives() {
        let mut u = Uplink::new();
        let peer_dead = Context {
            peer_uplink_alive: false,
            ..AUTO
        };
        assert!(u.run(SILENCE * 2, SENDING_ONLY, peer_dead).is_empty());
        let steps = u.run(INTERVAL, SENDING_ONLY, AUTO);
        assert_eq!(steps, [Step::StartRedirect(RedirectReason::Silence)]);
    }

    #[test]
    fn silence_is_judged_only_after_the_timeout() {
        let mut u = Uplink::new();
        let early = u.run(SILENCE - INTERVAL * 2, SENDING_ONLY, AUTO);
        assert!(early.is_empty(), "{early:?}");
        let steps = u.run(INTERVAL * 3, SENDING_ONLY, AUTO);
        assert_eq!(steps, [Step::StartRedirect(RedirectReason::Silence)]);
    }

    #[test]
    fn a_silent_uplink_is_not_failed_while_the_vm_sends_nothing() {
        let mut u = Uplink::new();
        assert!(u.run(SILENCE * 3, (false, false), AUTO).is_empty());
    }

    #[test]
    fn a_silence_redirect_ends_when_frames_arrive_again() {
        let mut u = Uplink::new();
        u.run(SILENCE + INTERVAL * 2, SENDING_ONLY, AUTO);
        assert_eq!(u.m.redirect(), Some(RedirectReason::Silence));
        // While redirected the VM's frames leave by the tunnel: none go out locally.
        let steps = u.run(Duration::from_millis(500), (true, false), AUTO);
        assert_eq!(steps, [Step::EndRedirect]);
        assert_eq!(u.m.redirect(), None);
    }

    #[test]
    fn after_a_carrier_redirect_the_uplink_gets_a_full_silence_period() {
        let mut u = Uplink::carrier_lost_after_a_second();
        u.run(Duration::from_secs(3), (false, false), AUTO);
        u.carrier = true;
        let steps = u.run(INTERVAL * 2, SENDING_ONLY, AUTO);
        assert_eq!(steps.last(), Some(&Step::EndRedirect));
        // Nothing was received for seconds, but the silence is counted from the end.
        let early = u.run(SILENCE - INTERVAL * 2, SENDING_ONLY, AUTO);
        assert!(early.is_empty(), "{early:?}");
    }

    #[test]
    fn a_redirect_request_is_repeated_every_second_while_it_lasts() {
        let mut u = Uplink::new();
        u.carrier = false;
        let steps = u.run(Duration::from_millis(2500), BOTH, AUTO);
        assert_eq!(
            steps,
            [
                Step::StartRedirect(RedirectReason::Carrier),
                Step::RepeatRequest,
                Step::RepeatRequest
            ]
        );
    }

    #[test]
    fn the_agents_override_forces_and_lifts_a_redirect() {
        let mut u = Uplink::new();
        let on = Context {
            forced: Some(true),
            ..AUTO
        };
        assert_eq!(u.poll(on), Step::StartRedirect(RedirectReason::Forced));
        assert_eq!(u.poll(on), Step::Stay);
        // Lifted: back at once, judged automatically from the next poll.
        assert_eq!(u.poll(AUTO), Step::EndRedirect);
        assert_eq!(u.poll(AUTO), Step::Stay);
    }

    #[test]
    fn forcing_local_ends_a_carrier_redirect_and_keeps_the_frames_local() {
        let mut u = Uplink::new();
        u.carrier = false;
        u.poll(AUTO);
        let off = Context {
            forced: Some(false),
            ..AUTO
        };
        assert_eq!(u.poll(off), Step::EndRedirect);
        assert!(u.run(Duration::from_secs(2), BOTH, off).is_empty());
    }

    #[test]
    fn status_reports_every_250_ms_say_whether_the_uplink_receives() {
        let mut u = Uplink::new();
        u.m.observe(Poll {
            now: u.start,
            carrier: true,
            rx_frames: 1,
            tx_frames: 0,
        });
        assert_eq!(u.m.status_due(u.start + Duration::from_millis(100)), None);
        let t = u.start + STATUS_INTERVAL;
        assert_eq!(u.m.status_due(t), Some(true));
        assert_eq!(u.m.status_due(t + Duration::from_millis(100)), None);
        assert_eq!(u.m.status_due(u.start + SILENCE), Some(false), "silent");
        u.m.observe(Poll {
            now: u.start + SILENCE,
            carrier: false,
            rx_frames: 2,
            tx_frames: 0,
        });
        let t = u.start + SILENCE + STATUS_INTERVAL;
        assert_eq!(u.m.status_due(t), Some(false), "no carrier");
    }

    #[test]
    fn the_peers_status_counts_for_a_second() {
        let t = Instant::now();
        assert!(peer_uplink_alive(
            Some((t, true)),
            t + Duration::from_millis(999)
        ));
        assert!(!peer_uplink_alive(
            Some((t, true)),
            t + Duration::from_secs(1)
        ));
        assert!(!peer_uplink_alive(Some((t, false)), t));
        assert!(!peer_uplink_alive(None, t));
    }
}
