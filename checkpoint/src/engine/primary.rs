//! Primary side of level-3 protection: pre-copy, then the checkpoint epoch loop.
//!
//! Three threads:
//! - **checkpointer** (owns the [`Domain`]): pre-copy rounds, then per epoch pause → read and
//!   clear the dirty log → copy dirty pages + vCPU state → resume, and hands the staged epoch on;
//! - **sender**: encodes (zero / XOR+LZ4 / raw) and sends epochs, at most `window` unacknowledged;
//! - **acker**: receives acks (commits epochs, in order, through the [`CommitSink`]) and nacks
//!   (re-sends every unacknowledged epoch from the one the secondary expects).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::commit::CommitSink;
use super::transport::{Endpoint, FrameReceiver, FrameSender, TransportError};
use super::EngineError;
use crate::domain::Domain;
use crate::wire::{memory_digest, EncodedEpoch, EpochEncoder, Frame, StagedEpoch};
use crate::workload::PAGE_SIZE;

/// How long epochs last.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EpochPolicy {
    /// Every epoch lasts this long (Remus style).
    Fixed(Duration),
    /// Short epochs while checkpoints are cheap, longer when pauses grow.
    ///
    /// The next epoch lasts `last_pause / max_pause_share`, clamped to `min..=max`: when little
    /// is dirty the pause is tiny and epochs run at `min` (output is released sooner); when a
    /// lot is dirty the pause takes at most `max_pause_share` of the time. A pause longer than
    /// `max_pause` also shortens the next epoch in proportion, so fewer pages pile up.
    Adaptive {
        /// Shortest epoch.
        min: Duration,
        /// Longest epoch.
        max: Duration,
        /// Share of wall time the pauses may take (e.g. 0.1).
        max_pause_share: f64,
        /// Pause above which epochs shrink.
        max_pause: Duration,
    },
}

impl EpochPolicy {
    /// Length of the next epoch, given the current one and the pause just measured.
    pub fn next_interval(&self, current: Duration, pause: Duration) -> Duration {
        match *self {
            EpochPolicy::Fixed(d) => d,
            EpochPolicy::Adaptive {
                min,
                max,
                max_pause_share,
                max_pause,
            } => {
                let share = max_pause_share.clamp(0.001, 1.0);
                let mut want = pause.div_f64(share);
                if pause > max_pause && !pause.is_zero() {
                    want = want.min(current.mul_f64(max_pause.as_secs_f64() / pause.as_secs_f64()));
                }
                want.clamp(min, max.max(min))
            }
        }
    }
}

/// Settings of the primary.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// Epoch length policy (default fixed 25 ms).
    pub epoch: EpochPolicy,
    /// Pre-copy rounds after the first full pass (at most).
    pub max_precopy_rounds: u32,
    /// Pre-copy stops once fewer pages than this are dirty.
    pub precopy_target_pages: u64,
    /// Pages per pre-copy chunk (each chunk is an atomic epoch on the secondary).
    pub precopy_chunk_pages: usize,
    /// Most epochs sent and not yet acknowledged; the checkpointer waits beyond it.
    pub window: usize,
    /// Send an XXH3 digest of the whole memory with every checkpoint (tests; slow).
    pub verify_memory_digest: bool,
    /// Stop after this many checkpoints (tests, benchmark).
    pub max_checkpoints: Option<u64>,
    /// Re-send every unacknowledged epoch when no ack arrived for this long (default 5 s,
    /// doubling while nothing progresses). Only lossy channels need it: the A-link and the
    /// stream transports never lose frames, and refused epochs are re-sent on the nack.
    pub resend_after: Duration,
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        Self {
            epoch: EpochPolicy::Fixed(Duration::from_millis(25)),
            max_precopy_rounds: 5,
            precopy_target_pages: 256,
            precopy_chunk_pages: 4096,
            window: 4,
            verify_memory_digest: false,
            max_checkpoints: None,
            resend_after: Duration::from_secs(5),
        }
    }
}

/// Where protection stands.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "phase", content = "reason", rename_all = "snake_case")]
pub enum Phase {
    /// Copying memory live before the first checkpoint.
    Precopy,
    /// Checkpointing.
    Protected,
    /// Stopped by request or after `max_checkpoints`.
    Stopped,
    /// Stopped by an error (the message).
    Failed(String),
}

/// Percentiles of a set of durations, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Millis {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Millis {
    fn of(samples: &[Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        // Nearest-rank percentile with the quantile in per mille.
        let at = |permille: usize| v[((v.len() - 1) * permille + 500) / 1000];
        Self {
            p50: at(500),
            p99: at(990),
            max: v[v.len() - 1],
        }
    }
}

