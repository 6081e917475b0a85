//! The relay for one VM: two AF_PACKET sockets (vif, uplink), two forwarding threads, one
//! uplink monitor thread, and the control API the agent drives.
//!
//! Threads:
//! - `vm-rx`: frames from the VM (vif) → validated → held (buffered), forwarded (pass-through),
//!   tunnelled (redirect) or dropped (standby);
//! - `uplink-rx`: frames from the uplink → for the VM's MAC or a group address → vif, or the
//!   tunnel when this shim carries the peer's traffic;
//! - `monitor`: polls the uplink's carrier and starts/stops the redirect, and binds the vif
//!   when an interface of its name appears (drops the socket when it goes or is replaced).
//!
//! All state sits behind one mutex; frames for the uplink are sent while holding it, which
//! keeps the order "released frames of epoch N, then anything newer" without a second queue.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::epoch::{EpochBuffer, EpochError, PushOutcome, DEFAULT_LIMIT_BYTES};
use crate::frame::{self, FrameError, Learned, MacAddr};
use crate::sys::{self, PacketSocket, RecvBatch};
use crate::tunnel::{TunnelMsg, TunnelTransport};

/// At most this many addresses of each family are remembered per VM.
const MAX_LEARNED: usize = 32;
/// How long blocking receives wait before checking for shutdown.
const RECV_TIMEOUT: Duration = Duration::from_millis(100);
/// How often a redirecting relay repeats its request to the peer.
const REDIRECT_REPEAT: Duration = Duration::from_secs(1);
/// Receive slot: a `virtio_net_hdr` and the largest GSO super-frame, plus one byte so that
/// anything larger shows as truncated.
const SLOT_LEN: usize = frame::VNET_HDR_LEN + frame::MAX_GSO_FRAME + 1;
/// Frames taken per receive call (and sent per send call).
const BATCH: usize = 32;

/// What the shim does with the VM's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Forward at once (unprotected, or level 2 only).
    Passthrough,
    /// Hold per epoch until committed (level 3 output commit).
    Buffered,
    /// The secondary's shim: forward nothing, learn the VM's addresses, carry the peer's
    /// frames when asked (redirect), wait for [`Shim::takeover`].
    Standby,
}

/// Configuration of one VM's relay.
#[derive(Debug, Clone)]
pub struct ShimConfig {
    /// The VM's interface (vif in dom0; a veth end in tests).
    pub vif: String,
    /// The uplink interface (a bridge port or NIC).
    pub uplink: String,
    /// The VM's MAC. When `None` it is learned from the first frame the VM sends.
    pub vm_mac: Option<MacAddr>,
    /// MTU of the VM's network; frames above MTU + 18 bytes are refused.
    pub mtu: usize,
    /// Bound on bytes held for uncommitted epochs (each frame counts with its 10-byte
    /// offload header).
    pub buffer_limit: usize,
    /// Mode at start.
    pub mode: Mode,
    /// How often the uplink carrier is checked.
    pub monitor_interval: Duration,
    /// Uplink failure without carrier loss: when the VM's frames went out during this long but
    /// no frame at all came in, while the peer reports its uplink receiving, the uplink is
    /// treated as failed. `None` disables the check (carrier loss alone triggers redirects).
    pub silence_timeout: Option<Duration>,
    /// Run the two forwarding threads under `SCHED_FIFO` at this priority (needs
    /// `CAP_SYS_NICE`); `None` keeps the default scheduler.
    pub realtime_priority: Option<u8>,
}

impl ShimConfig {
    /// A pass-through relay between `vif` and `uplink` with the defaults (MTU 1500, 16 MiB).
    #[must_use]
    pub fn new(vif: &str, uplink: &str) -> Self {
        ShimConfig {
            vif: vif.to_string(),
            uplink: uplink.to_string(),
            vm_mac: None,
            mtu: 1500,
            buffer_limit: DEFAULT_LIMIT_BYTES,
            mode: Mode::Passthrough,
            monitor_interval: Duration::from_millis(50),
            realtime_priority: None,
            silence_timeout: Some(Duration::from_secs(2)),
        }
    }
}

