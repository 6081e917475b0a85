//! The secondary side: applies the primary's messages in sequence order and acknowledges them.
//!
//! One blocking applier thread per session applies writes, zero ranges and flushes in the
//! order received and sends cumulative [`PeerMsg::Ack`]s after each batch (after `fdatasync`
//! for FUA and flush). A new session waits for the previous applier to finish, so nothing from
//! an old session can land after the new session's resync.
//!
//! The secondary remembers whether its copy is consistent in a small state file
//! (`consistent` / `inconsistent`; absent = fresh), announced in [`PeerMsg::Hello`].
//!
//! Level-3 epoch mode ([`Secondary::set_epoch_mode`]): writes are held per epoch in memory and
//! applied only when their epoch commits ([`PeerMsg::EpochCommit`] from the primary, or
//! [`Secondary::commit_epoch`] called locally); [`Secondary::discard_uncommitted`] drops them on
//! failover (Remus/COLO disk semantics). Resync traffic is never held: epoch mode is meant to
//! be switched on once the copy is consistent (the primary reports `in_sync`); a resync while
//! in epoch mode brings the copy to the primary's current content.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tracing::{info, warn};

use super::transport::{PeerAcceptor, PeerSession};
use super::wire::{
    block_checksum, Frame, PeerDiskState, PeerMsg, FLAG_FUA, FLAG_PUNCH, FLAG_RESYNC, VERSION,
};
use crate::store::{Store, StoreError};

/// Held epoch data the secondary accepts at most; beyond it the session fails (the primary
/// goes degraded) rather than the secondary running out of memory.
pub const MAX_HELD_BYTES: u64 = 1 << 30;

/// A held (not yet applied) mutation of epoch mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldOp {
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        data: Bytes,
    },
    /// Zero a range.
    Zero {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Whether deallocation is allowed.
        punch: bool,
    },
}

/// Writes held per epoch until commit (pure logic, no I/O).
#[derive(Debug, Default)]
pub struct EpochBuffer {
    held: BTreeMap<u64, Vec<HeldOp>>,
    bytes: u64,
    committed: u64,
}

impl EpochBuffer {
    /// Holds `op` for `epoch`.
    pub fn hold(&mut self, epoch: u64, op: HeldOp) {
        if let HeldOp::Write { data, .. } = &op {
            self.bytes += data.len() as u64;
        }
        self.held.entry(epoch).or_default().push(op);
    }

    /// Takes every op of epochs `<= epoch`, in epoch then arrival order.
    pub fn commit(&mut self, epoch: u64) -> Vec<HeldOp> {
        let rest = self.held.split_off(&(epoch.saturating_add(1)));
        let done = std::mem::replace(&mut self.held, rest);
        self.committed = self.committed.max(epoch);
        let ops: Vec<HeldOp> = done.into_values().flatten().collect();
        for op in &ops {
            if let HeldOp::Write { data, .. } = op {
                self.bytes -= data.len() as u64;
            }
        }
        ops
    }

    /// Drops every uncommitted op; returns how many.
    pub fn discard(&mut self) -> usize {
        let n = self.held.values().map(Vec::len).sum();
        self.held.clear();
        self.bytes = 0;
        n
    }

    /// Held data bytes.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Epochs with held ops.
    #[must_use]
    pub fn epochs(&self) -> Vec<u64> {
        self.held.keys().copied().collect()
    }

    /// Highest committed epoch.
    #[must_use]
    pub fn committed(&self) -> u64 {
        self.committed
    }
}

/// Status of the secondary for the agent.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecondaryStatus {
    /// Whether a primary session is up.
    pub connected: bool,
    /// State of the local copy.
    pub disk: PeerDiskState,
    /// Client-write bytes applied.
    pub bytes_applied: u64,
    /// Resync bytes applied (data, not zero ranges).
    pub resync_bytes: u64,
    /// Highest sequence applied in the current session.
    pub last_seq: u64,
    /// Epoch mode on.
    pub epoch_mode: bool,
    /// Epochs with held writes.
    pub held_epochs: Vec<u64>,
    /// Held bytes.
    pub held_bytes: u64,
    /// Highest committed epoch.
    pub committed_epoch: u64,
    /// Last store failure.
    pub failure: Option<String>,
}