/// A snapshot of the primary's progress (what the agent shows; serialises to JSON).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProtectionStatus {
    /// Current phase.
    pub phase: Phase,
    /// Last checkpoint taken (0 = none yet).
    pub epoch: u64,
    /// Last checkpoint the secondary acknowledged (0 = none yet).
    pub committed_epoch: u64,
    /// Bytes sent and not yet acknowledged.
    pub lag_bytes: u64,
    /// Time since the last commit (None before the first).
    pub last_commit_age: Option<Duration>,
    /// Checkpoints taken.
    pub checkpoints: u64,
    /// Pause per checkpoint (recent checkpoints).
    pub pause: Millis,
    /// Checkpoint taken → acknowledged (recent checkpoints).
    pub commit_latency: Millis,
    /// Dirty page bytes of checkpoints (pages × 4096).
    pub raw_bytes: u64,
    /// Wire bytes of checkpoints.
    pub wire_bytes: u64,
    /// Pre-copy bytes on the wire.
    pub precopy_wire_bytes: u64,
    /// Epochs re-sent after a nack.
    pub resent_epochs: u64,
    /// Time spent in the epoch loop.
    pub protected_for: Duration,
}

struct Stats {
    phase: Phase,
    epoch: u64,
    committed: u64,
    last_commit: Option<Instant>,
    checkpoints: u64,
    pauses: VecDeque<Duration>,
    commit_latency: VecDeque<Duration>,
    raw: u64,
    wire: u64,
    precopy_wire: u64,
    resent: u64,
    protected_since: Option<Instant>,
    protected_until: Option<Instant>,
}

/// Percentiles cover the most recent this-many checkpoints (about two minutes at 200/s).
const MAX_SAMPLES: usize = 25_000;

fn record(samples: &mut VecDeque<Duration>, d: Duration) {
    if samples.len() >= MAX_SAMPLES {
        samples.pop_front();
    }
    samples.push_back(d);
}

struct InFlight {
    epoch: u64,
    checkpoint: bool,
    frames: Vec<Bytes>,
    wire: u64,
    taken_at: Instant,
}

struct Shared {
    stop: AtomicBool,
    sender_done: AtomicBool,
    stats: Mutex<Stats>,
    unacked: Mutex<VecDeque<InFlight>>,
    /// Wakes the sender: window space freed, or a re-send requested.
    window_cv: Condvar,
    /// Re-send every unacknowledged epoch from this number (set by the acker).
    resend_from: Mutex<Option<u64>>,
    /// An early checkpoint was requested.
    early: Mutex<bool>,
    /// Wakes the checkpointer (stop or early checkpoint).
    wake: Condvar,
    sink: Arc<dyn CommitSink>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn fail(&self, e: &EngineError) {
        warn!(error = %e, "checkpointing stopped");
        let mut s = lock(&self.stats);
        if !matches!(s.phase, Phase::Failed(_)) {
            s.phase = Phase::Failed(e.to_string());
        }
        s.protected_until.get_or_insert_with(Instant::now);
        drop(s);
        self.request_stop();
    }

    fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.window_cv.notify_all();
        let _g = lock(&self.early);
        self.wake.notify_all();
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Stopped, or every epoch produced has been sent and acknowledged.
    fn finished(&self) -> bool {
        self.stopped()
            || (self.sender_done.load(Ordering::Acquire) && lock(&self.unacked).is_empty())
    }
}

/// A running protection (primary side). Dropping it without [`Protection::stop`] stops the
/// threads too, and the domain is dropped with them.
pub struct Protection<D: Domain + 'static> {
    shared: Arc<Shared>,
    checkpointer: Option<JoinHandle<Result<D, (D, EngineError)>>>,
    sender: Option<JoinHandle<()>>,
    acker: Option<JoinHandle<()>>,
}

/// Starts protecting `domain` over `link` (ordered, reliable channel to the secondary).
pub fn start_protection<D: Domain + 'static>(
    domain: D,
    link: Endpoint,
    sink: Arc<dyn CommitSink>,
    config: PrimaryConfig,
) -> Result<Protection<D>, EngineError> {
    start_protection_keep_domain(domain, link, sink, config).map_err(|(_, e)| e)
}