/// Errors of the relay and its control API.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// An interface could not be opened.
    #[error("cannot open {role} interface {ifname}: {source}")]
    Open {
        /// "vif" or "uplink".
        role: &'static str,
        /// The interface name.
        ifname: String,
        /// Why.
        source: io::Error,
    },
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An epoch call out of order.
    #[error(transparent)]
    Epoch(#[from] EpochError),
    /// An epoch call in a mode where it means nothing.
    #[error("{op} is only valid in buffered mode (mode is {mode:?})")]
    WrongMode {
        /// The call.
        op: &'static str,
        /// The current mode.
        mode: Mode,
    },
    /// A thread could not be started.
    #[error("cannot start relay thread: {0}")]
    Thread(io::Error),
}

/// Frames dropped, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drops {
    /// Shorter than an Ethernet header.
    pub runt: u64,
    /// Longer than MTU + headers (including offloaded super-frames).
    pub oversize: u64,
    /// From the vif with a source MAC that is not the VM's.
    pub spoofed_source: u64,
    /// From the VM while in standby.
    pub standby: u64,
    /// Held for an epoch that was discarded.
    pub discarded: u64,
    /// Undecodable tunnel messages, or for another MAC.
    pub tunnel_garbage: u64,
    /// Well-formed tunnel messages that make no sense now (frames without a redirect).
    pub tunnel_unexpected: u64,
    /// A `virtio_net_hdr` describing an impossible offload.
    pub bad_offload: u64,
    /// A send to the uplink, vif or tunnel failed.
    pub send_failed: u64,
    /// The VM's frames had to leave by the tunnel but no tunnel is configured.
    pub no_tunnel: u64,
    /// Frames for the VM that arrived while its vif did not exist (domain not running yet,
    /// or being restarted).
    #[serde(default)]
    pub vif_absent: u64,
}

/// Why the VM's frames are redirected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedirectReason {
    /// The uplink is down or has no carrier.
    Carrier,
    /// The uplink has carrier but received nothing while the VM sent and the peer's uplink
    /// received.
    Silence,
    /// The agent asked for it ([`Shim::set_redirect`]).
    Forced,
}

/// Redirect state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectStatus {
    /// Why the current redirect started (`None` when not redirecting).
    pub reason: Option<RedirectReason>,
    /// The agent's override: `Some(true)` redirect, `Some(false)` stay local, `None` automatic.
    pub forced: Option<bool>,
    /// The peer's last status report says its uplink receives frames.
    pub peer_uplink_alive: bool,
    /// The local uplink is up with carrier (as last polled).
    pub uplink_up: bool,
    /// The VM's frames go through the tunnel to the peer.
    pub redirecting: bool,
    /// This shim carries the peer's frames for the VM.
    pub serving_peer: bool,
    /// Redirects started since start.
    pub redirects_started: u64,
}

