//! The relay's counters, as the agent reads them (JSON on the control socket), and what
//! counts as what.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::{Mode, ShimConfig};
use crate::frame::{self, FrameError};

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
    /// The agent asked for it ([`Shim::set_redirect`](super::Shim::set_redirect)).
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

impl Counters {
    /// The counters of a relay just started with `cfg`, an epoch buffer bounded at
    /// `buffer_limit_bytes`, the vif bound at `vif_ifindex` (if it exists) and the uplink's
    /// carrier as polled.
    pub(super) fn at_start(
        cfg: &ShimConfig,
        buffer_limit_bytes: u64,
        vif_ifindex: Option<i32>,
        uplink_up: bool,
    ) -> Self {
        Counters {
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
            buffer_limit_bytes,
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
        }
    }
}

/// Counts a refused frame under its reason.
pub(super) fn count_refused(d: &mut Drops, e: FrameError) {
    match e {
        FrameError::Runt => d.runt += 1,
        FrameError::Oversize => d.oversize += 1,
        FrameError::BadOffload => d.bad_offload += 1,
    }
}

/// Bytes of a packet on the wire (without its `virtio_net_hdr`).
pub(super) fn wire_len(packet: &[u8]) -> u64 {
    packet.len().saturating_sub(frame::VNET_HDR_LEN) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_started_with_its_vif_present_counts_one_bind() {
        let cfg = ShimConfig::new("vif1.0", "eth0");
        let c = Counters::at_start(&cfg, 1024, Some(7), true);
        assert_eq!(
            (c.vif_bound, c.vif_ifindex, c.vif_binds),
            (true, Some(7), 1)
        );
        assert!(c.redirect.uplink_up && !c.redirect.redirecting);
        let c = Counters::at_start(&cfg, 1024, None, false);
        assert_eq!((c.vif_bound, c.vif_ifindex, c.vif_binds), (false, None, 0));
        assert_eq!(c.buffer_limit_bytes, 1024);
    }

    #[test]
    fn refused_frames_are_counted_under_their_reason() {
        let mut d = Drops::default();
        count_refused(&mut d, FrameError::Runt);
        count_refused(&mut d, FrameError::Oversize);
        count_refused(&mut d, FrameError::Oversize);
        count_refused(&mut d, FrameError::BadOffload);
        assert_eq!((d.runt, d.oversize, d.bad_offload), (1, 2, 1));
    }

    #[test]
    fn wire_length_leaves_out_the_offload_header() {
        assert_eq!(wire_len(&[0; frame::VNET_HDR_LEN + 60]), 60);
        assert_eq!(wire_len(&[0; 3]), 0);
    }
}