/// Like [`start_protection`], but a protection that cannot start hands the domain back
/// (untouched, still running) with the error, so the caller keeps the VM. `None` only if the
/// last thread could not be spawned (the domain went with it).
///
/// # Errors
/// The reason, with the domain when it survived.
pub fn start_protection_keep_domain<D: Domain + 'static>(
    domain: D,
    link: Endpoint,
    sink: Arc<dyn CommitSink>,
    config: PrimaryConfig,
) -> Result<Protection<D>, (Option<D>, EngineError)> {
    if config.window == 0 || config.precopy_chunk_pages == 0 {
        return Err((
            Some(domain),
            EngineError::Config("window and precopy_chunk_pages must be > 0"),
        ));
    }
    let encoder = match EpochEncoder::new(domain.memory_pages()) {
        Ok(e) => e,
        Err(e) => return Err((Some(domain), e.into())),
    };
    let (tx, rx) = link;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        sender_done: AtomicBool::new(false),
        stats: Mutex::new(Stats {
            phase: Phase::Precopy,
            epoch: 0,
            committed: 0,
            last_commit: None,
            checkpoints: 0,
            pauses: VecDeque::new(),
            commit_latency: VecDeque::new(),
            raw: 0,
            wire: 0,
            precopy_wire: 0,
            resent: 0,
            protected_since: None,
            protected_until: None,
        }),
        unacked: Mutex::new(VecDeque::new()),
        window_cv: Condvar::new(),
        resend_from: Mutex::new(None),
        early: Mutex::new(false),
        wake: Condvar::new(),
        sink,
    });
    let (stage_tx, stage_rx) = sync_channel::<StagedEpoch>(1);
    let spawn_err = |e: std::io::Error| EngineError::Thread(e.to_string());
    let s = Arc::clone(&shared);
    let window = config.window;
    let resend_after = config.resend_after;
    let sender = std::thread::Builder::new()
        .name("ckpt-send".into())
        .spawn(move || sender_loop(&s, encoder, &stage_rx, tx, window));
    let sender = match sender {
        Ok(h) => h,
        Err(e) => return Err((Some(domain), spawn_err(e))),
    };
    let s = Arc::clone(&shared);
    let acker = std::thread::Builder::new()
        .name("ckpt-ack".into())
        .spawn(move || acker_loop(&s, rx, resend_after));
    let acker = match acker {
        Ok(h) => h,
        Err(e) => {
            shared.request_stop();
            return Err((Some(domain), spawn_err(e)));
        }
    };
    let s = Arc::clone(&shared);
    let checkpointer = std::thread::Builder::new()
        .name("ckpt-epochs".into())
        .spawn(move || {
            let mut domain = domain;
            let r = checkpoint_loop(&s, &mut domain, &stage_tx, &config);
            if let Err(e) = &r {
                s.fail(e);
                // Never leave the VM paused because protection failed.
                let _ = domain.resume();
            }
            if let Err(e) = domain.disable_dirty_log() {
                warn!(error = %e, "could not switch dirty logging off");
            }
            match r {
                Ok(()) => Ok(domain),
                Err(e) => Err((domain, e)),
            }
        })
        .map_err(|e| (None, spawn_err(e)))?;
    Ok(Protection {
        shared,
        checkpointer: Some(checkpointer),
        sender: Some(sender),
        acker: Some(acker),
    })
}

