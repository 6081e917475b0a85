//! The link: per-channel reliable queues shared by every path, and the connection tasks.
//!
//! Each path has two TCP connections, its *lanes*: the urgent lane carries the link's own
//! heartbeats, acks and the Control and Heartbeat channels; the bulk lane carries Disk,
//! Checkpoint and Net. Bulk data sitting in socket buffers therefore never delays a heartbeat
//! (measured by `scripts/bench alink`). Each lane has its own heartbeats and liveness.
//!
//! Reliability: every Data fragment stays in its channel's queue until the peer acknowledges
//! it (cumulative ack, sent once the receiving application has taken the message: at once
//! for every 8th fragment or when 10 ms have passed since the last ack, else with the next
//! heartbeat tick). Each lane
//! sends data through one *active* connection at a time, so per-channel order on the wire is
//! the order of the queue. When the active connection fails, the same lane of the next live
//! path becomes active and every unacknowledged fragment of that lane's channels is written
//! again from the start of the queue; the receiver drops what it already has by sequence
//! number. A receiver that sees a gap asks for a resend (Nack). A path that comes back serves
//! heartbeats at once and carries data again when the active path fails, or as soon as
//! nothing is in flight if it is preferred (lower index).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio::time::Instant;

use crate::frame::{
    self, decode_header, encode_header, keyed, Channel, Frame, FrameError, FrameMac, Kind,
    FLAG_MORE, HEADER_LEN, MAC_LEN, MAX_FRAGMENT,
};
use crate::status::{LinkCounters, LinkEvent, LinkStatus, PathStatus};
use crate::{LinkConfig, LinkError};

const NCH: usize = 5;
/// Connections per path: urgent and bulk.
const LANES: usize = 2;

/// The lane that carries a channel's data.
fn lane_of(ch: Channel) -> usize {
    match ch {
        Channel::Control | Channel::Heartbeat => 0,
        Channel::Disk | Channel::Checkpoint | Channel::Net => 1,
    }
}
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Ack at least this often (in fragments) while a receiver drains a backlog.
const ACK_EVERY: u64 = 32;
/// A receiver that has drained its queue acks once this many fragments are unacked, or once
/// [`ACK_DELAY`] has passed since its last ack; later ones wait for the next message or the
/// heartbeat tick (which repeats every channel's cumulative ack). Acks only free the sender's
/// resend queue (delivery never waits for them), so a stream of 1 MiB messages costs one ack
/// frame (and its wake-ups on both hosts) per few messages instead of one per message.
const ACK_DRAINED: u64 = 8;
/// See [`ACK_DRAINED`].
const ACK_DELAY: Duration = Duration::from_millis(10);

struct TxChannel {
    next_seq: u64,
    /// Fragments not yet acknowledged, oldest first; the first `sent` were written on the
    /// current active path.
    queue: VecDeque<(u64, u8, Piece)>,
    sent: usize,
    bytes: usize,
}

/// One fragment's payload as two parts sent back to back (an application header and the
/// bulk data it describes), so a caller never has to copy them into one buffer.
#[derive(Clone, Default)]
pub(crate) struct Piece {
    pub(crate) head: Bytes,
    pub(crate) body: Bytes,
}

impl Piece {
    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }
}

/// Cuts a two-part message into fragments of at most [`MAX_FRAGMENT`] bytes, in order.
fn fragments(mut head: Bytes, mut body: Bytes) -> Vec<Piece> {
    let mut out = Vec::new();
    loop {
        let n = (head.len() + body.len()).min(MAX_FRAGMENT);
        let h = head.split_to(n.min(head.len()));
        let b = body.split_to(n - h.len());
        out.push(Piece { head: h, body: b });
        if head.is_empty() && body.is_empty() {
            return out;
        }
    }
}

struct RxChannel {
    expected: u64,
    partial: BytesMut,
    /// The next seq the application has consumed up to (ack value), and the last one acked.
    consumed: u64,
    acked: u64,
    /// When the last ack of this channel was queued.
    last_ack: Option<Instant>,
    /// Bumped when the peer restarts so stale deliveries do not move `consumed`.
    generation: u64,
    last_nack: Option<u64>,
    tx: mpsc::UnboundedSender<Delivery>,
}

