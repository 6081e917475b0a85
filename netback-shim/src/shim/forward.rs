//! The two forwarding threads: `vm-rx` (frames from the VM, validated, then held for their
//! epoch, forwarded, tunnelled while redirecting, or dropped in standby) and `uplink-rx`
//! (frames from the uplink for the VM's MAC or a group address, to the vif, and to the tunnel
//! while this shim carries the peer's traffic). While the relay is isolated (a fenced copy)
//! both drop every frame of the VM.

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use bytes::Bytes;

use super::counters::{count_refused, wire_len};
use super::vif::interface_gone;
use super::{Inner, Mode, State, BATCH, RECV_TIMEOUT, SLOT_LEN};
use crate::epoch::PushOutcome;
use crate::frame;
use crate::sys::RecvBatch;
use crate::tunnel::TunnelMsg;

impl Inner {
    /// Sends VM frames towards the network, in order: local uplink, or the tunnel while
    /// redirecting.
    pub(super) fn egress(&self, st: &mut State, frames: &[&[u8]]) {
        if frames.is_empty() {
            return;
        }
        if st.isolated {
            st.c.dropped.isolated += frames.len() as u64;
            return;
        }
        if st.c.redirect.redirecting {
            let (Some(t), Some(mac)) = (st.tunnel.clone(), st.vm_mac) else {
                st.c.dropped.no_tunnel += frames.len() as u64;
                return;
            };
            for f in frames {
                match t.send(TunnelMsg::FromVm(mac, Bytes::copy_from_slice(f)).encode()) {
                    Ok(()) => st.c.tunnel_out_frames += 1,
                    Err(_) => st.c.dropped.send_failed += 1,
                }
            }
            return;
        }
        let sent = match self.uplink.send_batch(frames) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "uplink send failed");
                0
            }
        };
        st.c.to_uplink_frames += sent as u64;
        st.c.to_uplink_bytes += frames.iter().take(sent).map(|f| wire_len(f)).sum::<u64>();
        st.c.dropped.send_failed += (frames.len() - sent) as u64;
    }

    pub(super) fn release(&self, st: &mut State, frames: &[Bytes]) -> usize {
        st.c.released_frames += frames.len() as u64;
        st.c.released_bytes += frames.iter().map(|f| wire_len(f)).sum::<u64>();
        for chunk in frames.chunks(BATCH) {
            let refs: Vec<&[u8]> = chunk.iter().map(|f| &f[..]).collect();
            self.egress(st, &refs);
        }
        frames.len()
    }

    pub(super) fn vm_rx_loop(&self) {
        self.enter_realtime();
        let mut batch = RecvBatch::new(BATCH, SLOT_LEN);
        while !self.stop.load(Ordering::Relaxed) {
            let Some(vif) = self.vif_socket() else {
                // No vif, no frames from the VM: wait for the monitor to bind it.
                std::thread::sleep(self.cfg.monitor_interval.min(RECV_TIMEOUT));
                continue;
            };
            let got = vif.recv_batch(&mut batch);
            drop(vif);
            match got {
                Ok(0) => continue,
                Ok(_) => {}
                Err(e) if interface_gone(&e) => {
                    // Removed, or down: drops the socket only when the interface is gone.
                    tracing::debug!(error = %e, vif = %self.cfg.vif, "vif receive failed");
                    self.check_vif();
                    std::thread::sleep(self.cfg.monitor_interval.min(RECV_TIMEOUT));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, vif = %self.cfg.vif, "vif receive failed");
                    std::thread::sleep(RECV_TIMEOUT);
                    continue;
                }
            }
            let mut st = self.lock();
            let mut out: Vec<&[u8]> = Vec::with_capacity(BATCH);
            let mut early = Vec::new();
            for (data, len) in batch.frames() {
                match self.handle_vm_frame(st, data, len, &mut out, &mut early) {
                    Some(g) => st = g,
                    None => return,
                }
            }
            let hook = st.early_hook.clone();
            drop(st);
            // Pass-through frames leave outside the lock, so the inbound thread never waits on
            // this send. Order still holds: they were classified under the lock after anything
            // a commit or mode switch released, and those were sent before the lock was freed.
            if !out.is_empty() {
                let sent = self.uplink.send_batch(&out).unwrap_or(0);
                let bytes: u64 = out.iter().take(sent).map(|f| wire_len(f)).sum();
                let mut st = self.lock();
                st.c.to_uplink_frames += sent as u64;
                st.c.to_uplink_bytes += bytes;
                st.c.dropped.send_failed += (out.len() - sent) as u64;
            }
            if let Some(hook) = hook {
                for epoch in early {
                    hook(epoch);
                }
            }
        }
    }

    /// One frame from the VM. Pass-through frames for the local uplink are appended to `out`
    /// (sent as one batch by the caller); everything else is handled here, after flushing `out`
    /// so that order is kept. Returns `None` when the relay is stopping.
    fn handle_vm_frame<'g, 'b>(
        &'g self,
        mut st: MutexGuard<'g, State>,
        data: &'b [u8],
        len: usize,
        out: &mut Vec<&'b [u8]>,
        early: &mut Vec<u64>,
    ) -> Option<MutexGuard<'g, State>> {
        let eth = match frame::check_packet(data, len, self.cfg.mtu) {
            Ok(eth) => eth,
            Err(e) => {
                count_refused(&mut st.c.dropped, e);
                return Some(st);
            }
        };
        let data = &data[..len];
        let Some(src) = frame::src_mac(eth) else {
            st.c.dropped.runt += 1;
            return Some(st);
        };
        match st.vm_mac {
            Some(mac) if mac != src => {
                st.c.dropped.spoofed_source += 1;
                return Some(st);
            }
            Some(_) => {}
            None if src.is_group() => {
                st.c.dropped.spoofed_source += 1;
                return Some(st);
            }
            None => {
                tracing::info!(mac = %src, "learned the VM's MAC from its traffic");
                st.vm_mac = Some(src);
            }
        }
        st.learn(eth);
        st.c.from_vm_frames += 1;
        st.c.from_vm_bytes += eth.len() as u64;
        if st.isolated {
            st.c.dropped.isolated += 1;
            return Some(st);
        }
        match st.mode {
            Mode::Standby => st.c.dropped.standby += 1,
            Mode::Passthrough if !st.c.redirect.redirecting => out.push(data),
            Mode::Passthrough => {
                self.egress(&mut st, out);
                out.clear();
                self.egress(&mut st, &[data]);
            }
            Mode::Buffered => {
                self.egress(&mut st, out);
                out.clear();
                let frame = Bytes::copy_from_slice(data);
                let mut stalled = false;
                loop {
                    match st.buffer.push(frame.clone()) {
                        PushOutcome::Held => break,
                        PushOutcome::HeldRequestEarlyCheckpoint => {
                            st.c.early_checkpoint_requests += 1;
                            // The hook is called once the batch is done and the lock released.
                            early.push(st.buffer.current_epoch());
                            break;
                        }
                        PushOutcome::Full => {
                            // Ask for the early checkpoint now: the commit it brings is what
                            // will make room.
                            if !early.is_empty() {
                                let hook = st.early_hook.clone();
                                drop(st);
                                for epoch in early.drain(..) {
                                    if let Some(h) = &hook {
                                        h(epoch);
                                    }
                                }
                                st = self.lock();
                                continue;
                            }
                            if !stalled {
                                stalled = true;
                                st.c.overflow_stalls += 1;
                            }
                            // The frame waits here (and the VM's next frames in the socket)
                            // until a commit makes room; nothing is dropped by the shim.
                            st = self
                                .space
                                .wait_timeout(st, RECV_TIMEOUT)
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .0;
                            if self.stop.load(Ordering::Relaxed) {
                                return None;
                            }
                            if st.mode != Mode::Buffered {
                                if st.mode == Mode::Passthrough {
                                    self.egress(&mut st, &[data]);
                                } else {
                                    st.c.dropped.standby += 1;
                                }
                                return Some(st);
                            }
                        }
                    }
                }
                st.c.held_frames_total += 1;
                st.c.held_bytes_total += eth.len() as u64;
            }
        }
        Some(st)
    }

    pub(super) fn uplink_rx_loop(&self) {
        self.enter_realtime();
        let mut batch = RecvBatch::new(BATCH, SLOT_LEN);
        while !self.stop.load(Ordering::Relaxed) {
            match self.uplink.recv_batch(&mut batch) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, uplink = %self.cfg.uplink, "uplink receive failed");
                    std::thread::sleep(RECV_TIMEOUT);
                    continue;
                }
            }
            let mut st = self.lock();
            let mut to_vm: Vec<&[u8]> = Vec::with_capacity(BATCH);
            for (data, len) in batch.frames() {
                if self.handle_uplink_frame(&mut st, data, len) {
                    to_vm.push(data);
                }
            }
            drop(st);
            if to_vm.is_empty() {
                continue;
            }
            let Some(vif) = self.vif_socket() else {
                self.lock().c.dropped.vif_absent += to_vm.len() as u64;
                continue;
            };
            let (sent, absent) = match vif.send_batch(&to_vm) {
                Ok(n) => (n, false),
                Err(e) if interface_gone(&e) => {
                    drop(vif);
                    self.check_vif();
                    (0, self.vif_socket().is_none())
                }
                Err(_) => (0, false),
            };
            let mut st = self.lock();
            st.c.to_vm_frames += sent as u64;
            st.c.to_vm_bytes += to_vm.iter().take(sent).map(|f| wire_len(f)).sum::<u64>();
            let failed = (to_vm.len() - sent) as u64;
            if absent {
                st.c.dropped.vif_absent += failed;
            } else {
                st.c.dropped.send_failed += failed;
            }
        }
    }

    /// One frame from the uplink; true when it is to be delivered to the VM.
    fn handle_uplink_frame(&self, st: &mut State, data: &[u8], len: usize) -> bool {
        let eth = match frame::check_packet(data, len, self.cfg.mtu) {
            Ok(eth) => eth,
            Err(e) => {
                count_refused(&mut st.c.dropped, e);
                return false;
            }
        };
        let data = &data[..len];
        let (Some(dst), Some(src)) = (frame::dst_mac(eth), frame::src_mac(eth)) else {
            return false;
        };
        st.c.from_uplink_frames += 1;
        if let Some(mac) = st.vm_mac {
            if src == mac {
                // The VM's own MAC seen on the uplink: the other host's copy (we are standby)
                // or our own frame reflected. Learn from it, never deliver it.
                st.learn(eth);
                return false;
            }
            if dst != mac && !dst.is_group() {
                return false;
            }
            if st.isolated {
                st.c.dropped.isolated += 1;
                return false;
            }
            if st.c.redirect.serving_peer {
                if let Some(t) = st.tunnel.clone() {
                    match t.send(TunnelMsg::ToVm(mac, Bytes::copy_from_slice(data)).encode()) {
                        Ok(()) => st.c.tunnel_out_frames += 1,
                        Err(_) => st.c.dropped.send_failed += 1,
                    }
                }
            }
        }
        st.mode != Mode::Standby && !st.isolated
    }
}