/// The secondary shim for one disk.
pub struct Secondary {
    store: Arc<dyn Store>,
    state_path: PathBuf,
    disk: Mutex<PeerDiskState>,
    epochs: Mutex<EpochBuffer>,
    epoch_mode: AtomicBool,
    connected: AtomicBool,
    bytes_applied: AtomicU64,
    resync_bytes: AtomicU64,
    last_seq: AtomicU64,
    failure: Mutex<Option<String>>,
    applier: tokio::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Secondary {
    /// A secondary for `store`, remembering its consistency in `state_path`.
    pub fn new(store: Arc<dyn Store>, state_path: PathBuf) -> Arc<Self> {
        let disk = std::fs::read_to_string(&state_path)
            .map_or(PeerDiskState::Fresh, |text| parse_state(&text, &boot_id()));
        Arc::new(Self {
            store,
            state_path,
            disk: Mutex::new(disk),
            epochs: Mutex::new(EpochBuffer::default()),
            epoch_mode: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            bytes_applied: AtomicU64::new(0),
            resync_bytes: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            failure: Mutex::new(None),
            applier: tokio::sync::Mutex::new(None),
        })
    }

    /// Clean stop: syncs the store and records the state as clean (valid across reboots).
    pub fn shutdown_blocking(&self) -> Result<(), StoreError> {
        self.store.sync()?;
        self.write_state(true);
        Ok(())
    }

    /// Turns level-3 epoch mode on or off (off: held writes stay held until committed).
    pub fn set_epoch_mode(&self, on: bool) {
        self.epoch_mode.store(on, Ordering::SeqCst);
    }

    /// Applies every held write of epochs `<= epoch` now.
    pub fn commit_epoch(&self, epoch: u64) -> Result<usize, StoreError> {
        let ops = lock(&self.epochs).commit(epoch);
        let n = ops.len();
        for op in ops {
            self.apply_op(&op)?;
        }
        Ok(n)
    }

    /// Failover: drops every uncommitted epoch's writes; returns how many were dropped.
    pub fn discard_uncommitted(&self) -> usize {
        let n = lock(&self.epochs).discard();
        info!(dropped = n, "uncommitted epoch writes discarded");
        n
    }

    /// A snapshot for the agent.
    pub fn status(&self) -> SecondaryStatus {
        let ep = lock(&self.epochs);
        SecondaryStatus {
            connected: self.connected.load(Ordering::Relaxed),
            disk: *lock(&self.disk),
            bytes_applied: self.bytes_applied.load(Ordering::Relaxed),
            resync_bytes: self.resync_bytes.load(Ordering::Relaxed),
            last_seq: self.last_seq.load(Ordering::Relaxed),
            epoch_mode: self.epoch_mode.load(Ordering::Relaxed),
            held_epochs: ep.epochs(),
            held_bytes: ep.bytes(),
            committed_epoch: ep.committed(),
            failure: lock(&self.failure).clone(),
        }
    }

    fn set_disk(&self, d: PeerDiskState) {
        *lock(&self.disk) = d;
        self.write_state(false);
    }

    /// Promotion: waits until the last session's applier has applied everything it queued
    /// (call after the session's transport was closed).
    pub async fn wait_applier_done(&self) {
        if let Some(h) = self.applier.lock().await.take() {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }

    /// Records the disk state with the current boot id (writes applied since may sit in the
    /// page cache only), or `clean` after a sync on a clean stop.
    fn write_state(&self, clean: bool) {
        let d = *lock(&self.disk);
        let word = match d {
            PeerDiskState::Consistent => "consistent",
            PeerDiskState::Inconsistent => "inconsistent",
            PeerDiskState::Fresh => "fresh",
        };
        let text = if clean {
            format!("{word} clean\n")
        } else {
            format!("{word} boot={}\n", boot_id())
        };
        let r = std::fs::File::create(&self.state_path).and_then(|mut f| {
            std::io::Write::write_all(&mut f, text.as_bytes())?;
            f.sync_all()
        });
        if let Err(e) = r {
            warn!(error = %e, path = %self.state_path.display(), "cannot record disk state");
        }
    }

    fn apply_op(&self, op: &HeldOp) -> Result<(), StoreError> {
        match op {
            HeldOp::Write { offset, data } => {
                self.store.write_at(data, *offset)?;
                self.bytes_applied
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            HeldOp::Zero { offset, len, punch } => self.store.zero(*offset, *len, *punch)?,
        }
        Ok(())
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|e| e <= self.store.size())
    }

    /// Applies one message; returns `(seq, needs_sync)` for sequenced messages.
    fn apply(
        &self,
        msg: PeerMsg,
        tx: &tokio::sync::mpsc::UnboundedSender<Frame>,
    ) -> Result<Option<(u64, bool)>, String> {
        let epoch_mode = self.epoch_mode.load(Ordering::Relaxed);
        match msg {
            PeerMsg::Write {
                seq,
                epoch,
                offset,
                flags,
                data,
            } => {
                if !self.in_range(offset, data.len() as u64) {
                    return Err(format!("write at {offset} outside the disk"));
                }
                let resync = flags & FLAG_RESYNC != 0;
                if epoch_mode && !resync {
                    let mut ep = lock(&self.epochs);
                    if ep.bytes() + data.len() as u64 > MAX_HELD_BYTES {
                        return Err(format!(
                            "epoch buffer full ({} bytes held): commit epochs more often",
                            ep.bytes()
                        ));
                    }
                    ep.hold(epoch, HeldOp::Write { offset, data });
                    return Ok(Some((seq, false)));
                }
                if resync {
                    self.resync_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    self.store
                        .write_at(&data, offset)
                        .map_err(|e| e.to_string())?;
                } else {
                    self.apply_op(&HeldOp::Write { offset, data })
                        .map_err(|e| e.to_string())?;
                }
                Ok(Some((seq, flags & FLAG_FUA != 0)))
            }
            PeerMsg::Zero {
                seq,
                epoch,
                offset,
                len,
                flags,
            } => {
                if !self.in_range(offset, len) {
                    return Err(format!("zero range at {offset} outside the disk"));
                }
                let op = HeldOp::Zero {
                    offset,
                    len,
                    punch: flags & FLAG_PUNCH != 0,
                };
                if epoch_mode && flags & FLAG_RESYNC == 0 {
                    lock(&self.epochs).hold(epoch, op);
                    return Ok(Some((seq, false)));
                }
                self.apply_op(&op).map_err(|e| e.to_string())?;
                Ok(Some((seq, flags & FLAG_FUA != 0)))
            }
            PeerMsg::Flush { seq } => Ok(Some((seq, true))),
            PeerMsg::ResyncBegin { seq, full } => {
                info!(full, "resync begins: copy inconsistent until it ends");
                self.set_disk(PeerDiskState::Inconsistent);
                Ok(Some((seq, false)))
            }
            PeerMsg::ResyncEnd { seq } => {
                self.store.sync().map_err(|e| e.to_string())?;
                self.set_disk(PeerDiskState::Consistent);
                info!("resync complete: copy consistent");
                Ok(Some((seq, false)))
            }
            PeerMsg::EpochCommit { seq, epoch } => {
                self.commit_epoch(epoch).map_err(|e| e.to_string())?;
                Ok(Some((seq, false)))
            }
            PeerMsg::ReadReq { id, offset, len } => {
                let mut buf = vec![0u8; len as usize];
                let ok = self.in_range(offset, u64::from(len))
                    && self.store.read_at(&mut buf, offset).is_ok();
                let data = if ok { Bytes::from(buf) } else { Bytes::new() };
                let _ = tx.send(PeerMsg::ReadResp { id, ok, data }.frame());
                Ok(None)
            }
            PeerMsg::VerifyReq {
                id,
                offset,
                len,
                block,
            } => {
                let mut buf = vec![0u8; len as usize];
                let sums = if self.in_range(offset, u64::from(len))
                    && self.store.read_at(&mut buf, offset).is_ok()
                {
                    buf.chunks(block as usize).map(block_checksum).collect()
                } else {
                    Vec::new()
                };
                let _ = tx.send(PeerMsg::VerifyResp { id, sums }.frame());
                Ok(None)
            }
            other => Err(format!("unexpected message {other:?}")),
        }
    }

    fn applier_loop(
        self: Arc<Self>,
        rx: &mut tokio::sync::mpsc::Receiver<PeerMsg>,
        tx: &tokio::sync::mpsc::UnboundedSender<Frame>,
    ) {
        while let Some(first) = rx.blocking_recv() {
            let mut last = None;
            let mut sync = false;
            let mut next = Some(first);
            // A batch ends when the queue is empty, on a sync, or after a bounded amount of
            // work, so acknowledgements keep flowing under a continuous stream.
            let mut budget = 4u64 << 20;
            while let Some(msg) = next.take() {
                budget = budget.saturating_sub(msg_cost(&msg));
                let seq_hint = msg_seq(&msg);
                match self.apply(msg, tx) {
                    Ok(Some((seq, s))) => {
                        last = Some(seq);
                        sync |= s;
                    }
                    Ok(None) => {}
                    Err(reason) => {
                        warn!(reason, "secondary cannot apply");
                        *lock(&self.failure) = Some(reason.clone());
                        let _ = tx.send(
                            PeerMsg::Fail {
                                seq: seq_hint,
                                reason,
                            }
                            .frame(),
                        );
                        return;
                    }
                }
                if sync || budget == 0 {
                    break;
                }
                next = rx.try_recv().ok();
            }
            if sync {
                if let Err(e) = self.store.sync() {
                    let reason = e.to_string();
                    *lock(&self.failure) = Some(reason.clone());
                    let _ = tx.send(
                        PeerMsg::Fail {
                            seq: last.unwrap_or(0),
                            reason,
                        }
                        .frame(),
                    );
                    return;
                }
            }
            if let Some(seq) = last {
                self.last_seq.store(seq, Ordering::Relaxed);
                let _ = tx.send(PeerMsg::Ack { seq }.frame());
            }
        }
    }

    /// Serves one session to its end.
    pub async fn run_session(self: Arc<Self>, mut session: PeerSession) {
        // Previous applier must be done before anything of this session is applied.
        let prev = self.applier.lock().await.take();
        if let Some(h) = prev {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        let disk = *lock(&self.disk);
        let hello = PeerMsg::Hello {
            version: VERSION,
            size: self.store.size(),
            state: disk,
        };
        if session.tx.send(hello.frame()).is_err() {
            return;
        }
        // From now on writes may be acknowledged before they are durable: tie the state to
        // this boot, so a host crash (page cache lost) is detected at the next start.
        self.write_state(false);
        self.connected.store(true, Ordering::Relaxed);
        info!(?disk, "primary session up");
        // Bounded: a primary faster than this disk is slowed down through the session instead
        // of growing a queue here.
        let (atx, mut arx) = tokio::sync::mpsc::channel(64);
        let me = self.clone();
        let tx = session.tx.clone();
        let handle = std::thread::spawn(move || me.applier_loop(&mut arx, &tx));
        *self.applier.lock().await = Some(handle);
        while let Some(frame) = session.rx.recv().await {
            match PeerMsg::decode(frame) {
                Ok(m) => {
                    if atx.send(m).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "undecodable message from primary; dropping session");
                    break;
                }
            }
        }
        self.connected.store(false, Ordering::Relaxed);
        info!("primary session ended");
    }

    /// Accepts sessions forever; a new session replaces the current one.
    pub async fn serve<A: PeerAcceptor>(self: Arc<Self>, mut acceptor: A) {
        let mut current: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let Ok(session) = acceptor.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            if let Some(h) = current.take() {
                h.abort();
                let _ = h.await;
            }
            current = Some(tokio::spawn(self.clone().run_session(session)));
        }
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`); empty if unknown.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Interprets the state file. Acknowledged writes reach the page cache, not the disk, so a
/// copy recorded during another boot without a clean stop may have lost writes the primary
/// believes it has: it counts as fresh (full sync).
fn parse_state(text: &str, boot: &str) -> PeerDiskState {
    let mut words = text.split_whitespace();
    let state = words.next().unwrap_or("");
    let stamp = words.next().unwrap_or("");
    let same_boot = stamp == "clean" || (!boot.is_empty() && stamp == format!("boot={boot}"));
    match (state, same_boot) {
        (_, false) => PeerDiskState::Fresh,
        ("consistent", true) => PeerDiskState::Consistent,
        ("inconsistent", true) => PeerDiskState::Inconsistent,
        _ => PeerDiskState::Fresh,
    }
}

/// Work estimate of a message for ack batching (bytes, at least one page).
fn msg_cost(m: &PeerMsg) -> u64 {
    match m {
        PeerMsg::Write { data, .. } => (data.len() as u64).max(4096),
        _ => 4096,
    }
}

fn msg_seq(m: &PeerMsg) -> u64 {
    match m {
        PeerMsg::Write { seq, .. }
        | PeerMsg::Zero { seq, .. }
        | PeerMsg::Flush { seq }
        | PeerMsg::ResyncBegin { seq, .. }
        | PeerMsg::ResyncEnd { seq }
        | PeerMsg::EpochCommit { seq, .. } => *seq,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(offset: u64, b: u8) -> HeldOp {
        HeldOp::Write {
            offset,
            data: Bytes::from(vec![b; 4]),
        }
    }

    #[test]
    fn state_from_another_boot_without_clean_stop_means_full_sync() {
        assert_eq!(
            parse_state("consistent boot=A\n", "A"),
            PeerDiskState::Consistent
        );
        assert_eq!(
            parse_state("consistent boot=A\n", "B"),
            PeerDiskState::Fresh
        );
        assert_eq!(
            parse_state("consistent clean\n", "B"),
            PeerDiskState::Consistent
        );
        assert_eq!(
            parse_state("inconsistent boot=A\n", "A"),
            PeerDiskState::Inconsistent
        );
        assert_eq!(
            parse_state("inconsistent clean\n", "B"),
            PeerDiskState::Inconsistent
        );
        assert_eq!(parse_state("garbage", "A"), PeerDiskState::Fresh);
        assert_eq!(parse_state("fresh boot=A", "A"), PeerDiskState::Fresh);
        assert_eq!(parse_state("consistent\n", ""), PeerDiskState::Fresh);
    }

    #[test]
    fn epoch_commit_releases_only_committed_epochs_in_order() {
        let mut e = EpochBuffer::default();
        e.hold(1, w(0, 1));
        e.hold(2, w(0, 2));
        e.hold(1, w(8, 3));
        e.hold(3, w(0, 4));
        assert_eq!(e.commit(2), vec![w(0, 1), w(8, 3), w(0, 2)]);
        assert_eq!(e.epochs(), vec![3]);
        assert_eq!(e.bytes(), 4);
        assert_eq!(e.discard(), 1);
        assert!(e.epochs().is_empty());
        assert_eq!(e.committed(), 2);
    }
}