impl<D: Domain + 'static> Protection<D> {
    /// Current progress.
    pub fn status(&self) -> ProtectionStatus {
        let lag_bytes = lock(&self.shared.unacked).iter().map(|f| f.wire).sum();
        let mut s = lock(&self.shared.stats);
        let protected_for = match (s.protected_since, s.protected_until) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            (Some(a), None) => a.elapsed(),
            _ => Duration::ZERO,
        };
        ProtectionStatus {
            phase: s.phase.clone(),
            epoch: s.epoch,
            committed_epoch: s.committed,
            lag_bytes,
            last_commit_age: s.last_commit.map(|t| t.elapsed()),
            checkpoints: s.checkpoints,
            pause: Millis::of(s.pauses.make_contiguous()),
            commit_latency: Millis::of(s.commit_latency.make_contiguous()),
            raw_bytes: s.raw,
            wire_bytes: s.wire,
            precopy_wire_bytes: s.precopy_wire,
            resent_epochs: s.resent,
            protected_for,
        }
    }

    /// Ends the current epoch now (e.g. the netback buffer crossed its high-water mark); the
    /// next epoch then runs for the normal length.
    pub fn checkpoint_now(&self) {
        *lock(&self.shared.early) = true;
        self.shared.wake.notify_all();
    }

    /// Whether the engine stopped (by request, `max_checkpoints` or an error).
    pub fn is_finished(&self) -> bool {
        self.shared.finished()
    }

    /// Waits until checkpoint `epoch` is committed, the engine stops, or `timeout` passes.
    pub fn wait_committed(&self, epoch: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if lock(&self.shared.stats).committed >= epoch {
                return true;
            }
            if self.shared.finished() {
                return lock(&self.shared.stats).committed >= epoch;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// Stops checkpointing and returns the (running) domain. Returns once a send in progress
    /// completes: if the peer may be unresponsive, shut the channel down first.
    pub fn stop(mut self) -> Result<D, EngineError> {
        self.shutdown().map_err(|(_, e)| e)
    }

    /// Like [`Protection::stop`], but a protection that failed (the peer went away) still
    /// hands back its domain, which the engine left running: the caller keeps the VM.
    /// `None` only if the checkpointer thread panicked.
    ///
    /// # Errors
    /// The error that ended the protection, with the domain when it survived.
    pub fn stop_keep_domain(mut self) -> Result<D, (Option<D>, EngineError)> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<D, (Option<D>, EngineError)> {
        self.shared.request_stop();
        let res = match self.checkpointer.take().map(JoinHandle::join) {
            Some(Ok(Ok(d))) => Ok(d),
            Some(Ok(Err((d, e)))) => Err((Some(d), e)),
            _ => Err((None, EngineError::Thread("checkpointer panicked".into()))),
        };
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
        if let Some(h) = self.acker.take() {
            let _ = h.join();
        }
        let mut s = lock(&self.shared.stats);
        if matches!(s.phase, Phase::Precopy | Phase::Protected) {
            s.phase = Phase::Stopped;
        }
        s.protected_until.get_or_insert_with(Instant::now);
        res
    }
}

impl<D: Domain + 'static> Drop for Protection<D> {
    fn drop(&mut self) {
        if self.checkpointer.is_some() {
            let _ = self.shutdown();
        }
    }
}

fn stage(domain: &mut dyn Domain, epoch: u64, pfns: Vec<u64>) -> Result<StagedEpoch, EngineError> {
    let mut data = vec![0u8; pfns.len() * PAGE_SIZE];
    domain.read_pages(&pfns, &mut data)?;
    Ok(StagedEpoch {
        epoch,
        vcpu: None,
        pfns,
        data,
        memory_digest: None,
    })
}

fn hand_over(
    shared: &Shared,
    stage_tx: &SyncSender<StagedEpoch>,
    staged: StagedEpoch,
) -> Result<(), EngineError> {
    if stage_tx.send(staged).is_err() && !shared.stopped() {
        return Err(EngineError::Thread("sender thread ended".into()));
    }
    Ok(())
}