struct Delivery {
    generation: u64,
    next_seq: u64,
    payload: Bytes,
}

struct ConnSlot {
    up: bool,
    /// Identifies the live connection; tasks of an older one exit when this changes.
    generation: u64,
    last_seen: Option<Instant>,
    rtt: Option<Duration>,
    connects: u64,
    /// Link-internal frames for this path only (heartbeats, replies, acks, nacks).
    urgent: VecDeque<Frame>,
    wake: Arc<Notify>,
}

struct State {
    tx: Vec<TxChannel>,
    rx: Vec<RxChannel>,
    /// One slot per connection: `path * LANES + lane`.
    conns: Vec<ConnSlot>,
    /// Per lane, the connection (`path * LANES + lane`) that carries its channels' data.
    active: [Option<usize>; LANES],
    peer_session: Option<u64>,
    receivers: Vec<Option<mpsc::UnboundedReceiver<Delivery>>>,
    last_reject_log: Option<Instant>,
}

pub(crate) struct Shared {
    cfg: LinkConfig,
    secret_key: FrameMac,
    session: u64,
    state: Mutex<State>,
    window: Notify,
    events: broadcast::Sender<LinkEvent>,
    counters: LinkCounters,
    shutdown: watch::Sender<bool>,
    epoch: Instant,
}

/// An availability link to one peer host. Cheap to clone; the link stops when
/// [`Link::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
    _guard: Arc<ShutdownOnDrop>,
}

struct ShutdownOnDrop(Arc<Shared>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.shutdown.send_replace(true);
    }
}

/// The receiving end of one channel. Taking a message acknowledges it to the sender.
pub struct Receiver {
    shared: Arc<Shared>,
    channel: Channel,
    rx: mpsc::UnboundedReceiver<Delivery>,
}

impl Receiver {
    /// The next message of this channel, in order; `None` once the link has shut down.
    pub async fn recv(&mut self) -> Option<Bytes> {
        let mut stop = self.shared.shutdown.subscribe();
        let d = tokio::select! {
            d = self.rx.recv() => d?,
            _ = stop.wait_for(|s| *s) => return None,
        };
        self.consumed(&d);
        Some(d.payload)
    }

    /// A message if one is waiting, without blocking.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        let d = self.rx.try_recv().ok()?;
        self.consumed(&d);
        Some(d.payload)
    }

    /// The channel this receiver drains.
    #[must_use]
    pub fn channel(&self) -> Channel {
        self.channel
    }

    fn consumed(&self, d: &Delivery) {
        let drained = self.rx.is_empty();
        let mut st = self.shared.lock();
        let ch = &mut st.rx[self.channel.index()];
        if ch.generation != d.generation {
            return;
        }
        ch.consumed = ch.consumed.max(d.next_seq);
        let unacked = ch.consumed - ch.acked;
        let due = unacked >= ACK_EVERY
            || (drained
                && (unacked >= ACK_DRAINED
                    || ch.last_ack.is_none_or(|t| t.elapsed() >= ACK_DELAY)));
        if due {
            let seq = ch.consumed;
            ch.acked = seq;
            ch.last_ack = Some(Instant::now());
            let channel = self.channel;
            queue_urgent(
                &mut st,
                control_frame(Kind::Ack, channel, seq, Bytes::new()),
            );
        }
    }
}

fn control_frame(kind: Kind, channel: Channel, seq: u64, payload: Bytes) -> Frame {
    Frame {
        kind,
        channel,
        flags: 0,
        seq,
        payload,
    }
}

/// Queues a message's fragments on its channel and wakes the lane's active writer.
fn enqueue(st: &mut State, channel: Channel, pieces: Vec<Piece>) {
    let tx = &mut st.tx[channel.index()];
    let last = pieces.len().saturating_sub(1);
    for (i, piece) in pieces.into_iter().enumerate() {
        let flags = if i == last { 0 } else { FLAG_MORE };
        tx.bytes += piece.len();
        tx.queue.push_back((tx.next_seq, flags, piece));
        tx.next_seq += 1;
    }
    if let Some(a) = st.active[lane_of(channel)] {
        st.conns[a].wake.notify_one();
    }
}