/// Counters of one VM's relay, for the agent (serialised as JSON on the control socket).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Current mode.
    pub mode: Mode,
    /// The VM's MAC, once known.
    pub vm_mac: Option<String>,
    /// Current epoch.
    pub epoch: u64,
    /// Highest committed epoch.
    pub committed_epoch: u64,
    /// Frames received from the VM (valid ones).
    pub from_vm_frames: u64,
    /// Bytes received from the VM (valid frames).
    pub from_vm_bytes: u64,
    /// Frames ever held for an epoch.
    pub held_frames_total: u64,
    /// Bytes ever held for an epoch.
    pub held_bytes_total: u64,
    /// Frames held now.
    pub held_frames_now: u64,
    /// Bytes held now.
    pub held_bytes_now: u64,
    /// The bound on held bytes.
    pub buffer_limit_bytes: u64,
    /// Frames released by commits.
    pub released_frames: u64,
    /// Bytes released by commits.
    pub released_bytes: u64,
    /// VM frames sent on the local uplink (pass-through and released).
    pub to_uplink_frames: u64,
    /// VM bytes sent on the local uplink.
    pub to_uplink_bytes: u64,
    /// Valid frames received on the uplink (for anyone: the uplink's sign of life).
    pub from_uplink_frames: u64,
    /// Frames delivered to the VM.
    pub to_vm_frames: u64,
    /// Bytes delivered to the VM.
    pub to_vm_bytes: u64,
    /// Frame messages sent into the tunnel.
    pub tunnel_out_frames: u64,
    /// Frame messages accepted from the tunnel.
    pub tunnel_in_frames: u64,
    /// Early checkpoints asked for because the buffer neared its bound.
    pub early_checkpoint_requests: u64,
    /// Times the VM's output stalled on a full buffer (frames wait, are not dropped).
    pub overflow_stalls: u64,
    /// Announcement frames sent (gratuitous ARP, unsolicited NA, relearn).
    pub announcements_sent: u64,
    /// Dropped frames by reason.
    pub dropped: Drops,
    /// A socket is bound to the vif now (false while the interface does not exist).
    #[serde(default)]
    pub vif_bound: bool,
    /// The interface index the vif socket is bound to (`None` while unbound).
    #[serde(default)]
    pub vif_ifindex: Option<i32>,
    /// Times the vif was bound (1 after a start with the vif present; +1 per reappearance).
    #[serde(default)]
    pub vif_binds: u64,
    /// Times the bound vif disappeared (removed, or replaced under the same name).
    #[serde(default)]
    pub vif_losses: u64,
    /// Redirect state.
    pub redirect: RedirectStatus,
    /// IPv4 addresses learned from the VM's traffic (or given by the agent).
    pub learned_ipv4: Vec<Ipv4Addr>,
    /// IPv6 addresses learned from the VM's traffic (or given by the agent).
    pub learned_ipv6: Vec<Ipv6Addr>,
}

/// What the uplink monitor remembers between polls.
struct Monitor {
    up_polls: u32,
    last_request: Instant,
    last_status: Instant,
    seen_rx: u64,
    seen_tx: u64,
    last_rx: Instant,
    last_tx: Instant,
}

/// After a move (takeover, redirect start or end) the announcement is repeated at these delays.
const ANNOUNCE_REPEATS: [Duration; 2] = [Duration::from_millis(200), Duration::from_secs(1)];

/// How often each relay tells its peer whether its uplink receives.
const STATUS_INTERVAL: Duration = Duration::from_millis(250);

/// The body of one relay thread.
type RelayLoop = fn(&Inner);

/// Called with the current epoch when the buffer nears its bound.
pub type EarlyCheckpointHook = Arc<dyn Fn(u64) + Send + Sync>;

struct State {
    mode: Mode,
    vm_mac: Option<MacAddr>,
    buffer: EpochBuffer,
    tunnel: Option<Arc<dyn TunnelTransport>>,
    early_hook: Option<EarlyCheckpointHook>,
    v4: BTreeSet<Ipv4Addr>,
    v6: BTreeSet<Ipv6Addr>,
    /// When the peer last reported, and whether its uplink was receiving.
    peer_status: Option<(Instant, bool)>,
    /// When to repeat the last announcement (hosts and switches may miss one).
    announce_repeats: Vec<Instant>,
    c: Counters,
}

struct Inner {
    cfg: ShimConfig,
    /// The socket on the vif while the interface exists. Taken (an `Arc` clone) for each
    /// receive or send; replaced by the monitor when the interface comes and goes. Never held
    /// while taking `state`.
    vif: Mutex<Option<Arc<PacketSocket>>>,
    /// Binding the (existing) vif failed at the last try: logged once, until it succeeds.
    vif_open_failed: AtomicBool,
    uplink: PacketSocket,
    state: Mutex<State>,
    space: Condvar,
    stop: AtomicBool,
}

/// A running relay for one VM. Dropping it stops its threads (the sockets close, the
/// interfaces leave promiscuous mode).
pub struct Shim {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Shim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shim")
            .field("vif", &self.inner.cfg.vif)
            .field("uplink", &self.inner.cfg.uplink)
            .finish_non_exhaustive()
    }
}

impl State {
    fn learn(&mut self, frame: &[u8]) {
        let Some(mac) = self.vm_mac else { return };
        for l in frame::learn(frame, mac) {
            match l {
                Learned::V4(ip) if self.v4.len() < MAX_LEARNED => {
                    self.v4.insert(ip);
                }
                Learned::V6(ip) if self.v6.len() < MAX_LEARNED => {
                    self.v6.insert(ip);
                }
                _ => {}
            }
        }
    }
}

