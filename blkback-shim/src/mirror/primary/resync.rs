//! Online resync of the primary: copies dirty chunks (or, for the initial full sync, every
//! data extent, sending holes as zero ranges and all-zero chunks without data) while client
//! writes continue. Each copy is read and sequenced under the order lock, so a client write
//! racing with it is sequenced after it and wins on both copies; a chunk's bit is cleared only
//! when the secondary acknowledged its copy. Flow control bounds the unacknowledged resync
//! bytes; the rate limit is settable while it runs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::info;

use super::{lock, PendingKind, Primary, ResyncProgress, RESYNC_RUN};
use crate::mirror::wire::{PeerDiskState, PeerMsg, FLAG_PUNCH, FLAG_RESYNC};

impl Primary {
    /// `None` if session `gen` ended, else whether fewer than `below` resync bytes are in
    /// flight.
    fn resync_room(&self, gen: u64, below: u64) -> Option<bool> {
        let st = lock(&self.state);
        if st.gen != gen || st.tx.is_none() {
            return None;
        }
        Some(st.resync_inflight < below)
    }

    /// Copies dirty regions (or everything, skipping holes and zeroes, for a full sync) while
    /// client writes continue.
    pub(super) async fn resync(self: Arc<Self>, gen: u64, full: bool) {
        let start = Instant::now();
        // Mark the resync start on the secondary; for a full sync, walk data extents: holes are
        // sent as zero ranges, data extents are marked dirty and copied below.
        let me = self.clone();
        let setup = tokio::task::spawn_blocking(move || me.resync_setup(gen, full, start)).await;
        if !matches!(setup, Ok(true)) {
            return;
        }
        // Token bucket for the rate limit: bytes that may be sent now (negative: owed).
        let mut allowance = 0f64;
        let mut last_refill = Instant::now();
        let end = loop {
            let mut cursor = 0u64;
            loop {
                // Flow control: bounded unacknowledged resync bytes.
                if !self.wait_acks(gen, self.cfg.resync_window).await {
                    return;
                }
                // Rate limit (settable while running; 0 = unlimited).
                loop {
                    let rate = self.rate.load(Ordering::Relaxed) as f64;
                    let now = Instant::now();
                    if rate <= 0.0 {
                        allowance = 0.0;
                        last_refill = now;
                        break;
                    }
                    let burst = rate.max(RESYNC_RUN as f64);
                    allowance = (allowance + rate * (now - last_refill).as_secs_f64()).min(burst);
                    last_refill = now;
                    if allowance >= 0.0 {
                        break;
                    }
                    if self.resync_room(gen, u64::MAX).is_none() {
                        return;
                    }
                    let wait = (-allowance / rate).min(0.2);
                    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                }
                let me = self.clone();
                let step = tokio::task::spawn_blocking(move || me.resync_step(gen, cursor)).await;
                match step {
                    Ok(Some((next, sent))) => {
                        cursor = next;
                        allowance -= sent as f64;
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            // Wait for every copy to be acknowledged, then check nothing is left.
            if !self.wait_acks(gen, 1).await {
                return;
            }
            let me = self.clone();
            let end = tokio::task::spawn_blocking(move || {
                let _o = lock(&me.order);
                let mut st = lock(&me.state);
                if st.gen != gen || st.tx.is_none() || st.local_failure.is_some() {
                    // Session over, or nothing left to copy from (remote mode).
                    return None;
                }
                if st.bitmap.dirty_chunks() > 0 {
                    // Chunks dirtied behind the cursor: go round again.
                    return Some(None);
                }
                Some(Some(me.submit(&mut st, PendingKind::Control, |seq| {
                    PeerMsg::ResyncEnd { seq }
                })))
            })
            .await;
            match end {
                Ok(Some(Some(t))) => break t,
                Ok(Some(None)) => continue,
                _ => return,
            }
        };
        if !matches!(end.await, Ok(Ok(()))) {
            return;
        }
        let mut st = lock(&self.state);
        if st.gen != gen {
            return;
        }
        if full {
            st.bitmap.set_peer_synced(true).ok();
        } else {
            st.bitmap.persist().ok();
        }
        if let Some((start, mut p)) = st.resync.take() {
            p.bytes_left = 0;
            p.elapsed_secs = start.elapsed().as_secs_f64();
            if p.elapsed_secs > 0.0 {
                p.rate_bytes_per_sec = p.bytes_copied as f64 / p.elapsed_secs;
            }
            p.eta_secs = Some(0.0);
            info!(
                copied = p.bytes_copied,
                zeroed = p.bytes_zeroed,
                secs = p.elapsed_secs,
                "resync complete"
            );
            st.last_resync = Some(p);
        }
        st.peer_disk = Some(PeerDiskState::Consistent);
    }

    /// Waits until fewer than `below` resync bytes are unacknowledged; false if the session
    /// ended.
    async fn wait_acks(&self, gen: u64, below: u64) -> bool {
        loop {
            let notified = self.acked.notified();
            match self.resync_room(gen, below) {
                None => return false,
                Some(true) => return true,
                Some(false) => {
                    let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
                }
            }
        }
    }

    fn resync_setup(&self, gen: u64, full: bool, start: Instant) -> bool {
        let _o = lock(&self.order);
        let mut st = lock(&self.state);
        if st.gen != gen || st.tx.is_none() {
            return false;
        }
        drop(
            self.submit(&mut st, PendingKind::Control, |seq| PeerMsg::ResyncBegin {
                seq,
                full,
            }),
        );
        let mut zeroed = 0u64;
        if full {
            let size = self.store.size();
            let mut pos = 0u64;
            while pos < size {
                let next = match self.store.next_data(pos) {
                    Ok(n) => n,
                    Err(e) => {
                        self.local_failed(&mut st, &e);
                        return false;
                    }
                };
                let (hole_end, data) = match next {
                    Some((s, e)) => (s.max(pos), Some((s.max(pos), e))),
                    None => (size, None),
                };
                if hole_end > pos {
                    let (offset, len) = (pos, hole_end - pos);
                    zeroed += len;
                    drop(
                        self.submit(&mut st, PendingKind::Control, |seq| PeerMsg::Zero {
                            seq,
                            epoch: 0,
                            offset,
                            len,
                            flags: FLAG_PUNCH | FLAG_RESYNC,
                        }),
                    );
                }
                match data {
                    Some((s, e)) if e > s => {
                        st.bitmap.mark_volatile(s, e - s);
                        pos = e;
                    }
                    _ => pos = hole_end.max(pos + 1),
                }
            }
        }
        let total = st.bitmap.dirty_bytes();
        st.resync = Some((
            start,
            ResyncProgress {
                full,
                total_bytes: total,
                bytes_left: total,
                bytes_zeroed: zeroed,
                ..ResyncProgress::default()
            },
        ));
        true
    }

    /// Copies the next run of dirty chunks at or after chunk `cursor`. Returns the next cursor
    /// and the bytes put on the wire, or `None` when no dirty chunk is left (or the session
    /// ended).
    fn resync_step(&self, gen: u64, cursor: u64) -> Option<(u64, u64)> {
        let _o = lock(&self.order);
        let (offset, len) = {
            let st = lock(&self.state);
            if st.gen != gen || st.tx.is_none() {
                return None;
            }
            let first = st.bitmap.next_dirty(cursor)?;
            let chunk = st.bitmap.chunk();
            let max_run = (RESYNC_RUN / chunk).max(1);
            let mut last = first;
            while last + 1 < st.bitmap.nchunks()
                && last + 1 - first < max_run
                && st.bitmap.is_dirty(last + 1)
            {
                last += 1;
            }
            let offset = first * chunk;
            let end = ((last + 1) * chunk).min(self.store.size());
            (offset, end - offset)
        };
        let local_ok = lock(&self.state).local_failure.is_none();
        if !local_ok {
            return None;
        }
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        if let Err(e) = self.store.read_at(&mut buf, offset) {
            self.local_failed(&mut lock(&self.state), &e);
            return None;
        }
        let mut st = lock(&self.state);
        let zero = buf.iter().all(|&b| b == 0);
        let sent = if zero { 0 } else { len };
        if let Some((_, p)) = st.resync.as_mut() {
            if zero {
                p.bytes_zeroed += len;
            } else {
                p.bytes_copied += len;
            }
        }
        let kind = PendingKind::Resync { offset, len };
        let ticket = if zero {
            self.submit(&mut st, kind, |seq| PeerMsg::Zero {
                seq,
                epoch: 0,
                offset,
                len,
                flags: FLAG_RESYNC,
            })
        } else {
            let data = Bytes::from(buf);
            self.submit(&mut st, kind, |seq| PeerMsg::Write {
                seq,
                epoch: 0,
                offset,
                flags: FLAG_RESYNC,
                data,
            })
        };
        drop(ticket);
        let chunk = st.bitmap.chunk();
        Some(((offset + len).div_ceil(chunk), sent))
    }
}
