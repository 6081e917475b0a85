//! # xenft-netback: the userspace packet relay
//!
//! Sits between a protected VM's vif and the uplink. Holds the VM's output per checkpoint
//! epoch until the epoch commits (level 3 output commit), announces a takeover with the same
//! MAC and IP (gratuitous ARP, unsolicited NA, a relearn frame for switches), and tunnels the
//! VM's frames to the peer host's shim when the local uplink fails (level 2 redirect).
//!
//! Data path: VM → vif → **this crate** → uplink (or tunnel → peer's shim → its uplink).
//! Inbound: uplink → **this crate** (frames for the VM's MAC or group addresses) → vif.
//!
//! ## Main types
//! - [`Shim`]: the running relay for one VM, with the control API the agent drives
//!   ([`Shim::begin_epoch`], [`Shim::commit`], [`Shim::discard`], [`Shim::set_mode`],
//!   [`Shim::takeover`]) and its [`Counters`];
//! - [`epoch::EpochBuffer`]: the bounded per-epoch output buffer (pure logic);
//! - [`tunnel::TunnelMsg`] / [`tunnel::TunnelTransport`]: the peer tunnel used by the redirect,
//!   carried over the A-link's `Channel::Net` by [`alink_tunnel`] (in memory in unit tests);
//! - [`control`]: the JSON-lines control socket of the `xenft-netback` binary;
//! - [`frame`]: frame validation, address learning, announcement frames.
//!
//! ## Why AF_PACKET and not TAP
//! On a Xen host the vif already exists: kernel netback creates it and the toolstack's hotplug
//! script attaches it. A TAP design would need a second device per VM and a kernel bridge or
//! copy between vif and TAP anyway; an AF_PACKET socket bound to the vif itself sees exactly the
//! frames the VM sends, and one bound to the uplink sees the network, with no extra device and
//! no change to netback. `PACKET_IGNORE_OUTGOING` keeps the relay from reading back its own
//! transmissions, and promiscuous membership lets the uplink socket see frames for the VM's MAC.
//! The vif must NOT also be a port of a kernel bridge (the relay is its only path), and
//! offloads (TSO/GSO, checksum) should be off on the VM side: super-frames above MTU + 18 bytes
//! are refused and counted as `oversize`, never forwarded.
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
    Counters, Drops, EarlyCheckpointHook, Mode, RedirectStatus, Shim, ShimConfig, ShimError,
};
