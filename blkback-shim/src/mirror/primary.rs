//! The primary side of the mirror: protocol-C writes, degraded mode, online resync, remote mode.
//!
//! Ordering: every mutating operation takes the *order lock*, applies itself to the local store
//! and gets its sequence number while holding it, so the sequence order equals the order in
//! which the local store saw the operations; the secondary applies in sequence order, so
//! overlapping writes end identical on both sides. Resync reads a chunk and sequences its copy
//! under the same lock, so a client write racing with the copy is always sequenced after it
//! and wins on both sides.
//!
//! Acknowledgement (DRBD protocol C): a client write completes when the local store has it AND
//! the secondary acknowledged it. If the session ends first, the write's chunks are marked in
//! the persistent [`DirtyBitmap`] (made durable) and only then is the write completed:
//! degraded mode. While no session exists, writes mark the bitmap before completing.
//!
//! Remote mode: if the local store fails, the failure is recorded (with its cause) and from then
//! on writes go only to the secondary and reads are served by it ([`PeerMsg::ReadReq`]), so the
//! client sees no error as long as the peer is there.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};
use tracing::{info, warn};

use super::bitmap::{BitmapError, DirtyBitmap, AL_EXTENT, AL_MAX_EXTENTS};
use super::transport::{PeerConnector, PeerSession, SessionTx};
use super::wire::{PeerDiskState, PeerMsg, FLAG_FUA, FLAG_PUNCH, VERSION};
use crate::nbd::proto::{NBD_EIO, NBD_ENOSPC};
use crate::store::{Store, StoreError};

mod group_sync;
mod resync;
mod verify;

pub use verify::{VerifyError, VerifyReport};

/// Largest resync copy (contiguous dirty chunks are merged up to this).
const RESYNC_RUN: u64 = 1 << 20;

/// Tunables of the mirror.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// A session whose oldest unacknowledged message is older than this is dropped.
    pub ack_timeout: Duration,
    /// Pause between connection attempts.
    pub reconnect_interval: Duration,
    /// Resync rate limit in bytes per second (0: unlimited). Settable at run time.
    pub resync_rate: u64,
    /// Resync bytes in flight (unacknowledged) at most.
    pub resync_window: u64,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(5),
            reconnect_interval: Duration::from_millis(200),
            resync_rate: 0,
            resync_window: 16 << 20,
        }
    }
}

pub use xenft_control::blkback::{PeerLink, PrimaryStatus, ResyncProgress};

/// Completion of a mirrored operation: `Ok` or an NBD errno.
pub type Ticket = oneshot::Receiver<Result<(), u32>>;

enum PendingKind {
    /// A client write: on session loss its range goes into the bitmap.
    Client { offset: u64, len: u64 },
    /// A resync copy: on acknowledgement its chunks are clean.
    Resync { offset: u64, len: u64 },
    /// Flush, resync markers, epoch commits.
    Control,
}

struct Pending {
    kind: PendingKind,
    sent: Instant,
    done: Option<oneshot::Sender<Result<(), u32>>>,
}

struct State {
    tx: Option<SessionTx>,
    gen: u64,
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
    reads: HashMap<u64, oneshot::Sender<Option<Bytes>>>,
    verifies: HashMap<u64, oneshot::Sender<Vec<u64>>>,
    next_read: u64,
    bitmap: DirtyBitmap,
    peer_disk: Option<PeerDiskState>,
    resync: Option<(Instant, ResyncProgress)>,
    last_resync: Option<ResyncProgress>,
    resync_inflight: u64,
    local_failure: Option<String>,
    peer_failure: Option<String>,
    sessions: u64,
    /// Activity log: unacknowledged client writes per active extent.
    al_inflight: HashMap<u64, u32>,
    /// Activity log: active extents and when they were last used.
    al_active: HashMap<u64, u64>,
    al_tick: u64,
}