/// Counts a refused frame under its reason.
fn count_refused(d: &mut Drops, e: FrameError) {
    match e {
        FrameError::Runt => d.runt += 1,
        FrameError::Oversize => d.oversize += 1,
        FrameError::BadOffload => d.bad_offload += 1,
    }
}

/// Bytes of a packet on the wire (without its `virtio_net_hdr`).
fn wire_len(packet: &[u8]) -> u64 {
    packet.len().saturating_sub(frame::VNET_HDR_LEN) as u64
}

/// Opens a relay socket (offload headers, receive timeout) on `ifname`.
fn open_relay_socket(role: &'static str, ifname: &str) -> Result<PacketSocket, ShimError> {
    let err = |source| ShimError::Open {
        role,
        ifname: ifname.to_string(),
        source,
    };
    let s = PacketSocket::open_vnet(ifname).map_err(err)?;
    s.set_recv_timeout(RECV_TIMEOUT).map_err(err)?;
    Ok(s)
}

/// The index of the interface called `ifname` in the calling thread's network namespace, if
/// one exists.
fn current_ifindex(ifname: &str) -> Option<i32> {
    nix::net::if_::if_nametoindex(ifname)
        .ok()
        .and_then(|i| i32::try_from(i).ok())
}

/// An error of a socket whose interface may have gone (removed, or its domain destroyed).
fn interface_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENXIO | libc::ENETDOWN | libc::ENODEV)
    )
}

