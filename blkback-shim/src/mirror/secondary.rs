//! The secondary side: applies the primary's messages in sequence order and acknowledges them.
//!
//! One blocking applier thread per session takes the session's frames itself, applies writes,
//! zero ranges and flushes in the order received and sends cumulative [`PeerMsg::Ack`]s after
//! each batch (after `fdatasync` for FUA and flush; a write is never synced on its own). A new
//! session waits for the previous applier to finish, so nothing from
//! an old session can land after the new session's resync.
//!
//! The secondary remembers whether its copy is consistent in a small state file
//! (`consistent` / `inconsistent`; absent = fresh), announced in [`PeerMsg::Hello`].
//!
//! Failover ([`super::bitmap`] has the whole scheme): the secondary also knows the path of the
//! bitmap it uses when promoted (by default `DISK.xenft-bitmap` beside `DISK.xenft-state`).
//! A clean stop while consistent writes a bitmap there for its promotion, expecting a report
//! from the lineage of the primary it mirrored. At the start of a session it reads that file
//! as a *report* (meaningful when this host is a returning old primary), sends it after the
//! `Hello` ([`PeerMsg::DirtyReport`]) and deletes it: from then on the file is stale.
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

use super::bitmap::{boot_id, DirtyBitmap, DEFAULT_CHUNK};
use super::transport::{PeerAcceptor, PeerSession, SessionTx};
use super::wire::{
    block_checksum, PeerDiskState, PeerMsg, FLAG_FUA, FLAG_PUNCH, FLAG_RESYNC, VERSION,
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

    /// The ranges `(offset, len)` of every held op.
    #[must_use]
    pub fn held_ranges(&self) -> Vec<(u64, u64)> {
        self.held
            .values()
            .flatten()
            .map(|op| match op {
                HeldOp::Write { offset, data } => (*offset, data.len() as u64),
                HeldOp::Zero { offset, len, .. } => (*offset, *len),
            })
            .collect()
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

pub use xenft_control::blkback::SecondaryStatus;

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
    /// The bitmap this host uses as primary: read as a report, written for a promotion.
    bitmap_path: Option<PathBuf>,
    /// Lineage of the current (or last) primary's bitmap.
    primary_lineage: AtomicU64,
    /// Ranges of epoch-mode writes discarded on failover (dirty in a promotion bitmap).
    discarded: Mutex<Vec<(u64, u64)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Secondary {
    /// A secondary for `store`, remembering its consistency in `state_path`.
    pub fn new(store: Arc<dyn Store>, state_path: PathBuf) -> Arc<Self> {
        let bitmap_path = default_bitmap_path(&state_path);
        Self::with_bitmap(store, state_path, bitmap_path)
    }

    /// Like [`Secondary::new`] with an explicit bitmap path for failover (`None`: no dirty
    /// report, no promotion bitmap; the next promotion then needs a full sync).
    pub fn with_bitmap(
        store: Arc<dyn Store>,
        state_path: PathBuf,
        bitmap_path: Option<PathBuf>,
    ) -> Arc<Self> {
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
            bitmap_path,
            primary_lineage: AtomicU64::new(0),
            discarded: Mutex::new(Vec::new()),
        })
    }

    /// Clean stop: syncs the store and records the state as clean (valid across reboots).
    /// A consistent copy also leaves the bitmap for its promotion (see [`super::bitmap`]).
    pub fn shutdown_blocking(&self) -> Result<(), StoreError> {
        self.store.sync()?;
        self.write_state(true);
        let lineage = self.primary_lineage.load(Ordering::SeqCst);
        let consistent = *lock(&self.disk) == PeerDiskState::Consistent;
        if let (Some(path), true, true) = (&self.bitmap_path, consistent, lineage != 0) {
            let discarded = lock(&self.discarded).clone();
            match DirtyBitmap::create_for_promotion(
                path,
                self.store.size(),
                DEFAULT_CHUNK,
                lineage,
                &discarded,
            ) {
                Ok(()) => info!(path = %path.display(), "bitmap for a promotion written"),
                Err(e) => warn!(error = %e, "cannot write the bitmap for a promotion"),
            }
        }
        Ok(())
    }

    /// Session start: this host's own primary bitmap as a dirty report (lineage 0 and no bits
    /// when there is none to trust), and the file removed (it is stale from now on).
    fn take_report(&self) -> (u64, Bytes) {
        let Some(path) = &self.bitmap_path else {
            return (0, Bytes::new());
        };
        let report = match DirtyBitmap::read_report(path, self.store.size(), DEFAULT_CHUNK) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "own bitmap unreadable: no dirty report");
                None
            }
        };
        match std::fs::remove_file(path) {
            Ok(()) => info!(path = %path.display(), "own bitmap consumed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(error = %e, path = %path.display(), "cannot remove own bitmap"),
        }
        match report {
            Some((_, bits)) if bits.len() > super::wire::MAX_DATA => {
                warn!(
                    bytes = bits.len(),
                    "own bitmap too large to report: full sync"
                );
                (0, Bytes::new())
            }
            Some((lineage, bits)) => {
                let dirty: u32 = bits.iter().map(|b| b.count_ones()).sum();
                info!(
                    lineage,
                    dirty_chunks = dirty,
                    "reporting regions written as primary"
                );
                (lineage, Bytes::from(bits))
            }
            None => (0, Bytes::new()),
        }
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
        let mut ep = lock(&self.epochs);
        // The primary wrote these (and they were acknowledged to it as held): if this copy is
        // promoted, they differ on the old primary and must be copied back to it.
        lock(&self.discarded).extend(ep.held_ranges());
        let n = ep.discard();
        drop(ep);
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
    fn apply(&self, msg: PeerMsg, tx: &SessionTx) -> Result<Option<(u64, bool)>, String> {
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
            PeerMsg::Lineage { id } => {
                self.primary_lineage.store(id, Ordering::SeqCst);
                Ok(None)
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

    fn applier_loop(self: Arc<Self>, inbox: &mut Inbox, tx: &SessionTx) {
        while let Some(first) = inbox.next_blocking() {
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
                next = inbox.try_next();
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
    pub async fn run_session(self: Arc<Self>, session: PeerSession) {
        // Previous applier must be done before anything of this session is applied.
        let prev = self.applier.lock().await.take();
        if let Some(h) = prev {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        let me = self.clone();
        let (lineage, bits) = tokio::task::spawn_blocking(move || me.take_report())
            .await
            .unwrap_or_default();
        if lineage != 0 {
            // This host was the primary: its copy is the peer's plus what it reports.
            self.set_disk(PeerDiskState::Inconsistent);
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
        if session
            .tx
            .send(PeerMsg::DirtyReport { lineage, bits }.frame())
            .is_err()
        {
            return;
        }
        // From now on writes may be acknowledged before they are durable: tie the state to
        // this boot, so a host crash (page cache lost) is detected at the next start.
        self.write_state(false);
        self.connected.store(true, Ordering::Relaxed);
        info!(?disk, "primary session up");
        // The applier thread takes the session's frames itself (no task in between); the
        // session's bounded receiver slows down a primary faster than this disk. It stops when
        // the session ends, or when this task ends or is aborted (a newer session replaces
        // this one): `_stop` closes its stop signal.
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let _stop = stop;
        let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
        let mut inbox = Inbox {
            rx: session.rx,
            stop: stop_rx,
            rt: tokio::runtime::Handle::current(),
        };
        let me = self.clone();
        let tx = session.tx.clone();
        let handle = std::thread::spawn(move || {
            me.applier_loop(&mut inbox, &tx);
            drop(inbox);
            let _ = done.send(());
        });
        *self.applier.lock().await = Some(handle);
        let _ = done_rx.await;
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

/// The applier thread's view of a session: its frames, decoded, until the session ends or the
/// session task stops it.
struct Inbox {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    stop: tokio::sync::watch::Receiver<bool>,
    rt: tokio::runtime::Handle,
}

impl Inbox {
    /// Waits for the next message; `None` when the session ended, was stopped, or sent
    /// something undecodable (logged).
    fn next_blocking(&mut self) -> Option<PeerMsg> {
        let Self { rx, stop, rt } = self;
        let frame = rt.block_on(async {
            tokio::select! {
                f = rx.recv() => f,
                _ = stop.changed() => None,
            }
        })?;
        Self::decoded(frame)
    }

    /// The next message if one is waiting (`None` also when undecodable: logged, and the
    /// next [`Inbox::next_blocking`] ends the session).
    fn try_next(&mut self) -> Option<PeerMsg> {
        let frame = self.rx.try_recv().ok()?;
        let m = Self::decoded(frame);
        if m.is_none() {
            self.rx.close();
            while self.rx.try_recv().is_ok() {}
        }
        m
    }

    fn decoded(frame: Bytes) -> Option<PeerMsg> {
        match PeerMsg::decode(frame) {
            Ok(m) => Some(m),
            Err(e) => {
                warn!(error = %e, "undecodable message from primary; dropping session");
                None
            }
        }
    }
}

/// The bitmap beside a state file named `DISK.xenft-state` (the daemon's defaults):
/// `DISK.xenft-bitmap`; `None` for other names.
fn default_bitmap_path(state_path: &std::path::Path) -> Option<PathBuf> {
    let name = state_path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".xenft-state")?;
    Some(state_path.with_file_name(format!("{stem}.xenft-bitmap")))
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
