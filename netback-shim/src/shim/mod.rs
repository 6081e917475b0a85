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
//!
//! Where each part lives:
//! - this file: [`Shim`], its configuration and errors, the shared state and the control API;
//! - `forward`: the two forwarding threads (VM → network, network → VM);
//! - `vif`: binding the vif socket as the interface comes and goes;
//! - `monitor`: the monitor thread, which carries out the decisions of `uplink`, the pure
//!   uplink state machine (when the uplink is lost, when to redirect, when it is back);
//! - `peer`: the messages exchanged with the peer's shim over the tunnel;
//! - `announce`: the announcement frames (gratuitous ARP, unsolicited NA, relearn) and their
//!   repeats;
//! - `counters`: the [`Counters`] the agent reads, and what counts as what.

mod announce;
mod counters;
mod forward;
mod monitor;
mod peer;
mod uplink;
mod vif;

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::epoch::{EpochBuffer, EpochError, DEFAULT_LIMIT_BYTES};
use crate::frame::{self, Learned, MacAddr};
use crate::sys::{self, PacketSocket};
use crate::tunnel::TunnelTransport;
pub use counters::{Counters, Drops, RedirectReason, RedirectStatus};

/// At most this many addresses of each family are remembered per VM.
const MAX_LEARNED: usize = 32;
/// How long blocking receives wait before checking for shutdown.
const RECV_TIMEOUT: Duration = Duration::from_millis(100);
/// Receive slot: a `virtio_net_hdr` and the largest GSO super-frame, plus one byte so that
/// anything larger shows as truncated.
const SLOT_LEN: usize = frame::VNET_HDR_LEN + frame::MAX_GSO_FRAME + 1;
/// Frames taken per receive call (and sent per send call).
const BATCH: usize = 32;

pub use xenft_control::netback::Mode;

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

/// The body of one relay thread.
type RelayLoop = fn(&Inner);

/// Called with the current epoch when the buffer nears its bound.
pub type EarlyCheckpointHook = Arc<dyn Fn(u64) + Send + Sync>;

struct State {
    mode: Mode,
    /// The copy is fenced: no frame passes in either direction (see [`Shim::set_isolated`]).
    isolated: bool,
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

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters inconsistent in a way that
        // matters more than stopping the relay would; keep going with the inner value.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn enter_realtime(&self) {
        if let Some(p) = self.cfg.realtime_priority {
            if let Err(e) = sys::set_realtime_priority(p) {
                tracing::warn!(error = %e, priority = p, "cannot run the relay thread real-time");
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
        let c = counters::at_start(&cfg, buffer.limit() as u64, vif_ifindex, uplink_up);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                mode: cfg.mode,
                isolated: false,
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

    /// Isolates the VM's copy (`true`, a fence) or lets it through again (`false`, unfence).
    /// While isolated no frame passes in either direction, whatever the VM does: nothing from
    /// the VM leaves (pass-through, released epochs, the redirect tunnel), nothing reaches it
    /// (uplink, tunnel), no announcement is sent, and the peer's traffic is not carried. The
    /// mode, the learned addresses and the frames held for uncommitted epochs are kept, so an
    /// unfence resumes exactly where the fence stopped; an epoch committed while isolated is
    /// dropped (counted as `isolated`). A [`Shim::takeover`] ends the isolation.
    pub fn set_isolated(&self, on: bool) {
        let mut st = self.inner.lock();
        if st.isolated != on {
            tracing::warn!(isolated = on, "relay isolation changed (fence / unfence)");
        }
        st.isolated = on;
        if on {
            st.announce_repeats.clear();
        }
    }

    /// Takes over the VM's network presence (the secondary, after the primary failed): stops
    /// carrying frames for the old primary, drops anything held, switches to `mode` and
    /// announces the MAC and every known address. Returns the number of announcement frames.
    /// The agent decided this copy owns the VM: an isolation from an earlier fence ends.
    pub fn takeover(&self, mode: Mode) -> usize {
        let mut st = self.inner.lock();
        st.isolated = false;
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

    /// The uplink interface's name.
    #[must_use]
    pub fn uplink_name(&self) -> &str {
        &self.inner.cfg.uplink
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
        c.isolated = st.isolated;
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
