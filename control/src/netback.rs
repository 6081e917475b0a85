//! `xenft-netback`'s control contract: requests, replies, events and the relay's counters.
//!
//! | request (`op`) | reply (`reply`) |
//! |---|---|
//! | `begin_epoch {epoch}` | `done` |
//! | `commit {epoch}` | `released {released}`: frames released |
//! | `discard` | `discarded {discarded}`: frames dropped |
//! | `set_mode {mode}` (`passthrough` / `buffered` / `standby`) | `done` |
//! | `takeover {mode}` | `announced {announced}`: announcement frames sent |
//! | `announce` | `announced {announced}` |
//! | `redirect {on}` (`true` / `false` / `null` = automatic) | `done` |
//! | `add_addresses {addresses}` | `done` |
//! | `isolate {on}` (fence / unfence: no frame in either direction while on) | `done` |
//! | `counters` | `counters`: [`Counters`] |
//!
//! The methods named are those of `xenft_netback::shim::Shim`. Events: `early_checkpoint`
//! (the output buffer nears its bound), `uplink_lost` / `uplink_restored` (carrier of the
//! local uplink), `uplink_redirected` / `uplink_returned` (the VM's frames leave through the
//! peer, or locally again), `vif_bound` / `vif_lost`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// `Shim::begin_epoch`.
    BeginEpoch {
        /// The epoch.
        epoch: u64,
    },
    /// `Shim::commit`.
    Commit {
        /// The epoch.
        epoch: u64,
    },
    /// `Shim::discard`.
    Discard,
    /// `Shim::set_mode`.
    SetMode {
        /// The new mode.
        mode: Mode,
    },
    /// `Shim::takeover`.
    Takeover {
        /// The mode after the takeover.
        mode: Mode,
    },
    /// `Shim::announce`.
    Announce,
    /// `Shim::set_redirect`.
    Redirect {
        /// `true` redirect, `false` stay local, `null` automatic.
        on: Option<bool>,
    },
    /// `Shim::add_addresses`.
    AddAddresses {
        /// The addresses.
        addresses: Vec<IpAddr>,
    },
    /// `Shim::set_isolated`: a fenced copy passes no frame in either direction (from or to
    /// the VM, on the uplink or the tunnel, announcements included) until `on: false` or a
    /// `takeover`. The mode and anything held for an epoch are kept.
    Isolate {
        /// `true` isolate (fence), `false` let frames through again (unfence).
        on: bool,
    },
    /// `Shim::counters`.
    Counters,
}

/// A reply of `xenft-netback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Done, nothing to report.
    Done,
    /// `commit`.
    Released {
        /// Frames released.
        released: u64,
    },
    /// `discard`.
    Discarded {
        /// Frames dropped.
        discarded: u64,
    },
    /// `takeover`, `announce`.
    Announced {
        /// Announcement frames sent.
        announced: u64,
    },
    /// `counters`.
    Counters {
        /// The relay's counters.
        counters: Box<Counters>,
    },
}

/// An event pushed by `xenft-netback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The output buffer is near its bound: checkpoint early.
    EarlyCheckpoint {
        /// The current epoch.
        epoch: u64,
    },
    /// The local uplink lost its carrier or went down.
    UplinkLost {
        /// The uplink interface.
        uplink: String,
    },
    /// The local uplink is up with carrier again.
    UplinkRestored {
        /// The uplink interface.
        uplink: String,
    },
    /// The VM's frames now leave through the peer's uplink over the A-link.
    UplinkRedirected {
        /// Why.
        reason: RedirectReason,
    },
    /// The VM's frames leave through the local uplink again.
    UplinkReturned,
    /// A socket is bound to the VM's vif (it appeared, or the domain was recreated).
    VifBound {
        /// Its interface index.
        ifindex: i32,
    },
    /// The bound vif disappeared (the domain stopped or is being recreated).
    VifLost,
}

/// What the shim does with the VM's output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Forward at once (unprotected, or level 2 only).
    #[default]
    Passthrough,
    /// Hold per epoch until committed (level 3 output commit).
    Buffered,
    /// The secondary's shim: forward nothing, learn the VM's addresses, carry the peer's
    /// frames when asked (redirect), wait for `Shim::takeover`.
    Standby,
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
    /// Frames from or for the VM while the relay was isolated (a fenced copy).
    #[serde(default)]
    pub isolated: u64,
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
    /// The agent asked for it (`Shim::set_redirect`).
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Current mode.
    pub mode: Mode,
    /// The relay is isolated (the copy is fenced): no frame passes.
    #[serde(default)]
    pub isolated: bool,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_incoming, Incoming};

    fn req(s: &str) -> Request {
        match decode_incoming::<Request>(format!("{{\"v\":1,\"req\":{s}}}").as_bytes()) {
            Ok(Incoming::Request(r)) => r,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn requests_use_the_documented_json_shape() {
        assert_eq!(
            req(r#"{"op":"commit","epoch":7}"#),
            Request::Commit { epoch: 7 }
        );
        assert_eq!(
            req(r#"{"op":"set_mode","mode":"buffered"}"#),
            Request::SetMode {
                mode: Mode::Buffered
            }
        );
        assert!(matches!(
            req(r#"{"op":"add_addresses","addresses":["10.0.0.2","fd00::2"]}"#),
            Request::AddAddresses { addresses } if addresses.len() == 2
        ));
        assert_eq!(
            req(r#"{"op":"redirect","on":null}"#),
            Request::Redirect { on: None }
        );
        assert_eq!(
            req(r#"{"op":"isolate","on":true}"#),
            Request::Isolate { on: true }
        );
    }
}
