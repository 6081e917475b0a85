//! Every parser of untrusted bytes (tunnel messages from the peer, frames from the VM or the
//! network) on arbitrary input: no panic, and the documented bounds hold. Unprivileged.

use bytes::Bytes;
use proptest::prelude::*;
use xenft_netback::frame::{self, MacAddr};
use xenft_netback::tunnel::TunnelMsg;

const VM: MacAddr = MacAddr([2, 0, 0, 0, 0, 5]);

proptest! {
    #[test]
    fn tunnel_decode_accepts_only_what_encode_produces(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let msg = Bytes::from(data);
        if let Ok(m) = TunnelMsg::decode(&msg) {
            prop_assert_eq!(m.encode(), msg);
        }
    }

    #[test]
    fn learning_from_arbitrary_frames_never_panics_and_learns_only_usable_addresses(
        mut data in proptest::collection::vec(any::<u8>(), 0..120),
        ethertype in prop_oneof![Just(0x0806u16), Just(0x0800u16), Just(0x86DDu16), any::<u16>()],
    ) {
        if data.len() >= 14 {
            data[6..12].copy_from_slice(&VM.0);
            data[12..14].copy_from_slice(&ethertype.to_be_bytes());
        }
        for l in frame::learn(&data, VM) {
            match l {
                frame::Learned::V4(ip) => prop_assert!(!ip.is_unspecified() && !ip.is_multicast() && !ip.is_broadcast()),
                frame::Learned::V6(ip) => prop_assert!(!ip.is_unspecified() && !ip.is_multicast()),
            }
        }
    }

    #[test]
    fn length_check_bounds_every_frame(len in 0usize..70_000, mtu in 68usize..9_000) {
        let max = frame::max_frame_len(mtu);
        match frame::check_len(len, max) {
            Ok(()) => prop_assert!((14..=max).contains(&len)),
            Err(frame::FrameError::Runt) => prop_assert!(len < 14),
            Err(frame::FrameError::Oversize) => prop_assert!(len > max),
            Err(frame::FrameError::BadOffload) => prop_assert!(false, "no offload header here"),
        }
    }

    #[test]
    fn packet_check_never_panics_and_bounds_what_it_accepts(
        data in proptest::collection::vec(any::<u8>(), 0..2000),
        extra in 0usize..3,
        mtu in 68usize..1500,
    ) {
        let len = data.len() + extra; // a real length beyond the capture means truncation
        if let Ok(frame) = frame::check_packet(&data, len, mtu) {
            prop_assert_eq!(extra, 0);
            prop_assert!(frame.len() >= 14 && frame.len() <= frame::MAX_GSO_FRAME);
            let hdr = frame::VnetHdr::parse(&data).unwrap();
            if hdr.gso_type == 0 {
                prop_assert!(frame.len() <= frame::max_frame_len(mtu));
            } else {
                prop_assert!(usize::from(hdr.gso_size) <= mtu && hdr.gso_size > 0);
            }
        }
    }
}
