//! The monitor thread: at every poll it binds or drops the vif, repeats a due announcement,
//! reads the uplink's carrier, and carries out the decisions of the uplink state machine
//! ([`super::uplink`]): status reports to the peer, and the redirect's start, repeated
//! requests and end.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::uplink::{self, Context, Poll, Step, UplinkMonitor};
use super::{Inner, Mode, State};
use crate::tunnel::TunnelMsg;

impl Inner {
    pub(super) fn monitor_loop(&self) {
        // It takes the state lock too: at a lower priority it could be preempted while holding
        // it and stall the real-time forwarding threads (priority inversion).
        self.enter_realtime();
        let mut m = UplinkMonitor::new(
            Instant::now(),
            self.cfg.monitor_interval,
            self.cfg.silence_timeout,
        );
        while !self.stop.load(Ordering::Relaxed) {
            self.check_vif();
            let up = self.uplink.link_up().unwrap_or(false);
            let mut st = self.lock();
            self.monitor_step(&mut st, &mut m, up);
            drop(st);
            std::thread::sleep(self.cfg.monitor_interval);
        }
    }

    /// One poll of the uplink: carrier, signs of life, peer status; starts or ends redirects.
    fn monitor_step(&self, st: &mut State, m: &mut UplinkMonitor, up: bool) {
        let now = Instant::now();
        self.repeat_announcement_if_due(st, now);
        st.c.redirect.uplink_up = up;
        m.observe(Poll {
            now,
            carrier: up,
            rx_frames: st.c.from_uplink_frames,
            tx_frames: st.c.to_uplink_frames,
        });
        let Some(mac) = st.vm_mac else { return };
        if st.tunnel.is_some() {
            if let Some(alive) = m.status_due(now) {
                Self::send_tunnel(st, &TunnelMsg::UplinkStatus(mac, alive));
            }
        }
        let peer_alive = uplink::peer_uplink_alive(st.peer_status, now);
        st.c.redirect.peer_uplink_alive = peer_alive;
        let cx = Context {
            peer_uplink_alive: peer_alive,
            forced: st.c.redirect.forced,
            active: st.mode != Mode::Standby,
        };
        match m.decide(now, cx) {
            Step::Stay => {}
            Step::StartRedirect(reason) => {
                if Self::send_tunnel(st, &TunnelMsg::RedirectStart(mac)) {
                    tracing::warn!(uplink = %self.cfg.uplink, ?reason, "uplink failed: redirecting the VM's frames to the peer");
                    m.redirect_started(reason, now);
                    st.announce_repeats.clear();
                    st.c.redirect.redirects_started += 1;
                }
            }
            Step::RepeatRequest => {
                // A peer that restarted lost the request with the link's session.
                if Self::send_tunnel(st, &TunnelMsg::RedirectStart(mac)) {
                    m.request_sent(now);
                }
            }
            Step::EndRedirect => {
                tracing::info!(uplink = %self.cfg.uplink, "uplink back: traffic returns to the local path");
                Self::send_tunnel(st, &TunnelMsg::RedirectStop(mac));
                // Switches learnt the MAC on the peer's port during the redirect.
                self.announce_and_repeat(st);
            }
        }
        // The counters show the state machine's redirect.
        st.c.redirect.reason = m.redirect();
        st.c.redirect.redirecting = st.c.redirect.reason.is_some();
    }
}