fn checkpoint_loop(
    shared: &Shared,
    domain: &mut dyn Domain,
    stage_tx: &SyncSender<StagedEpoch>,
    cfg: &PrimaryConfig,
) -> Result<(), EngineError> {
    let pages = domain.memory_pages();
    let mut epoch = 0u64;
    // Pre-copy: tracking starts first, so every page written during the copy shows up later.
    domain.enable_dirty_log()?;
    let mut todo: Vec<u64> = (0..pages).collect();
    let mut round = 0;
    loop {
        for chunk in todo.chunks(cfg.precopy_chunk_pages) {
            if shared.stopped() {
                return Ok(());
            }
            epoch += 1;
            hand_over(shared, stage_tx, stage(domain, epoch, chunk.to_vec())?)?;
        }
        debug!(round, pages = todo.len(), "pre-copy round sent");
        todo = domain.read_and_clear_dirty()?;
        round += 1;
        if u64::try_from(todo.len()).unwrap_or(u64::MAX) <= cfg.precopy_target_pages
            || round > cfg.max_precopy_rounds
        {
            break;
        }
    }
    // `todo` (dirtied during the last round) goes into the first checkpoint.
    let mut carry = todo;
    info!(precopy_epochs = epoch, "pre-copy done, checkpointing");
    {
        let mut s = lock(&shared.stats);
        s.phase = Phase::Protected;
        s.protected_since = Some(Instant::now());
    }
    let mut interval = match cfg.epoch {
        EpochPolicy::Fixed(d) => d,
        EpochPolicy::Adaptive { min, .. } => min,
    };
    let mut next = Instant::now() + interval;
    let mut checkpoints = 0u64;
    loop {
        // Sleep until the epoch ends, waking for stop and early-checkpoint requests.
        {
            let mut early = lock(&shared.early);
            loop {
                if shared.stopped() {
                    return Ok(());
                }
                if std::mem::take(&mut *early) {
                    break;
                }
                let now = Instant::now();
                if now >= next {
                    break;
                }
                early = shared
                    .wake
                    .wait_timeout(early, (next - now).min(Duration::from_millis(50)))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        epoch += 1;
        let t0 = Instant::now();
        let (mut pfns, ctx) = domain.pause_and_collect()?;
        if !carry.is_empty() {
            pfns.append(&mut carry);
            pfns.sort_unstable();
            pfns.dedup();
        }
        let mut staged = stage(domain, epoch, pfns)?;
        staged.vcpu = Some(ctx);
        if cfg.verify_memory_digest {
            staged.memory_digest = Some(memory_digest(domain)?);
        }
        shared.sink.checkpoint(epoch);
        domain.resume()?;
        let pause = t0.elapsed();
        let dirty = staged.pfns.len();
        checkpoints += 1;
        {
            let mut s = lock(&shared.stats);
            s.epoch = epoch;
            s.checkpoints = checkpoints;
            record(&mut s.pauses, pause);
        }
        hand_over(shared, stage_tx, staged)?;
        if cfg.max_checkpoints.is_some_and(|m| checkpoints >= m) {
            // Stop producing; the sender and acker finish the epochs in flight.
            lock(&shared.stats).phase = Phase::Stopped;
            return Ok(());
        }
        interval = cfg.epoch.next_interval(interval, pause);
        debug!(epoch, dirty, ?pause, ?interval, "checkpoint taken");
        // Fixed cadence from the previous deadline, unless we fell behind.
        next = (next + interval).max(Instant::now());
    }
}

fn sender_loop(
    shared: &Shared,
    encoder: EpochEncoder,
    rx: &Receiver<StagedEpoch>,
    mut tx: Box<dyn FrameSender>,
    window: usize,
) {
    if let Err(e) = send_epochs(shared, encoder, rx, tx.as_mut(), window) {
        shared.fail(&e);
    }
    shared.sender_done.store(true, Ordering::Release);
    shared.window_cv.notify_all();
    // Closing the channel only now: the acker must see `finished()` before the peer sees
    // the close and closes its side.
    drop(tx);
}

/// The only thread that sends: new epochs and re-sends, so frames of different epochs never
/// interleave. It never holds the in-flight queue while blocked in `send`, so the acker can
/// always drain acknowledgements (otherwise a full channel in each direction deadlocks).
fn send_epochs(
    shared: &Shared,
    mut encoder: EpochEncoder,
    rx: &Receiver<StagedEpoch>,
    tx: &mut dyn FrameSender,
    window: usize,
) -> Result<(), EngineError> {
    let mut pending: Option<EncodedEpoch> = None;
    let mut producer_done = false;
    loop {
        if shared.stopped() {
            return Ok(());
        }
        let resend = lock(&shared.resend_from).take();
        if let Some(from) = resend {
            let (n, frames): (u64, Vec<Bytes>) = {
                let q = lock(&shared.unacked);
                let again: Vec<&InFlight> = q.iter().filter(|f| f.epoch >= from).collect();
                (
                    again.len() as u64,
                    again
                        .iter()
                        .flat_map(|f| f.frames.iter().cloned())
                        .collect(),
                )
            };
            for f in frames {
                tx.send(f)?;
            }
            lock(&shared.stats).resent += n;
        }
        if pending.is_none() && !producer_done {
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(staged) => pending = Some(encoder.encode(&staged)?),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => producer_done = true,
            }
        }
        if producer_done && pending.is_none() {
            if lock(&shared.unacked).is_empty() {
                return Ok(());
            }
            // Stay to serve re-sends until everything is acknowledged.
            let q = lock(&shared.unacked);
            let _ = shared.window_cv.wait_timeout(q, Duration::from_millis(10));
            continue;
        }
        let Some(encoded) = pending.take() else {
            continue;
        };
        let frames = {
            let mut q = lock(&shared.unacked);
            if q.len() >= window {
                // Wait for an ack (or a re-send request), keeping the epoch for later.
                pending = Some(encoded);
                let _ = shared.window_cv.wait_timeout(q, Duration::from_millis(10));
                continue;
            }
            let frames = encoded.frames.clone();
            q.push_back(InFlight {
                epoch: encoded.epoch,
                checkpoint: encoded.checkpoint,
                frames: encoded.frames,
                wire: encoded.wire_bytes,
                taken_at: Instant::now(),
            });
            frames
        };
        {
            let mut s = lock(&shared.stats);
            if encoded.checkpoint {
                s.raw += encoded.raw_bytes;
                s.wire += encoded.wire_bytes;
            } else {
                s.precopy_wire += encoded.wire_bytes;
            }
        }
        for f in frames {
            tx.send(f)?;
        }
    }
}

/// Asks the sender to re-send every unacknowledged epoch from `from`.
fn request_resend(shared: &Shared, from: u64) {
    let mut r = lock(&shared.resend_from);
    *r = Some(r.map_or(from, |cur| cur.min(from)));
    drop(r);
    shared.window_cv.notify_all();
}

fn acker_loop(shared: &Shared, mut rx: Box<dyn FrameReceiver>, resend_after: Duration) {
    let mut last_progress = Instant::now();
    // Doubles after each timer re-send without progress: a secondary that is merely slow
    // must not be buried under copies of what it is still working through.
    let mut timeout = resend_after;
    // (expected, when) of the last nack-triggered re-send, to ignore duplicate nacks.
    let mut last_nack: Option<(u64, Instant)> = None;
    while !shared.finished() {
        if last_progress.elapsed() >= timeout && !lock(&shared.unacked).is_empty() {
            warn!("no acknowledgement for {timeout:?}; re-sending unacknowledged epochs");
            request_resend(shared, 0);
            last_progress = Instant::now();
            timeout = (timeout * 2).min(Duration::from_secs(60));
        }
        let frame = match rx.recv(Duration::from_millis(20)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(TransportError::Closed) => {
                if !shared.finished() {
                    shared.fail(&EngineError::Transport(TransportError::Closed));
                }
                return;
            }
            Err(e) => return shared.fail(&e.into()),
        };
        match Frame::decode(&frame) {
            Ok(Frame::Ack { epoch }) => {
                let mut q = lock(&shared.unacked);
                let now = Instant::now();
                while q.front().is_some_and(|f| f.epoch <= epoch) {
                    let Some(f) = q.pop_front() else { break };
                    last_progress = now;
                    timeout = resend_after;
                    if f.checkpoint {
                        shared.sink.commit(f.epoch);
                        let mut s = lock(&shared.stats);
                        s.committed = f.epoch;
                        s.last_commit = Some(now);
                        record(&mut s.commit_latency, now - f.taken_at);
                    }
                }
                drop(q);
                shared.window_cv.notify_all();
            }
            Ok(Frame::Nack { expected, reason }) => {
                // The re-send for this very nack may still be on its way.
                if last_nack.is_some_and(|(e, t)| e == expected && t.elapsed() < resend_after / 4) {
                    continue;
                }
                warn!(expected, ?reason, "secondary refused an epoch; re-sending");
                last_nack = Some((expected, Instant::now()));
                request_resend(shared, expected);
                last_progress = Instant::now();
            }
            Ok(_) => warn!("unexpected frame from the secondary"),
            Err(e) => warn!(error = %e, "undecodable frame from the secondary"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn adaptive() -> EpochPolicy {
        EpochPolicy::Adaptive {
            min: 5 * MS,
            max: 25 * MS,
            max_pause_share: 0.1,
            max_pause: 5 * MS,
        }
    }

    #[test]
    fn cheap_checkpoints_run_at_the_shortest_epoch() {
        assert_eq!(adaptive().next_interval(25 * MS, MS / 5), 5 * MS);
    }

    #[test]
    fn pauses_are_held_to_their_share_of_time() {
        // 1.5 ms pause at 10 % -> 15 ms epochs.
        assert_eq!(adaptive().next_interval(5 * MS, MS * 3 / 2), 15 * MS);
    }

    #[test]
    fn a_pause_above_the_bound_shortens_the_next_epoch() {
        // 10 ms pause after a 20 ms epoch: halve the epoch (bounded by min).
        assert_eq!(adaptive().next_interval(20 * MS, 10 * MS), 10 * MS);
        assert_eq!(adaptive().next_interval(6 * MS, 20 * MS), 5 * MS);
    }

    #[test]
    fn fixed_epochs_ignore_the_pause() {
        assert_eq!(
            EpochPolicy::Fixed(25 * MS).next_interval(MS, 9 * MS),
            25 * MS
        );
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(|i| i * MS).collect();
        let m = Millis::of(&v);
        assert_eq!(
            (m.p50.round(), m.p99.round(), m.max.round()),
            (51.0, 99.0, 100.0)
        );
    }
}
