//! The relay's counters (the types are the control contract's, `xenft_control::netback`),
//! and what counts as what.

use super::ShimConfig;
use crate::frame::{self, FrameError};

pub use xenft_control::netback::{Counters, Drops, RedirectReason, RedirectStatus};

/// The counters of a relay just started with `cfg`, an epoch buffer bounded at
/// `buffer_limit_bytes`, the vif bound at `vif_ifindex` (if it exists) and the uplink's
/// carrier as polled.
pub(super) fn at_start(
    cfg: &ShimConfig,
    buffer_limit_bytes: u64,
    vif_ifindex: Option<i32>,
    uplink_up: bool,
) -> Counters {
    Counters {
        mode: cfg.mode,
        vm_mac: cfg.vm_mac.map(|m| m.to_string()),
        buffer_limit_bytes,
        vif_bound: vif_ifindex.is_some(),
        vif_ifindex,
        vif_binds: u64::from(vif_ifindex.is_some()),
        redirect: RedirectStatus {
            uplink_up,
            ..RedirectStatus::default()
        },
        ..Counters::default()
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
        let c = at_start(&cfg, 1024, Some(7), true);
        assert_eq!(
            (c.vif_bound, c.vif_ifindex, c.vif_binds),
            (true, Some(7), 1)
        );
        assert!(c.redirect.uplink_up && !c.redirect.redirecting);
        let c = at_start(&cfg, 1024, None, false);
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