/// The primary's mirror engine for one disk.
pub struct Primary {
    store: Arc<dyn Store>,
    order: Mutex<()>,
    state: Mutex<State>,
    cfg: MirrorConfig,
    rate: AtomicU64,
    epoch: AtomicU64,
    writes_mirrored: AtomicU64,
    writes_degraded: AtomicU64,
    acked: Notify,
    failure_events: tokio::sync::broadcast::Sender<String>,
    syncs: group_sync::GroupSync,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Primary {
    /// A primary for `store` using `bitmap` (its geometry must match the store).
    pub fn new(store: Arc<dyn Store>, bitmap: DirtyBitmap, cfg: MirrorConfig) -> Arc<Self> {
        let rate = AtomicU64::new(cfg.resync_rate);
        Arc::new(Self {
            store,
            order: Mutex::new(()),
            state: Mutex::new(State {
                tx: None,
                gen: 0,
                next_seq: 1,
                pending: BTreeMap::new(),
                reads: HashMap::new(),
                verifies: HashMap::new(),
                next_read: 1,
                bitmap,
                peer_disk: None,
                resync: None,
                last_resync: None,
                resync_inflight: 0,
                local_failure: None,
                peer_failure: None,
                sessions: 0,
                al_inflight: HashMap::new(),
                al_active: HashMap::new(),
                al_tick: 0,
            }),
            cfg,
            rate,
            epoch: AtomicU64::new(0),
            writes_mirrored: AtomicU64::new(0),
            writes_degraded: AtomicU64::new(0),
            acked: Notify::new(),
            failure_events: tokio::sync::broadcast::channel(16).0,
            syncs: group_sync::GroupSync::default(),
        })
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.store.size()
    }

    /// True while reads are served from the local store; false in remote mode (the local
    /// store failed and reads go to the peer).
    pub fn serves_locally(&self) -> bool {
        lock(&self.state).local_failure.is_none()
    }

    /// Sets the resync rate limit (bytes/s, 0 = unlimited); applies to a running resync.
    pub fn set_resync_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Sets the level-3 epoch stamped on subsequent writes.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// Level-3 checkpoint boundary, called while the domain is paused for checkpoint `epoch`
    /// (the checkpoint engine's `CommitSink::checkpoint`): writes completed before belong to
    /// `epoch`, writes after to `epoch + 1`.
    pub fn checkpoint_boundary(&self, epoch: u64) {
        self.set_epoch(epoch.saturating_add(1));
    }

    /// Tells the secondary that `epoch` is committed (its held writes may be applied); resolves
    /// when the secondary applied them. Without a session the epoch is implicitly committed
    /// (degraded writes are in the bitmap).
    pub fn commit_epoch(&self, epoch: u64) -> Ticket {
        let _o = lock(&self.order);
        let mut st = lock(&self.state);
        self.submit(&mut st, PendingKind::Control, |seq| PeerMsg::EpochCommit {
            seq,
            epoch,
        })
    }

    /// Failure causes, as they happen (local store failures).
    pub fn subscribe_failures(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.failure_events.subscribe()
    }

    /// A snapshot for the agent.
    pub fn status(&self) -> PrimaryStatus {
        let st = lock(&self.state);
        let resync = st.resync.as_ref().map(|(start, p)| {
            let mut p = p.clone();
            p.bytes_left = st.bitmap.dirty_bytes();
            p.elapsed_secs = start.elapsed().as_secs_f64();
            if p.elapsed_secs > 0.0 {
                p.rate_bytes_per_sec = p.bytes_copied as f64 / p.elapsed_secs;
            }
            if p.rate_bytes_per_sec > 0.0 {
                p.eta_secs = Some(p.bytes_left as f64 / p.rate_bytes_per_sec);
            }
            p
        });
        PrimaryStatus {
            peer: match (&st.tx, &resync) {
                (None, _) => PeerLink::Degraded,
                (Some(_), Some(_)) => PeerLink::Resyncing,
                (Some(_), None) => PeerLink::InSync,
            },
            peer_disk: st.peer_disk,
            dirty_bytes: st.bitmap.dirty_bytes(),
            peer_synced: st.bitmap.peer_synced(),
            resync,
            last_resync: st.last_resync.clone(),
            local_failure: st.local_failure.clone(),
            peer_failure: st.peer_failure.clone(),
            resync_rate_limit: self.rate.load(Ordering::Relaxed),
            writes_mirrored: self.writes_mirrored.load(Ordering::Relaxed),
            writes_degraded: self.writes_degraded.load(Ordering::Relaxed),
            sessions: st.sessions,
            epoch: self.epoch.load(Ordering::Relaxed),
            al_active_extents: st.al_active.len(),
            al_recovered_extents: st.bitmap.recovered_extents(),
        }
    }

    /// Sequences `msg` to the peer, or (no session) records `kind`'s range as dirty. Called
    /// with the order lock held.
    fn submit(
        &self,
        st: &mut State,
        kind: PendingKind,
        msg: impl FnOnce(u64) -> PeerMsg,
    ) -> Ticket {
        let (done, ticket) = oneshot::channel();
        if st.tx.is_some() {
            if let PendingKind::Client { offset, len } = kind {
                if let Err(e) = Self::al_begin(st, offset, len) {
                    warn!(error = %e, "cannot persist activity log");
                    let _ = done.send(Err(NBD_EIO));
                    return ticket;
                }
            }
        }
        if let Some(tx) = &st.tx {
            let seq = st.next_seq;
            st.next_seq += 1;
            if tx.send(msg(seq).frame()).is_ok() {
                if let PendingKind::Resync { len, .. } = kind {
                    st.resync_inflight += len;
                }
                st.pending.insert(
                    seq,
                    Pending {
                        kind,
                        sent: Instant::now(),
                        done: Some(done),
                    },
                );
                return ticket;
            }
            // The session is going away; its loss handler will run. Fall through to degraded.
        }
        let r = match kind {
            PendingKind::Client { offset, len } => {
                self.writes_degraded.fetch_add(1, Ordering::Relaxed);
                st.bitmap.mark(offset, len).map(|_| ()).map_err(|e| {
                    warn!(error = %e, "cannot persist dirty bitmap");
                    NBD_EIO
                })
            }
            _ => Ok(()),
        };
        let r = if r.is_ok() && st.local_failure.is_some() {
            // Neither copy took the write.
            Err(NBD_EIO)
        } else {
            r
        };
        let _ = done.send(r);
        ticket
    }

    fn extents(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        if len == 0 {
            #[allow(clippy::reversed_empty_ranges)] // deliberately empty
            return 1..=0;
        }
        offset / AL_EXTENT..=(offset.saturating_add(len) - 1) / AL_EXTENT
    }

    /// Activity log: makes the extents of a mirrored write active (durably) before it is sent.
    fn al_begin(st: &mut State, offset: u64, len: u64) -> Result<(), BitmapError> {
        st.al_tick += 1;
        let tick = st.al_tick;
        let mut activate = Vec::new();
        for e in Self::extents(offset, len) {
            *st.al_inflight.entry(e).or_insert(0) += 1;
            if st.al_active.insert(e, tick).is_none() {
                activate.push(e);
            }
        }
        if activate.is_empty() {
            return Ok(());
        }
        let mut retire = Vec::new();
        while st.al_active.len() > AL_MAX_EXTENTS {
            let victim = st
                .al_active
                .iter()
                .filter(|(e, _)| !st.al_inflight.contains_key(e))
                .min_by_key(|(_, t)| **t)
                .map(|(e, _)| *e);
            let Some(v) = victim else { break };
            st.al_active.remove(&v);
            retire.push(v);
        }
        st.bitmap.al_update(&activate, &retire)
    }

    /// Activity log: a mirrored write was acknowledged.
    fn al_end(st: &mut State, offset: u64, len: u64) {
        for e in Self::extents(offset, len) {
            if let Some(n) = st.al_inflight.get_mut(&e) {
                *n -= 1;
                if *n == 0 {
                    st.al_inflight.remove(&e);
                }
            }
        }
    }

    fn local_failed(&self, st: &mut State, e: &StoreError) {
        if st.local_failure.is_none() {
            let cause = e.to_string();
            warn!(cause = %cause, "local store failed: switching to remote mode");
            st.local_failure = Some(cause.clone());
            let _ = self.failure_events.send(cause);
        }
    }

    /// Blocking: applies a client write locally and sequences it to the peer.
    pub fn write_blocking(&self, offset: u64, data: Bytes, fua: bool) -> Ticket {
        let len = data.len() as u64;
        let flags = if fua { FLAG_FUA } else { 0 };
        let ticket = {
            let _o = lock(&self.order);
            let mut st = lock(&self.state);
            let local_ok = st.local_failure.is_none();
            if local_ok && st.tx.is_some() {
                // Mirrored: sequence and send first, then write locally, so the peer's copy
                // and the local write proceed at the same time. Both happen under the order
                // lock, so the sequence order is still the local store's order.
                let epoch = self.epoch.load(Ordering::Relaxed);
                let body = data.clone();
                let mut ticket = self.submit(&mut st, PendingKind::Client { offset, len }, |seq| {
                    PeerMsg::Write {
                        seq,
                        epoch,
                        offset,
                        flags,
                        data: body,
                    }
                });
                drop(st);
                if let Err(e) = self.store.write_at(&data, offset) {
                    self.local_failed(&mut lock(&self.state), &e);
                    if matches!(ticket.try_recv(), Ok(Ok(()))) {
                        // The session was already gone (the write went into the bitmap only)
                        // and the local store failed: neither copy has it.
                        let (tx, rx) = oneshot::channel();
                        let _ = tx.send(Err(NBD_EIO));
                        ticket = rx;
                    }
                }
                ticket
            } else {
                drop(st);
                self.write_unmirrored(offset, data, flags)
            }
        };
        if fua {
            self.sync_local();
        }
        ticket
    }

    /// The write path without a session (or in remote mode): local write, then sequence (which
    /// marks the bitmap when there is no session). Called with the order lock held.
    fn write_unmirrored(&self, offset: u64, data: Bytes, flags: u8) -> Ticket {
        let len = data.len() as u64;
        {
            let local_ok = lock(&self.state).local_failure.is_none();
            let mut local_err = None;
            if local_ok {
                if let Err(e) = self.store.write_at(&data, offset) {
                    local_err = Some(e);
                }
            }
            let mut st = lock(&self.state);
            if let Some(e) = &local_err {
                if e.nbd_errno() == NBD_ENOSPC && st.tx.is_none() {
                    let (tx, rx) = oneshot::channel();
                    let _ = tx.send(Err(NBD_ENOSPC));
                    return rx;
                }
                self.local_failed(&mut st, e);
            }
            let epoch = self.epoch.load(Ordering::Relaxed);
            self.submit(&mut st, PendingKind::Client { offset, len }, |seq| {
                PeerMsg::Write {
                    seq,
                    epoch,
                    offset,
                    flags,
                    data,
                }
            })
        }
    }

    /// Blocking: zeroes (or discards) a range locally and on the peer.
    pub fn zero_blocking(&self, offset: u64, len: u64, punch: bool, fua: bool) -> Ticket {
        let ticket = {
            let _o = lock(&self.order);
            if lock(&self.state).local_failure.is_none() {
                if let Err(e) = self.store.zero(offset, len, punch) {
                    self.local_failed(&mut lock(&self.state), &e);
                }
            }
            let mut st = lock(&self.state);
            let flags = if fua { FLAG_FUA } else { 0 } | if punch { FLAG_PUNCH } else { 0 };
            let epoch = self.epoch.load(Ordering::Relaxed);
            self.submit(&mut st, PendingKind::Client { offset, len }, |seq| {
                PeerMsg::Zero {
                    seq,
                    epoch,
                    offset,
                    len,
                    flags,
                }
            })
        };
        if fua {
            self.sync_local();
        }
        ticket
    }

    /// Makes every write completed so far durable locally; concurrent callers share syncs.
    fn sync_local(&self) {
        if lock(&self.state).local_failure.is_none() {
            self.syncs.sync(|| {
                if let Err(e) = self.store.sync() {
                    self.local_failed(&mut lock(&self.state), &e);
                }
            });
        }
    }

    /// Blocking: makes every completed write durable locally and on the peer.
    pub fn flush_blocking(&self) -> Ticket {
        self.sync_local();
        let _o = lock(&self.order);
        let mut st = lock(&self.state);
        if st.local_failure.is_some() && st.tx.is_none() {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(NBD_EIO));
            return rx;
        }
        self.submit(&mut st, PendingKind::Control, |seq| PeerMsg::Flush { seq })
    }

