//! # xenft-netback: the userspace packet relay
//!
//! Sits between a protected VM's vif and the uplink. Holds the VM's output per checkpoint
//! epoch until the epoch commits (level 3 output commit), announces a takeover with the same
//! MAC and IP (gratuitous ARP, unsolicited NA, a relearn frame for switches), and tunnels the
//! VM's frames to the peer host's shim when the local uplink fails (level 2 redirect).
//!
//! Data path: VM → vif → **this crate** → uplink (or tunnel → peer's shim → its uplink).
//!
//! What it is not: not a bridge or a switch (one VM's frames only), and it decides no
//! failover: it redirects its own uplink and reports it; the agent decides the rest.
//! Inbound: uplink → **this crate** (frames for the VM's MAC or group addresses) → vif.
//!
//! ## Main types
//! - [`Shim`]: the running relay for one VM, with the control API the agent drives
//!   ([`Shim::begin_epoch`], [`Shim::commit`], [`Shim::discard`], [`Shim::set_mode`],
//!   [`Shim::takeover`]) and its [`Counters`];
//! - [`epoch::EpochBuffer`]: the bounded per-epoch output buffer (pure logic);
//! - [`tunnel::TunnelMsg`] / [`tunnel::TunnelTransport`]: the peer tunnel used by the redirect,
//!   carried over the A-link's `Channel::Net` by [`alink_tunnel`] (in memory in unit tests);
//! - [`control`]: the control socket of the `xenft-netback` binary (the typed contract
//!   `xenft_control::netback`), and [`control::CounterWatch`], which turns counter changes
//!   into pushed events (uplink lost / restored / redirected, vif bound / lost);
//! - [`frame`]: frame validation, address learning, announcement frames.
//!
//! The relay itself lives in `shim/`, one file per part:
//! - `shim/mod.rs`: [`Shim`], [`ShimConfig`], [`Mode`], the shared state and the control API;
//! - `shim/forward.rs`: the two forwarding threads (VM → network, network → VM);
//! - `shim/vif.rs`: binding the vif as the interface comes and goes;
//! - `shim/uplink.rs`: the uplink state machine (lost, redirect, restored), pure and unit-tested;
//! - `shim/monitor.rs`: the monitor thread that polls the uplink and carries out its decisions;
//! - `shim/peer.rs`: the messages exchanged with the peer's shim over the tunnel;
//! - `shim/announce.rs`: the announcement frames after a move, and their repeats;
//! - `shim/counters.rs`: [`Counters`], [`Drops`], [`RedirectStatus`].
//!
//! ## Epochs, as the checkpoint engine numbers them
//! The engine's `checkpoint(N)` (VM paused; output so far belongs to checkpoint N) maps to
//! [`Shim::begin_epoch`]`(N + 1)`, and its `commit(N)` to [`Shim::commit`]`(N)`; the agent calls
//! `begin_epoch(1)` when it switches the relay to [`Mode::Buffered`]. On failover the secondary
//! calls [`Shim::takeover`]; the agent's redirect decision maps to [`Shim::set_redirect`].
//!
//! ## Why AF_PACKET and not TAP
//! On a Xen host the vif already exists: kernel netback creates it and the toolstack's hotplug
//! script attaches it. A TAP design would need a second device per VM and a kernel bridge or
//! copy between vif and TAP anyway; an AF_PACKET socket bound to the vif itself sees exactly the
//! frames the VM sends, and one bound to the uplink sees the network, with no extra device and
//! no change to netback. `PACKET_IGNORE_OUTGOING` keeps the relay from reading back its own
//! transmissions, and promiscuous membership lets the uplink socket see frames for the VM's MAC.
//! The vif must NOT also be a port of a kernel bridge (the relay is its only path).
//!
//! Both sockets use `PACKET_VNET_HDR`: each frame comes with a `virtio_net_hdr` that says
//! whether its checksum is still to be filled in and whether it is a GSO super-frame (up to
//! 64 KiB, cut into MTU-sized segments on transmit). Without it a packet socket hands over
//! offloaded frames half-finished (wrong checksums on the wire, super-frames that look
//! oversize). The relay checks the header (segment size within the MTU, offsets within the
//! frame, a known GSO type), forwards header and frame together, and the kernel of the host
//! that transmits completes the frame. Offloads can stay on, on the vif and on the uplink;
//! plain frames above MTU + 18 bytes are refused and counted as `oversize`.
//!
//! ## The vif comes and goes
//! The vif exists only while the domain runs: `vif<domid>.<n>`, or a fixed name given with
//! `vifname=` in the xl config (which the relay's `--vif` then names). The relay does not need
//! it to start: on a secondary host it runs, and answers `takeover`, before the domain is
//! started there. Its monitor polls `if_nametoindex` every 50 ms and binds the vif as soon as
//! the interface appears; when it disappears (name gone, or a new ifindex after a domain
//! restart) the socket is dropped and the relay waits for the next one. Meanwhile frames for
//! the VM are dropped and counted as `dropped.vif_absent`; the uplink side, announcements and
//! the redirect are unaffected. [`Counters`] say `vif_bound`, `vif_ifindex`, `vif_binds` and
//! `vif_losses`.
//!
//! ## Uplink failure and redirect
//! The relay polls the uplink every 50 ms through its own socket (`SIOCGIFFLAGS`: up and
//! running), which answers for the socket's network namespace — `/sys/class/net` would show
//! the namespace sysfs was mounted in. The uplink has failed when it loses carrier, or when it
//! keeps carrier but received nothing for [`ShimConfig::silence_timeout`] while the VM's frames
//! went out and the peer reports (every 250 ms, on the tunnel) that its own uplink receives.
//! The VM's frames then go to the peer's shim, which announces the MAC on its uplink and sends
//! back every frame for the MAC. The redirect ends when carrier is back (two polls) or, for a
//! silent uplink, when frames arrive again; the relay then announces the MAC locally.
//!
//! ## Scheduling
//! On a busy host a relay thread woken by a frame can wait milliseconds for a CPU. With
//! [`ShimConfig::realtime_priority`] the forwarding, monitor, tunnel and control threads run
//! under `SCHED_FIFO` (they only ever block or do bounded work per frame, and the kernel's
//! real-time throttling still applies). Without it everything works, with a longer latency tail.
//!
//! Two forwarding threads, one per direction, on purpose. One thread serving both directions
//! run to completion (a batch each way, `poll` only when both sockets are empty) was tried:
//! it cut the context switches 3x and the relay's CPU per GB by a quarter, but moved less:
//! interleaved with the two-thread relay on a 2-core host (6 rounds, iperf3 4 s each) it gave
//! median 7.6 against 8.4 Gbit/s, with hundreds of spurious retransmissions (DSACK, reordering)
//! per run against tens. It serialises the copies and the receivers' softirq work (the client's
//! TCP receive runs in the relay's send) that two threads spread over both cores (issue 16).
//!
//! All `unsafe` code lives in [`sys`].

pub mod alink_tunnel;
pub mod control;
pub mod epoch;
pub mod frame;
mod shim;
pub mod sys;
pub mod tunnel;

pub use shim::{
    Counters, Drops, EarlyCheckpointHook, Mode, RedirectReason, RedirectStatus, Shim, ShimConfig,
    ShimError,
};