/// Puts a link-internal frame on the active urgent connection (or any live one).
fn queue_urgent(st: &mut State, f: Frame) {
    let target = st.active[0]
        .filter(|&i| st.conns[i].up)
        .or_else(|| {
            st.conns
                .iter()
                .step_by(LANES)
                .position(|p| p.up)
                .map(|p| p * LANES)
        })
        .or_else(|| st.conns.iter().position(|p| p.up));
    if let Some(i) = target {
        st.conns[i].urgent.push_back(f);
        st.conns[i].wake.notify_one();
    }
}

impl Link {
    /// Starts a link: binds the listening addresses (accepting side) and starts one task per
    /// path. Paths connect in the background; see [`Link::wait_connected`].
    ///
    /// # Errors
    /// A bad configuration, or an address that cannot be bound.
    pub async fn start(cfg: LinkConfig) -> Result<Link, LinkError> {
        cfg.validate()?;
        let mut listeners = Vec::new();
        if !cfg.is_dialer() {
            for p in &cfg.paths {
                let l = TcpListener::bind(p.local)
                    .await
                    .map_err(|e| LinkError::Bind {
                        addr: p.local,
                        source: e,
                    })?;
                listeners.push(l);
            }
        }
        Ok(Self::start_inner(cfg, listeners))
    }

    /// Starts the accepting side on listeners the caller has already bound (one per path, in
    /// path order). The dialing side ignores `listeners`.
    ///
    /// # Errors
    /// A bad configuration or a listener count that does not match the paths.
    pub fn start_with_listeners(
        cfg: LinkConfig,
        listeners: Vec<TcpListener>,
    ) -> Result<Link, LinkError> {
        cfg.validate()?;
        if !cfg.is_dialer() && listeners.len() != cfg.paths.len() {
            return Err(LinkError::Config(format!(
                "{} listeners for {} paths",
                listeners.len(),
                cfg.paths.len()
            )));
        }
        Ok(Self::start_inner(cfg, listeners))
    }

