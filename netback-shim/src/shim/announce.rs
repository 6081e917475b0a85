//! Announcing the VM's MAC and addresses on the local uplink after a move (takeover, redirect
//! start or end), and repeating the announcement, as hosts and switches may miss one.

use std::time::{Duration, Instant};

use super::{Inner, Mode, State};
use crate::frame;

/// After a move (takeover, redirect start or end) the announcement is repeated at these delays.
const ANNOUNCE_REPEATS: [Duration; 2] = [Duration::from_millis(200), Duration::from_secs(1)];

impl Inner {
    /// Gratuitous ARP per IPv4 address, unsolicited NA per IPv6 address, and one relearn
    /// frame, all from the VM's MAC, on the local uplink.
    pub(super) fn announce(&self, st: &mut State) -> usize {
        if st.isolated {
            return 0; // a fenced copy claims nothing
        }
        let Some(mac) = st.vm_mac else { return 0 };
        let mut frames: Vec<Vec<u8>> = st
            .v4
            .iter()
            .map(|ip| frame::gratuitous_arp(mac, *ip))
            .collect();
        frames.extend(st.v6.iter().map(|ip| frame::unsolicited_na(mac, *ip)));
        frames.push(frame::relearn_frame(mac));
        let frames: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| frame::with_plain_vnet_hdr(f))
            .collect();
        let mut sent = 0;
        for f in &frames {
            match self.uplink.send(f) {
                Ok(()) => sent += 1,
                Err(_) => st.c.dropped.send_failed += 1,
            }
        }
        st.c.announcements_sent += sent as u64;
        sent
    }

    /// Announces now and schedules the repeats of [`ANNOUNCE_REPEATS`].
    pub(super) fn announce_and_repeat(&self, st: &mut State) -> usize {
        let now = Instant::now();
        st.announce_repeats = ANNOUNCE_REPEATS.iter().map(|d| now + *d).collect();
        self.announce(st)
    }

    /// Sends the announcement again when a repeat is due at `now`, as long as this relay is
    /// where the VM's frames enter the network (otherwise the repeats are dropped).
    pub(super) fn repeat_announcement_if_due(&self, st: &mut State, now: Instant) {
        if st.announce_repeats.first().is_some_and(|t| *t <= now) {
            st.announce_repeats.remove(0);
            // Only while this relay is where the VM's frames enter the network.
            let here = (st.mode != Mode::Standby && !st.c.redirect.redirecting)
                || st.c.redirect.serving_peer;
            if here {
                self.announce(st);
            } else {
                st.announce_repeats.clear();
            }
        }
    }
}