impl Inner {
    /// The vif socket, while the interface exists.
    fn vif_socket(&self) -> Option<Arc<PacketSocket>> {
        self.vif
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Compares the vif socket with the interface that has the vif's name now: drops a socket
    /// whose interface is gone or was replaced (new ifindex), and binds one when the interface
    /// exists and none is bound. Called by the monitor at each poll, and by the forwarding
    /// threads when the vif socket fails; never with the state lock held.
    fn check_vif(&self) {
        let now = current_ifindex(&self.cfg.vif);
        let mut slot = self
            .vif
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut lost = None;
        if let Some(s) = slot.as_ref() {
            if now != Some(s.ifindex()) {
                lost = Some(s.ifindex());
                *slot = None;
            }
        }
        let mut bound = None;
        let mut open_error = None;
        if slot.is_none() && now.is_some() {
            match open_relay_socket("vif", &self.cfg.vif) {
                Ok(s) => {
                    bound = Some(s.ifindex());
                    *slot = Some(Arc::new(s));
                }
                Err(e) => open_error = Some(e),
            }
        }
        drop(slot);
        if let Some(old) = lost {
            tracing::warn!(vif = %self.cfg.vif, ifindex = old, "vif gone: frames for the VM are dropped until it is back");
        }
        if let Some(e) = open_error {
            // Retried at the next poll (the interface may be half set up, or just removed).
            if !self.vif_open_failed.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot bind the vif yet");
            }
        }
        if let Some(index) = bound {
            self.vif_open_failed.store(false, Ordering::Relaxed);
            tracing::info!(vif = %self.cfg.vif, ifindex = index, "vif bound");
        }
        if lost.is_some() || bound.is_some() {
            let mut st = self.lock();
            if lost.is_some() {
                st.c.vif_losses += 1;
            }
            if bound.is_some() {
                st.c.vif_binds += 1;
            }
            st.c.vif_bound = bound.is_some();
            st.c.vif_ifindex = bound;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters inconsistent in a way that
        // matters more than stopping the relay would; keep going with the inner value.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends VM frames towards the network, in order: local uplink, or the tunnel while
    /// redirecting.
    fn egress(&self, st: &mut State, frames: &[&[u8]]) {
        if frames.is_empty() {
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

    fn release(&self, st: &mut State, frames: &[Bytes]) -> usize {
        st.c.released_frames += frames.len() as u64;
        st.c.released_bytes += frames.iter().map(|f| wire_len(f)).sum::<u64>();
        for chunk in frames.chunks(BATCH) {
            let refs: Vec<&[u8]> = chunk.iter().map(|f| &f[..]).collect();
            self.egress(st, &refs);
        }
        frames.len()
    }

    /// Gratuitous ARP per IPv4 address, unsolicited NA per IPv6 address, and one relearn
    /// frame, all from the VM's MAC, on the local uplink.
    fn announce(&self, st: &mut State) -> usize {
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
    fn announce_and_repeat(&self, st: &mut State) -> usize {
        let now = Instant::now();
        st.announce_repeats = ANNOUNCE_REPEATS.iter().map(|d| now + *d).collect();
        self.announce(st)
    }

    fn enter_realtime(&self) {
        if let Some(p) = self.cfg.realtime_priority {
            if let Err(e) = sys::set_realtime_priority(p) {
                tracing::warn!(error = %e, priority = p, "cannot run the relay thread real-time");
            }
        }
    }

    fn vm_rx_loop(&self) {
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

    fn uplink_rx_loop(&self) {
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
            if st.c.redirect.serving_peer {
                if let Some(t) = st.tunnel.clone() {
                    match t.send(TunnelMsg::ToVm(mac, Bytes::copy_from_slice(data)).encode()) {
                        Ok(()) => st.c.tunnel_out_frames += 1,
                        Err(_) => st.c.dropped.send_failed += 1,
                    }
                }
            }
        }
        st.mode != Mode::Standby
    }

    fn monitor_loop(&self) {
        // It takes the state lock too: at a lower priority it could be preempted while holding
        // it and stall the real-time forwarding threads (priority inversion).
        self.enter_realtime();
        let mut m = Monitor {
            up_polls: 0,
            last_request: Instant::now(),
            last_status: Instant::now(),
            seen_rx: 0,
            seen_tx: 0,
            last_rx: Instant::now(),
            last_tx: Instant::now(),
        };
        while !self.stop.load(Ordering::Relaxed) {
            self.check_vif();
            let up = self.uplink.link_up().unwrap_or(false);
            let mut st = self.lock();
            self.monitor_step(&mut st, &mut m, up);
            drop(st);
            std::thread::sleep(self.cfg.monitor_interval);
        }
    }

    fn send_tunnel(st: &mut State, msg: &TunnelMsg) -> bool {
        let Some(t) = st.tunnel.clone() else {
            return false;
        };
        let ok = t.send(msg.encode()).is_ok();
        if !ok {
            st.c.dropped.send_failed += 1;
        }
        ok
    }

    /// One poll of the uplink: carrier, signs of life, peer status; starts or ends redirects.
    fn monitor_step(&self, st: &mut State, m: &mut Monitor, up: bool) {
        let now = Instant::now();
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
        st.c.redirect.uplink_up = up;
        m.up_polls = if up { m.up_polls.saturating_add(1) } else { 0 };
        if st.c.from_uplink_frames != m.seen_rx {
            m.seen_rx = st.c.from_uplink_frames;
            m.last_rx = now;
        }
        if st.c.to_uplink_frames != m.seen_tx {
            m.seen_tx = st.c.to_uplink_frames;
            m.last_tx = now;
        }
        let silence = self.cfg.silence_timeout;
        let receiving = silence.is_none_or(|t| m.last_rx.elapsed() < t);
        let Some(mac) = st.vm_mac else { return };
        if st.tunnel.is_some() && now.duration_since(m.last_status) >= STATUS_INTERVAL {
            m.last_status = now;
            Self::send_tunnel(st, &TunnelMsg::UplinkStatus(mac, up && receiving));
        }
        let peer_alive = st
            .peer_status
            .is_some_and(|(at, alive)| alive && at.elapsed() < STATUS_INTERVAL * 4);
        st.c.redirect.peer_uplink_alive = peer_alive;
        let active = st.mode != Mode::Standby;
        let silent = silence.is_some_and(|t| {
            up && m.last_rx.elapsed() >= t && m.last_tx.elapsed() < t && peer_alive
        });
        let forced = st.c.redirect.forced;
        if !st.c.redirect.redirecting {
            let reason = if let Some(on) = forced {
                on.then_some(RedirectReason::Forced)
            } else if !up {
                Some(RedirectReason::Carrier)
            } else if silent {
                Some(RedirectReason::Silence)
            } else {
                None
            };
            if let (Some(reason), true) = (reason, active) {
                if Self::send_tunnel(st, &TunnelMsg::RedirectStart(mac)) {
                    tracing::warn!(uplink = %self.cfg.uplink, ?reason, "uplink failed: redirecting the VM's frames to the peer");
                    st.c.redirect.redirecting = true;
                    st.c.redirect.reason = Some(reason);
                    st.announce_repeats.clear();
                    st.c.redirect.redirects_started += 1;
                    m.last_request = now;
                }
            }
            return;
        }
        // Redirecting: is the local path back?
        let back = match (forced, st.c.redirect.reason) {
            (Some(on), _) => !on,
            // The override was lifted: back, and judged again from the next poll.
            (None, Some(RedirectReason::Forced)) => true,
            // Carrier for two polls in a row.
            (None, Some(RedirectReason::Carrier) | None) => m.up_polls >= 2,
            // Carrier, and frames arriving again.
            (None, Some(RedirectReason::Silence)) => {
                up && m.last_rx.elapsed() < self.cfg.monitor_interval * 2
            }
        };
        if back {
            tracing::info!(uplink = %self.cfg.uplink, "uplink back: traffic returns to the local path");
            st.c.redirect.redirecting = false;
            st.c.redirect.reason = None;
            Self::send_tunnel(st, &TunnelMsg::RedirectStop(mac));
            // Switches learnt the MAC on the peer's port during the redirect.
            self.announce_and_repeat(st);
            // Give the local path a full silence period before judging it again.
            m.last_rx = now;
        } else if now.duration_since(m.last_request) >= REDIRECT_REPEAT {
            // Repeat the request: a peer that restarted lost it with the link's session.
            if Self::send_tunnel(st, &TunnelMsg::RedirectStart(mac)) {
                m.last_request = now;
            }
        }
    }

    fn on_tunnel(&self, msg: &Bytes) {
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

impl Shim {
    /// Opens both interfaces (in the calling thread's network namespace) and starts relaying.
    ///
    /// # Errors
    /// [`ShimError::Open`] when an interface cannot be opened, [`ShimError::Config`] for an
    /// unusable MTU or a group MAC, [`ShimError::Thread`] when a thread cannot start.
    pub fn start(cfg: ShimConfig) -> Result<Shim, ShimError> {
        if !(68..=65_535).contains(&cfg.mtu) {
            return Err(ShimError::Config(format!(
                "MTU {} outside 68..=65535",
                cfg.mtu
            )));
        }
        if cfg.vm_mac.is_some_and(|m| m.is_group()) {
            return Err(ShimError::Config("the VM's MAC is a group address".into()));
        }
        if cfg.vif == cfg.uplink {
            return Err(ShimError::Config(
                "vif and uplink are the same interface".into(),
            ));
        }
        if cfg.vif.is_empty() || cfg.vif.len() >= libc::IFNAMSIZ || cfg.vif.contains('\0') {
            return Err(ShimError::Config(format!(
                "vif name {:?} must be 1..=15 bytes without NUL",
                cfg.vif
            )));
        }
        // The vif may not exist yet (the domain is started later, on a secondary after the
        // takeover): the monitor binds it when it appears.
        let vif = match open_relay_socket("vif", &cfg.vif) {
            Ok(s) => Some(Arc::new(s)),
            Err(ShimError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                tracing::info!(vif = %cfg.vif, "vif does not exist yet: waiting for it");
                None
            }
            Err(e) => return Err(e),
        };
        let vif_ifindex = vif.as_ref().map(|s| s.ifindex());
        let uplink = open_relay_socket("uplink", &cfg.uplink)?;
        let uplink_up = uplink.link_up().unwrap_or(false);
        let buffer = EpochBuffer::new(cfg.buffer_limit);
        let c = Counters {
            mode: cfg.mode,
            vm_mac: cfg.vm_mac.map(|m| m.to_string()),
            epoch: 0,
            committed_epoch: 0,
            from_vm_frames: 0,
            from_vm_bytes: 0,
            held_frames_total: 0,
            held_bytes_total: 0,
            held_frames_now: 0,
            held_bytes_now: 0,
            buffer_limit_bytes: buffer.limit() as u64,
            released_frames: 0,
            released_bytes: 0,
            to_uplink_frames: 0,
            to_uplink_bytes: 0,
            from_uplink_frames: 0,
            to_vm_frames: 0,
            to_vm_bytes: 0,
            tunnel_out_frames: 0,
            tunnel_in_frames: 0,
            early_checkpoint_requests: 0,
            overflow_stalls: 0,
            announcements_sent: 0,
            dropped: Drops::default(),
            vif_bound: vif_ifindex.is_some(),
            vif_ifindex,
            vif_binds: u64::from(vif_ifindex.is_some()),
            vif_losses: 0,
            redirect: RedirectStatus {
                uplink_up,
                ..RedirectStatus::default()
            },
            learned_ipv4: Vec::new(),
            learned_ipv6: Vec::new(),
        };
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                mode: cfg.mode,
                vm_mac: cfg.vm_mac,
                buffer,
                tunnel: None,
                early_hook: None,
                v4: BTreeSet::new(),
                v6: BTreeSet::new(),
                peer_status: None,
                announce_repeats: Vec::new(),
                c,
            }),
            cfg,
            vif: Mutex::new(vif),
            vif_open_failed: AtomicBool::new(false),
            uplink,
            space: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut shim = Shim {
            inner,
            threads: Vec::new(),
        };
        let loops: [(&str, RelayLoop); 3] = [
            ("vm-rx", Inner::vm_rx_loop),
            ("uplink-rx", Inner::uplink_rx_loop),
            ("monitor", Inner::monitor_loop),
        ];
        for (name, f) in loops {
            let inner = Arc::clone(&shim.inner);
            let h = std::thread::Builder::new()
                .name(format!("netback-{name}"))
                .spawn(move || f(&inner))
                .map_err(ShimError::Thread)?;
            shim.threads.push(h);
        }
        tracing::info!(vif = %shim.inner.cfg.vif, uplink = %shim.inner.cfg.uplink, mode = ?shim.inner.cfg.mode, "netback relay started");
        Ok(shim)
    }

    /// Starts epoch `n` (buffered mode): frames from now on belong to it.
    ///
    /// # Errors
    /// [`ShimError::WrongMode`] outside buffered mode; [`ShimError::Epoch`] when `n` does not
    /// increase.
    pub fn begin_epoch(&self, n: u64) -> Result<(), ShimError> {
        let mut st = self.inner.lock();
        if st.mode != Mode::Buffered {
            return Err(ShimError::WrongMode {
                op: "begin_epoch",
                mode: st.mode,
            });
        }
        st.buffer.begin_epoch(n)?;
        Ok(())
    }

    /// Epoch `n` is committed on the secondary: releases every frame of epochs ≤ `n`, in
    /// order. Returns how many frames left.
    ///
    /// # Errors
    /// [`ShimError::WrongMode`] outside buffered mode; [`ShimError::Epoch`] when `n` has not
    /// begun.
    pub fn commit(&self, n: u64) -> Result<usize, ShimError> {
        let mut st = self.inner.lock();
        if st.mode != Mode::Buffered {
            return Err(ShimError::WrongMode {
                op: "commit",
                mode: st.mode,
            });
        }
        let frames = st.buffer.commit(n)?;
        let released = self.inner.release(&mut st, &frames);
        drop(st);
        self.inner.space.notify_all();
        Ok(released)
    }

    /// Drops every held frame (their epochs will never commit). Returns how many.
    pub fn discard(&self) -> usize {
        let mut st = self.inner.lock();
        let (frames, _) = st.buffer.discard();
        st.c.dropped.discarded += frames as u64;
        drop(st);
        self.inner.space.notify_all();
        frames
    }

    /// Switches mode. Leaving buffered mode for pass-through releases what is held, in order;
    /// going to standby discards it.
    pub fn set_mode(&self, mode: Mode) {
        let mut st = self.inner.lock();
        if st.mode == Mode::Buffered && mode != Mode::Buffered {
            if mode == Mode::Passthrough {
                let frames = st.buffer.drain_all();
                self.inner.release(&mut st, &frames);
            } else {
                let (frames, _) = st.buffer.discard();
                st.c.dropped.discarded += frames as u64;
            }
        }
        st.mode = mode;
        drop(st);
        self.inner.space.notify_all();
    }

    /// Takes over the VM's network presence (the secondary, after the primary failed): stops
    /// carrying frames for the old primary, drops anything held, switches to `mode` and
    /// announces the MAC and every known address. Returns the number of announcement frames.
    pub fn takeover(&self, mode: Mode) -> usize {
        let mut st = self.inner.lock();
        let (frames, _) = st.buffer.discard();
        st.c.dropped.discarded += frames as u64;
        st.c.redirect.serving_peer = false;
        st.mode = mode;
        let sent = self.inner.announce_and_repeat(&mut st);
        drop(st);
        self.inner.space.notify_all();
        tracing::warn!(announcements = sent, "took over the VM's network presence");
        sent
    }

    /// Sends the announcement frames again (the agent repeats them a few times after a
    /// takeover, as hosts may miss one).
    pub fn announce(&self) -> usize {
        let mut st = self.inner.lock();
        self.inner.announce(&mut st)
    }

    /// Adds addresses the VM owns (the agent replicates the primary's learned addresses to the
    /// secondary). At most 32 per family are kept.
    pub fn add_addresses(&self, addrs: &[IpAddr]) {
        let mut st = self.inner.lock();
        for a in addrs {
            match a {
                IpAddr::V4(ip) if st.v4.len() < MAX_LEARNED => {
                    st.v4.insert(*ip);
                }
                IpAddr::V6(ip) if st.v6.len() < MAX_LEARNED => {
                    st.v6.insert(*ip);
                }
                _ => {}
            }
        }
    }

    /// The addresses learned so far.
    #[must_use]
    pub fn learned_addresses(&self) -> Vec<IpAddr> {
        let st = self.inner.lock();
        st.v4
            .iter()
            .map(|a| IpAddr::V4(*a))
            .chain(st.v6.iter().map(|a| IpAddr::V6(*a)))
            .collect()
    }

    /// Overrides the redirect decision: `Some(true)` sends the VM's frames to the peer (the
    /// agent knows the uplink is bad), `Some(false)` keeps them local, `None` returns to the
    /// relay's own detection. Takes effect at the next uplink poll; a redirect still needs a
    /// tunnel.
    pub fn set_redirect(&self, forced: Option<bool>) {
        self.inner.lock().c.redirect.forced = forced;
    }

    /// Sets the transport to the peer's shim for this VM (enables the uplink redirect).
    pub fn set_tunnel(&self, tunnel: Arc<dyn TunnelTransport>) {
        self.inner.lock().tunnel = Some(tunnel);
    }

    /// Sets the callback asked for an early checkpoint when the buffer nears its bound. It is
    /// called from the relay thread with the current epoch; it must not block.
    pub fn set_early_checkpoint_hook(&self, hook: EarlyCheckpointHook) {
        self.inner.lock().early_hook = Some(hook);
    }

    /// Hands the relay one message received from the peer's shim. Garbage is counted and
    /// dropped.
    pub fn on_tunnel_message(&self, msg: &Bytes) {
        self.inner.on_tunnel(msg);
    }

    /// The real-time priority of the relay threads, if any. Threads that call into the shim
    /// often (the agent's control connection) should run at it too, or a preempted caller
    /// holding the state lock stalls forwarding.
    #[must_use]
    pub fn realtime_priority(&self) -> Option<u8> {
        self.inner.cfg.realtime_priority
    }

    /// A snapshot of the counters.
    #[must_use]
    pub fn counters(&self) -> Counters {
        let st = self.inner.lock();
        let mut c = st.c.clone();
        c.mode = st.mode;
        c.vm_mac = st.vm_mac.map(|m| m.to_string());
        c.epoch = st.buffer.current_epoch();
        c.committed_epoch = st.buffer.committed_epoch();
        c.held_frames_now = st.buffer.held_frames() as u64;
        c.held_bytes_now = st.buffer.held_bytes() as u64;
        c.learned_ipv4 = st.v4.iter().copied().collect();
        c.learned_ipv6 = st.v6.iter().copied().collect();
        c
    }

    /// Stops the relay threads and closes the sockets.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        self.inner.space.notify_all();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.shutdown();
    }
}