    fn start_inner(cfg: LinkConfig, listeners: Vec<TcpListener>) -> Link {
        let mut rx = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..NCH {
            let (tx, r) = mpsc::unbounded_channel();
            rx.push(RxChannel {
                expected: 0,
                partial: BytesMut::new(),
                consumed: 0,
                acked: 0,
                last_ack: None,
                generation: 0,
                last_nack: None,
                tx,
            });
            receivers.push(Some(r));
        }
        let paths = (0..cfg.paths.len() * LANES)
            .map(|_| ConnSlot {
                up: false,
                generation: 0,
                last_seen: None,
                rtt: None,
                connects: 0,
                urgent: VecDeque::new(),
                wake: Arc::new(Notify::new()),
            })
            .collect();
        let state = State {
            tx: (0..NCH)
                .map(|_| TxChannel {
                    next_seq: 0,
                    queue: VecDeque::new(),
                    sent: 0,
                    bytes: 0,
                })
                .collect(),
            rx,
            conns: paths,
            active: [None; LANES],
            peer_session: None,
            receivers,
            last_reject_log: None,
        };
        let (events, _) = broadcast::channel(256);
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            secret_key: keyed(&cfg.secret),
            session: rand::thread_rng().next_u64(),
            cfg,
            state: Mutex::new(state),
            window: Notify::new(),
            events,
            counters: LinkCounters::default(),
            shutdown,
            epoch: Instant::now(),
        });
        if shared.cfg.is_dialer() {
            for conn in 0..shared.cfg.paths.len() * LANES {
                tokio::spawn(conn::dial_loop(shared.clone(), conn));
            }
        } else {
            for (i, l) in listeners.into_iter().enumerate() {
                tokio::spawn(conn::accept_loop(shared.clone(), i, l));
            }
        }
        tokio::spawn(heartbeat_loop(shared.clone()));
        Link {
            _guard: Arc::new(ShutdownOnDrop(shared.clone())),
            shared,
        }
    }

    /// Queues a message on a channel. Returns once the message is queued (it is then delivered
    /// exactly once and in order, whatever happens to individual paths); waits only while the
    /// channel's window of unacknowledged bytes is full.
    ///
    /// # Errors
    /// [`LinkError::TooLarge`] or [`LinkError::Closed`].
    pub async fn send(&self, channel: Channel, msg: Bytes) -> Result<(), LinkError> {
        self.send_parts(channel, msg, Bytes::new()).await
    }

    /// Like [`Link::send`], for a message made of `head` followed by `body` (e.g. an
    /// application header and the data it describes): the receiver gets one message, their
    /// concatenation, and the sender never copies them into one buffer (they are written to
    /// the socket with one vectored write).
    ///
    /// # Errors
    /// [`LinkError::TooLarge`] or [`LinkError::Closed`].
    pub async fn send_parts(
        &self,
        channel: Channel,
        head: Bytes,
        body: Bytes,
    ) -> Result<(), LinkError> {
        let sh = &self.shared;
        let len = head.len() + body.len();
        if len > sh.cfg.max_message {
            return Err(LinkError::TooLarge {
                len,
                max: sh.cfg.max_message,
            });
        }
        let mut pieces = Some(fragments(head, body));
        let mut stop = sh.shutdown.subscribe();
        loop {
            if *stop.borrow() {
                return Err(LinkError::Closed);
            }
            let wait = sh.window.notified();
            {
                let mut st = sh.lock();
                let tx = &mut st.tx[channel.index()];
                if tx.bytes == 0 || tx.bytes + len <= sh.cfg.window_bytes {
                    enqueue(&mut st, channel, pieces.take().unwrap_or_default());
                    return Ok(());
                }
            }
            tokio::select! {
                () = wait => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Like [`Link::send_parts`], but queues at once whatever the window (never waits; usable
    /// from a blocking thread or under a lock), for callers that bound the data they have in
    /// flight themselves (the disk mirror: the client's queue depth and the resync window).
    ///
    /// # Errors
    /// [`LinkError::TooLarge`] or [`LinkError::Closed`].
    pub fn send_parts_now(
        &self,
        channel: Channel,
        head: Bytes,
        body: Bytes,
    ) -> Result<(), LinkError> {
        let sh = &self.shared;
        let len = head.len() + body.len();
        if len > sh.cfg.max_message {
            return Err(LinkError::TooLarge {
                len,
                max: sh.cfg.max_message,
            });
        }
        if *sh.shutdown.borrow() {
            return Err(LinkError::Closed);
        }
        let pieces = fragments(head, body);
        enqueue(&mut sh.lock(), channel, pieces);
        Ok(())
    }

    /// The receiver of a channel. Each channel's receiver can be taken once.
    #[must_use]
    pub fn receiver(&self, channel: Channel) -> Option<Receiver> {
        let rx = self.shared.lock().receivers[channel.index()].take()?;
        Some(Receiver {
            shared: self.shared.clone(),
            channel,
            rx,
        })
    }

    /// Subscribes to path and peer events.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<LinkEvent> {
        self.shared.events.subscribe()
    }

    /// True while at least one path is up.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.shared.lock().conns.iter().any(|p| p.up)
    }

    /// Waits until at least one path is up, at most `timeout`. Returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_connected() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every path (both lanes of each) is up, at most `timeout`. Returns whether
    /// they are.
    pub async fn wait_all_paths(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.shared.lock().conns.iter().all(|p| p.up) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every queued message of every channel has been acknowledged (consumed by
    /// the peer's application), at most `timeout`. Returns whether it was.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let wait = self.shared.window.notified();
            if self.shared.lock().tx.iter().all(|t| t.queue.is_empty()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                return false;
            }
        }
    }

    /// Liveness of every path and the link's counters.
    #[must_use]
    pub fn status(&self) -> LinkStatus {
        let sh = &self.shared;
        let st = sh.lock();
        let now = Instant::now();
        LinkStatus {
            local_host: sh.cfg.local_host.clone(),
            peer_host: sh.cfg.peer_host.clone(),
            connected: st.conns.iter().any(|p| p.up),
            active_path: st.active[1].map(|c| c / LANES),
            peer_session: st.peer_session,
            paths: st
                .conns
                .chunks(LANES)
                .zip(&sh.cfg.paths)
                .enumerate()
                .map(|(index, (lanes, c))| (index, &lanes[0], lanes.iter().all(|l| l.up), c))
                .map(|(index, p, up, c)| PathStatus {
                    index,
                    local: c.local,
                    peer: c.peer,
                    up,
                    rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1e3),
                    last_seen_ms_ago: p.last_seen.map(|t| {
                        u64::try_from(now.duration_since(t).as_millis()).unwrap_or(u64::MAX)
                    }),
                    connects: p.connects,
                })
                .collect(),
            queued_bytes: st.tx.iter().map(|t| t.bytes as u64).sum(),
            counters: sh.counters.snapshot(),
        }
    }

    /// Stops every task of the link. Receivers then return `None` and `send` fails.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// This link instance's session id (changes when the process restarts).
    #[must_use]
    pub fn session(&self) -> u64 {
        self.shared.session
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; the state is still consistent enough
        // to keep serving, so recover rather than poison every later caller.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn emit(&self, e: LinkEvent) {
        let _ = self.events.send(e);
    }

    /// Counts a rejected frame and logs at most once a minute per link.
    fn reject(&self, path: usize, err: &FrameError) {
        self.counters.count_reject(err);
        let mut st = self.lock();
        let now = Instant::now();
        if st
            .last_reject_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            st.last_reject_log = Some(now);
            tracing::warn!(peer = %self.cfg.peer_host, path, error = %err,
                "rejected an A-link frame (further rejections are counted, logged once a minute)");
        }
    }

    /// Marks a connection down (if it is still the live one) and moves its lane's data to the
    /// same lane of another path.
    fn conn_down(&self, conn: usize, generation: u64, reason: &str) {
        let mut st = self.lock();
        let path = conn / LANES;
        let lane = conn % LANES;
        let was_up = path_is_up(&st, path);
        let slot = &mut st.conns[conn];
        if slot.generation != generation || !slot.up {
            return;
        }
        slot.up = false;
        slot.generation += 1;
        slot.urgent.clear();
        slot.wake.notify_waiters();
        if st.active[lane] == Some(conn) {
            let next = first_up(&st, lane);
            st.active[lane] = next;
            for ch in Channel::ALL.into_iter().filter(|&c| lane_of(c) == lane) {
                let tx = &mut st.tx[ch.index()];
                bump(&self.counters.resent_frames, tx.sent as u64);
                tx.sent = 0;
            }
            if let Some(n) = next {
                st.conns[n].wake.notify_one();
            }
        }
        drop(st);
        if was_up {
            tracing::info!(peer = %self.cfg.peer_host, path, lane, reason, "A-link path down");
            self.emit(LinkEvent::PathDown {
                path,
                reason: reason.to_string(),
            });
        }
    }

    /// Registers a freshly authenticated connection; returns its generation.
    fn conn_up(&self, conn: usize, peer_session: u64) -> u64 {
        let path = conn / LANES;
        let lane = conn % LANES;
        let mut st = self.lock();
        let mut restarted = false;
        if let Some(old) = st.peer_session {
            if old != peer_session {
                restarted = true;
                // The peer is a new process: nothing it had is left. Reset both directions and
                // drop every other connection, which belongs to the old instance.
                for rx in &mut st.rx {
                    rx.expected = 0;
                    rx.partial.clear();
                    rx.consumed = 0;
                    rx.acked = 0;
                    rx.generation += 1;
                    rx.last_nack = None;
                }
                for tx in &mut st.tx {
                    tx.queue.clear();
                    tx.next_seq = 0;
                    tx.sent = 0;
                    tx.bytes = 0;
                }
                for (i, p) in st.conns.iter_mut().enumerate() {
                    if i != conn && p.up {
                        p.up = false;
                        p.generation += 1;
                        p.urgent.clear();
                        p.wake.notify_waiters();
                    }
                }
                st.active = [None; LANES];
            }
        }
        st.peer_session = Some(peer_session);
        let slot = &mut st.conns[conn];
        // A replaced connection (the peer reconnected before we noticed) loses its tasks.
        slot.generation += 1;
        slot.wake.notify_waiters();
        slot.up = true;
        slot.connects += 1;
        slot.last_seen = Some(Instant::now());
        slot.urgent.clear();
        let generation = slot.generation;
        if st.active[lane].is_none() {
            st.active[lane] = Some(conn);
            for ch in Channel::ALL.into_iter().filter(|&c| lane_of(c) == lane) {
                st.tx[ch.index()].sent = 0;
            }
        }
        self.maybe_return_to_preferred(&mut st);
        let now_up = path_is_up(&st, path);
        drop(st);
        self.window.notify_waiters();
        if restarted {
            tracing::warn!(peer = %self.cfg.peer_host, "peer restarted: unacknowledged messages to its old instance were dropped");
            self.emit(LinkEvent::PeerRestarted {
                session: peer_session,
            });
        }
        if now_up {
            tracing::info!(peer = %self.cfg.peer_host, path, "A-link path up");
            self.emit(LinkEvent::PathUp { path });
        }
        generation
    }

    /// Handles one authenticated frame read on `path`.
    fn on_frame(&self, path: usize, generation: u64, f: Frame) -> Result<(), &'static str> {
        let mut st = self.lock();
        if st.conns[path].generation != generation {
            return Err("connection replaced");
        }
        st.conns[path].last_seen = Some(Instant::now());
        match f.kind {
            Kind::Data => {
                let max = self.cfg.max_message;
                let rx = &mut st.rx[f.channel.index()];
                if f.seq < rx.expected {
                    bump(&self.counters.duplicates_dropped, 1);
                    // The sender resent something we have: make sure it learns our position.
                    let seq = rx.consumed;
                    let ch = f.channel;
                    queue_urgent(&mut st, control_frame(Kind::Ack, ch, seq, Bytes::new()));
                    return Ok(());
                }
                if f.seq > rx.expected {
                    bump(&self.counters.gaps, 1);
                    if rx.last_nack != Some(rx.expected) {
                        rx.last_nack = Some(rx.expected);
                        let seq = rx.expected;
                        let ch = f.channel;
                        queue_urgent(&mut st, control_frame(Kind::Nack, ch, seq, Bytes::new()));
                    }
                    return Ok(());
                }
                rx.expected += 1;
                rx.last_nack = None;
                if rx.partial.len() + f.payload.len() > max {
                    return Err("message exceeds the maximum size");
                }
                let payload = if f.flags & FLAG_MORE != 0 {
                    rx.partial.extend_from_slice(&f.payload);
                    return Ok(());
                } else if rx.partial.is_empty() {
                    f.payload
                } else {
                    rx.partial.extend_from_slice(&f.payload);
                    rx.partial.split().freeze()
                };
                let d = Delivery {
                    generation: rx.generation,
                    next_seq: rx.expected,
                    payload,
                };
                if let Err(mpsc::error::SendError(d)) = rx.tx.send(d) {
                    // Nobody will ever read this channel again: acknowledge and drop.
                    rx.consumed = d.next_seq;
                    rx.acked = d.next_seq;
                    bump(&self.counters.undeliverable, 1);
                    let ch = f.channel;
                    queue_urgent(
                        &mut st,
                        control_frame(Kind::Ack, ch, d.next_seq, Bytes::new()),
                    );
                }
                bump(&self.counters.messages_received, 1);
            }
            Kind::Ack => {
                let tx = &mut st.tx[f.channel.index()];
                let mut freed = false;
                while tx.queue.front().is_some_and(|(s, _, _)| *s < f.seq) {
                    if let Some((_, _, b)) = tx.queue.pop_front() {
                        tx.bytes -= b.len();
                    }
                    tx.sent = tx.sent.saturating_sub(1);
                    freed = true;
                }
                if freed {
                    self.maybe_return_to_preferred(&mut st);
                    drop(st);
                    self.window.notify_waiters();
                }
            }
            Kind::Nack => {
                let active = st.active[lane_of(f.channel)];
                let tx = &mut st.tx[f.channel.index()];
                if let Some(pos) = tx.queue.iter().position(|(s, _, _)| *s == f.seq) {
                    if pos < tx.sent {
                        bump(&self.counters.resent_frames, (tx.sent - pos) as u64);
                        tx.sent = pos;
                        if let Some(a) = active {
                            st.conns[a].wake.notify_one();
                        }
                    }
                }
            }
            Kind::Heartbeat => {
                let reply = control_frame(Kind::HeartbeatReply, Channel::Control, f.seq, f.payload);
                st.conns[path].urgent.push_back(reply);
                st.conns[path].wake.notify_one();
            }
            Kind::HeartbeatReply => {
                if let Ok(b) = <[u8; 8]>::try_from(&f.payload[..]) {
                    let sent = u64::from_be_bytes(b);
                    let now = self.now_ns();
                    if sent <= now {
                        st.conns[path].rtt = Some(Duration::from_nanos(now - sent));
                    }
                }
            }
            Kind::Hello | Kind::HelloAck => return Err("handshake frame after the handshake"),
        }
        Ok(())
    }

    /// Moves each lane's data back to the lowest-index live path once nothing of it is in
    /// flight.
    fn maybe_return_to_preferred(&self, st: &mut State) {
        let _ = self;
        for lane in 0..LANES {
            let Some(first) = first_up(st, lane) else {
                continue;
            };
            let idle = Channel::ALL
                .into_iter()
                .filter(|&c| lane_of(c) == lane)
                .all(|c| st.tx[c.index()].queue.is_empty());
            if st.active[lane] != Some(first) && idle {
                st.active[lane] = Some(first);
                st.conns[first].wake.notify_one();
            }
        }
    }
}