    /// Reads from the local store, or from the peer in remote mode.
    pub async fn read(self: &Arc<Self>, offset: u64, len: u32) -> Result<Bytes, u32> {
        let local_ok = lock(&self.state).local_failure.is_none();
        if local_ok {
            let me = self.clone();
            let r = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len as usize];
                me.store.read_at(&mut buf, offset).map(|()| buf)
            })
            .await
            .map_err(|_| NBD_EIO)?;
            match r {
                Ok(b) => return Ok(Bytes::from(b)),
                Err(e) => self.local_failed(&mut lock(&self.state), &e),
            }
        }
        // Remote mode: the read is ordered after every write sequenced before it.
        let rx = {
            let _o = lock(&self.order);
            let mut st = lock(&self.state);
            let Some(tx) = st.tx.clone() else {
                return Err(NBD_EIO);
            };
            if st.bitmap.any_dirty(offset, u64::from(len)) {
                // The secondary's copy of this range is stale and the local one failed.
                return Err(NBD_EIO);
            }
            let id = st.next_read;
            st.next_read += 1;
            let (done, rx) = oneshot::channel();
            st.reads.insert(id, done);
            if tx
                .send(PeerMsg::ReadReq { id, offset, len }.frame())
                .is_err()
            {
                st.reads.remove(&id);
                return Err(NBD_EIO);
            }
            rx
        };
        match rx.await {
            Ok(Some(b)) if b.len() == len as usize => Ok(b),
            _ => Err(NBD_EIO),
        }
    }

    /// Blocking: clean stop. Holds the order lock (no write can start after it), syncs the
    /// local store, records still-unacknowledged writes as dirty and retires every
    /// activity-log extent, so the next start resyncs only what really may differ.
    pub fn shutdown_blocking(&self) -> Result<(), String> {
        let _o = lock(&self.order);
        let synced = if lock(&self.state).local_failure.is_none() {
            self.store.sync().map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        let mut st = lock(&self.state);
        let pending: Vec<(u64, u64)> = st
            .pending
            .values()
            .filter_map(|p| match p.kind {
                PendingKind::Client { offset, len } => Some((offset, len)),
                _ => None,
            })
            .collect();
        for (offset, len) in pending {
            st.bitmap.mark_volatile(offset, len);
        }
        let active: Vec<u64> = st.al_active.drain().map(|(e, _)| e).collect();
        st.al_inflight.clear();
        st.bitmap.persist().map_err(|e| e.to_string())?;
        st.bitmap
            .al_update(&[], &active)
            .map_err(|e| e.to_string())?;
        if synced.is_ok() {
            st.bitmap.mark_clean().map_err(|e| e.to_string())?;
        }
        info!(retired = active.len(), "primary stopped cleanly");
        synced
    }

    fn on_ack(&self, gen: u64, seq: u64) {
        let mut st = lock(&self.state);
        if st.gen != gen {
            return;
        }
        let rest = st.pending.split_off(&(seq.saturating_add(1)));
        let done = std::mem::replace(&mut st.pending, rest);
        for (_, p) in done {
            match p.kind {
                PendingKind::Client { offset, len } => {
                    self.writes_mirrored.fetch_add(1, Ordering::Relaxed);
                    Self::al_end(&mut st, offset, len);
                }
                PendingKind::Resync { offset, len } => {
                    st.bitmap.clear(offset, len);
                    st.resync_inflight = st.resync_inflight.saturating_sub(len);
                }
                PendingKind::Control => {}
            }
            if let Some(d) = p.done {
                let _ = d.send(Ok(()));
            }
        }
        drop(st);
        self.acked.notify_waiters();
    }

    /// Ends session `gen`: unacknowledged client writes go into the bitmap (made durable),
    /// then complete; pending remote reads fail.
    fn session_lost(&self, gen: u64, why: &str) {
        let mut st = lock(&self.state);
        if st.gen != gen || st.tx.is_none() {
            return;
        }
        warn!(why, "peer session lost: degraded");
        if st
            .peer_failure
            .as_deref()
            .is_none_or(|f| !f.starts_with("secondary store"))
        {
            st.peer_failure = Some(format!("session ended: {why}"));
        }
        st.tx = None;
        st.peer_disk = None;
        st.resync_inflight = 0;
        if let Some((_, p)) = st.resync.take() {
            st.last_resync = Some(p);
        }
        let pending = std::mem::take(&mut st.pending);
        // Unacknowledged writes go into the dirty bitmap below; their extents may retire.
        st.al_inflight.clear();
        let mut waiters = Vec::new();
        for (_, p) in pending {
            if let PendingKind::Client { offset, len } = p.kind {
                st.bitmap.mark_volatile(offset, len);
                self.writes_degraded.fetch_add(1, Ordering::Relaxed);
            }
            waiters.push(p.done);
        }
        let persisted = st.bitmap.persist();
        if let Err(e) = &persisted {
            warn!(error = %e, "cannot persist dirty bitmap");
        }
        let local_ok = st.local_failure.is_none();
        st.reads.clear();
        st.verifies.clear();
        drop(st);
        for w in waiters.into_iter().flatten() {
            let r = if persisted.is_ok() && local_ok {
                Ok(())
            } else {
                Err(NBD_EIO)
            };
            let _ = w.send(r);
        }
        self.acked.notify_waiters();
    }

    /// Runs the replication link forever: connect, handshake, resync, stream, and on loss go
    /// degraded and retry.
    pub async fn run<C: PeerConnector>(self: Arc<Self>, mut connector: C) {
        loop {
            let Ok(session) = connector.connect().await else {
                tokio::time::sleep(self.cfg.reconnect_interval).await;
                continue;
            };
            self.clone().run_session(session).await;
            tokio::time::sleep(self.cfg.reconnect_interval).await;
        }
    }

    async fn run_session(self: Arc<Self>, mut session: PeerSession) {
        let hello = tokio::time::timeout(Duration::from_secs(5), session.rx.recv()).await;
        let Ok(Some(frame)) = hello else {
            warn!("peer sent no hello");
            return;
        };
        let (peer_state, peer_size) = match PeerMsg::decode(frame) {
            Ok(PeerMsg::Hello {
                version: VERSION,
                size,
                state,
            }) => (state, size),
            other => {
                warn!(?other, "bad peer hello");
                return;
            }
        };
        if peer_size != self.size() {
            warn!(
                peer_size,
                size = self.size(),
                "peer disk size differs: not mirroring"
            );
            return;
        }
        // Then the secondary's dirty report (a returning old primary's unacknowledged regions).
        let report = tokio::time::timeout(Duration::from_secs(5), session.rx.recv()).await;
        let (lineage, bits) = match report.map(|f| f.map(PeerMsg::decode)) {
            Ok(Some(Ok(PeerMsg::DirtyReport { lineage, bits }))) => (lineage, bits),
            other => {
                warn!(?other, "peer sent no dirty report");
                return;
            }
        };
        let (gen, full) = {
            let _o = lock(&self.order);
            let mut st = lock(&self.state);
            if lineage != 0 {
                match st.bitmap.accept_report(lineage, &bits) {
                    Ok(true) => info!(
                        lineage,
                        dirty_bytes = st.bitmap.dirty_bytes(),
                        "peer's dirty report merged: resyncing only the union"
                    ),
                    Ok(false) => info!(lineage, "peer's dirty report is not the expected one"),
                    Err(e) => warn!(error = %e, "cannot merge the peer's dirty report"),
                }
            }
            // The secondary records our lineage before anything else of this session.
            let lineage_msg = PeerMsg::Lineage {
                id: st.bitmap.lineage(),
            };
            if session.tx.send(lineage_msg.frame()).is_err() {
                return;
            }
            st.gen += 1;
            st.sessions += 1;
            st.tx = Some(session.tx.clone());
            st.peer_disk = Some(peer_state);
            // A promoted secondary's bitmap without the old primary's report cannot tell
            // what the peer has that we lack: full sync.
            let full = peer_state == PeerDiskState::Fresh
                || !st.bitmap.peer_synced()
                || st.bitmap.expected_report().is_some();
            // Reported as resyncing from the first moment: nothing is in sync before the
            // resync's end marker is acknowledged.
            st.resync = Some((
                Instant::now(),
                ResyncProgress {
                    full,
                    ..ResyncProgress::default()
                },
            ));
            (st.gen, full)
        };
        info!(gen, ?peer_state, full, "peer session up");
        let resync = tokio::spawn(self.clone().resync(gen, full));
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let why = loop {
            tokio::select! {
                m = session.rx.recv() => {
                    let Some(frame) = m else { break "session closed" };
                    match PeerMsg::decode(frame) {
                        Ok(PeerMsg::Ack { seq }) => self.on_ack(gen, seq),
                        Ok(PeerMsg::ReadResp { id, ok, data }) => {
                            if let Some(w) = lock(&self.state).reads.remove(&id) {
                                let _ = w.send(ok.then_some(data));
                            }
                        }
                        Ok(PeerMsg::VerifyResp { id, sums }) => {
                            if let Some(w) = lock(&self.state).verifies.remove(&id) {
                                let _ = w.send(sums);
                            }
                        }
                        Ok(PeerMsg::Fail { seq, reason }) => {
                            warn!(seq, reason, "secondary failed to apply");
                            lock(&self.state).peer_failure = Some(format!("secondary store: {reason}"));
                            break "secondary store failed";
                        }
                        Ok(other) => {
                            warn!(?other, "unexpected message from secondary");
                            break "protocol error";
                        }
                        Err(e) => {
                            warn!(error = %e, "undecodable message from secondary");
                            break "protocol error";
                        }
                    }
                }
                _ = tick.tick() => {
                    let st = lock(&self.state);
                    let oldest = st.pending.values().next().map(|p| p.sent.elapsed());
                    if oldest.is_some_and(|d| d > self.cfg.ack_timeout) {
                        break "acknowledgement timeout";
                    }
                }
            }
        };
        resync.abort();
        self.session_lost(gen, why);
    }
}
