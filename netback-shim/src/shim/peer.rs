//! The tunnel to the peer's shim: what this relay sends it, and what it makes of the peer's
//! messages (a redirect to serve, the peer's uplink status, frames in both directions).

use std::time::Instant;

use bytes::Bytes;

use super::counters::wire_len;
use super::{Inner, Mode, State};
use crate::frame;
use crate::tunnel::TunnelMsg;

impl Inner {
    pub(super) fn send_tunnel(st: &mut State, msg: &TunnelMsg) -> bool {
        let Some(t) = st.tunnel.clone() else {
            return false;
        };
        let ok = t.send(msg.encode()).is_ok();
        if !ok {
            st.c.dropped.send_failed += 1;
        }
        ok
    }

    pub(super) fn on_tunnel(&self, msg: &Bytes) {
        let mut st = self.lock();
        let Ok(m) = TunnelMsg::decode(msg) else {
            st.c.dropped.tunnel_garbage += 1;
            return;
        };
        let mac = match &m {
            TunnelMsg::RedirectStart(m)
            | TunnelMsg::RedirectStop(m)
            | TunnelMsg::FromVm(m, _)
            | TunnelMsg::ToVm(m, _)
            | TunnelMsg::UplinkStatus(m, _) => *m,
        };
        if st.vm_mac.is_some_and(|v| v != mac) || mac.is_group() {
            st.c.dropped.tunnel_garbage += 1;
            return;
        }
        st.vm_mac = Some(mac);
        if st.isolated && matches!(m, TunnelMsg::FromVm(..) | TunnelMsg::ToVm(..)) {
            // A fenced copy neither carries the peer's frames nor receives its own.
            st.c.dropped.isolated += 1;
            return;
        }
        match m {
            TunnelMsg::RedirectStart(_) => {
                // Repeated every second by the peer while it redirects: act on the first only.
                if !st.c.redirect.serving_peer {
                    tracing::warn!(uplink = %self.cfg.uplink, "peer's uplink is down: carrying its VM's frames");
                    st.c.redirect.serving_peer = true;
                    self.announce_and_repeat(&mut st);
                }
            }
            TunnelMsg::RedirectStop(_) => {
                st.c.redirect.serving_peer = false;
                // The peer announces itself now; a late repeat from here would pull the MAC back.
                st.announce_repeats.clear();
            }
            TunnelMsg::UplinkStatus(_, alive) => st.peer_status = Some((Instant::now(), alive)),
            TunnelMsg::FromVm(_, f) => {
                if !st.c.redirect.serving_peer {
                    st.c.dropped.tunnel_unexpected += 1;
                    return;
                }
                let Ok(eth) = frame::check_packet(&f, f.len(), self.cfg.mtu) else {
                    st.c.dropped.tunnel_garbage += 1;
                    return;
                };
                if frame::src_mac(eth) != Some(mac) {
                    st.c.dropped.tunnel_garbage += 1;
                    return;
                }
                st.learn(eth);
                st.c.tunnel_in_frames += 1;
                match self.uplink.send(&f) {
                    Ok(()) => {
                        st.c.to_uplink_frames += 1;
                        st.c.to_uplink_bytes += wire_len(&f);
                    }
                    Err(_) => st.c.dropped.send_failed += 1,
                }
            }
            TunnelMsg::ToVm(_, f) => {
                if !st.c.redirect.redirecting || st.mode == Mode::Standby {
                    st.c.dropped.tunnel_unexpected += 1;
                    return;
                }
                let dst = frame::check_packet(&f, f.len(), self.cfg.mtu)
                    .ok()
                    .and_then(frame::dst_mac);
                if !dst.is_some_and(|d| d == mac || d.is_group()) {
                    st.c.dropped.tunnel_garbage += 1;
                    return;
                }
                st.c.tunnel_in_frames += 1;
                let Some(vif) = self.vif_socket() else {
                    st.c.dropped.vif_absent += 1;
                    return;
                };
                match vif.send(&f) {
                    Ok(()) => {
                        st.c.to_vm_frames += 1;
                        st.c.to_vm_bytes += wire_len(&f);
                    }
                    Err(_) => st.c.dropped.send_failed += 1,
                }
            }
        }
    }
}