/// The first live connection of a lane.
fn first_up(st: &State, lane: usize) -> Option<usize> {
    (lane..st.conns.len())
        .step_by(LANES)
        .find(|&c| st.conns[c].up)
}

/// A path is up when both its lanes are.
fn path_is_up(st: &State, path: usize) -> bool {
    st.conns[path * LANES..(path + 1) * LANES]
        .iter()
        .all(|p| p.up)
}

/// Per-path heartbeat sender and silence detector, for all paths.
async fn heartbeat_loop(sh: Arc<Shared>) {
    let mut stop = sh.shutdown.subscribe();
    let mut tick = tokio::time::interval(sh.cfg.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        n += 1;
        let now = Instant::now();
        let t = sh.now_ns();
        let mut silent = Vec::new();
        {
            let mut st = sh.lock();
            // A path's liveness is its urgent lane's: heartbeats there never queue behind bulk
            // data, whereas a bulk lane's reply can wait behind megabytes in socket buffers on
            // a busy host. A silent urgent lane takes its path's bulk lane down with it.
            for path in 0..st.conns.len() / LANES {
                let (urgent, bulk) = (path * LANES, path * LANES + 1);
                let p = &mut st.conns[urgent];
                if !p.up {
                    continue;
                }
                if p.last_seen
                    .is_some_and(|s| now.duration_since(s) > sh.cfg.path_timeout)
                {
                    silent.push((urgent, p.generation));
                    if st.conns[bulk].up {
                        silent.push((bulk, st.conns[bulk].generation));
                    }
                    continue;
                }
                p.urgent.push_back(control_frame(
                    Kind::Heartbeat,
                    Channel::Control,
                    n,
                    Bytes::copy_from_slice(&t.to_be_bytes()),
                ));
                p.wake.notify_one();
            }
        }
        // Acks ride on connections that can die with frames still queued; repeating each
        // channel's cumulative ack once per tick makes a lost ack cost one tick, not a stall.
        {
            let mut st = sh.lock();
            let acks: Vec<Frame> = Channel::ALL
                .into_iter()
                .filter(|c| st.rx[c.index()].consumed > 0)
                .map(|c| control_frame(Kind::Ack, c, st.rx[c.index()].consumed, Bytes::new()))
                .collect();
            for a in acks {
                queue_urgent(&mut st, a);
            }
        }
        for (i, g) in silent {
            sh.conn_down(i, g, "heartbeat timeout");
        }
    }
}

mod conn;

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
