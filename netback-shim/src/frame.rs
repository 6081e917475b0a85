//! Ethernet frames: validation, address learning, and the announcement frames sent on takeover.
//!
//! Layouts follow IEEE 802.3 (Ethernet II header), RFC 826 (ARP), RFC 8200 (IPv6 header) and
//! RFC 4861 §4.4 (Neighbor Advertisement). Every parser here reads untrusted bytes: it checks
//! lengths before every access and never panics.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Length of an Ethernet II header: destination, source, EtherType.
pub const ETH_HEADER_LEN: usize = 14;
/// Room for one 802.1Q tag on top of the MTU.
pub const VLAN_TAG_LEN: usize = 4;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86DD;
/// IEEE 802 "local experimental" EtherType, used for the switch-relearn frame.
pub const ETHERTYPE_RELEARN: u16 = 0x88B5;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// True for broadcast and multicast addresses (I/G bit set).
    #[must_use]
    pub fn is_group(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// Reads a MAC from the first six bytes of `b`, if there are six.
    #[must_use]
    pub fn from_slice(b: &[u8]) -> Option<MacAddr> {
        let arr: [u8; 6] = b.get(..6)?.try_into().ok()?;
        Some(MacAddr(arr))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A MAC address string that is not six colon-separated hex bytes.
#[derive(Debug, thiserror::Error)]
#[error("not a MAC address (want xx:xx:xx:xx:xx:xx): {0:?}")]
pub struct MacParseError(String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(|| MacParseError(s.to_string()))?;
            if p.len() != 2 {
                return Err(MacParseError(s.to_string()));
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| MacParseError(s.to_string()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.to_string()));
        }
        Ok(MacAddr(out))
    }
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than an Ethernet header.
    Runt,
    /// Longer than the MTU plus the Ethernet header and one VLAN tag (or, for a GSO
    /// super-frame, segments larger than the MTU or more than 64 KiB in all).
    Oversize,
    /// A `virtio_net_hdr` that describes an impossible offload.
    BadOffload,
}

/// Length of the `virtio_net_hdr` that precedes each frame on the relay's sockets.
pub const VNET_HDR_LEN: usize = 10;
/// Largest GSO super-frame: 64 KiB of IP packet plus the Ethernet header and a VLAN tag.
pub const MAX_GSO_FRAME: usize = 65_535 + ETH_HEADER_LEN + VLAN_TAG_LEN;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const VNET_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_ECN`.
const VNET_GSO_ECN: u8 = 0x80;

/// The `virtio_net_hdr` (virtio spec 1.x §5.1.6, legacy layout, host byte order as
/// `PACKET_VNET_HDR` uses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`: 0 none, 1 TCPv4, 3 UDP, 4 TCPv6, 5 UDP_L4; bit 7 ECN.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header from the first 10 bytes of `b`.
    #[must_use]
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let h = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_ne_bytes([h[i], h[i + 1]]);
        Some(VnetHdr {
            flags: h[0],
            gso_type: h[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// The 10 bytes of the header.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Prefixes a plain frame with an all-zero `virtio_net_hdr` (nothing offloaded).
#[must_use]
pub fn with_plain_vnet_hdr(frame: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(VNET_HDR_LEN + frame.len());
    v.extend_from_slice(&[0; VNET_HDR_LEN]);
    v.extend_from_slice(frame);
    v
}

/// Checks one packet as the relay's sockets carry it: a `virtio_net_hdr`, then the frame.
/// `len` is the packet's real length (it may exceed the captured bytes). A frame without GSO
/// must fit the MTU like any frame; a GSO super-frame must cut into segments that do, stay
/// within 64 KiB, and carry consistent offsets. Returns the frame (without the header).
///
/// # Errors
/// [`FrameError::Runt`], [`FrameError::Oversize`] or [`FrameError::BadOffload`].
pub fn check_packet(packet: &[u8], len: usize, mtu: usize) -> Result<&[u8], FrameError> {
    if len < VNET_HDR_LEN + ETH_HEADER_LEN || packet.len() < len {
        return if len > packet.len() {
            Err(FrameError::Oversize)
        } else {
            Err(FrameError::Runt)
        };
    }
    let hdr = VnetHdr::parse(packet).ok_or(FrameError::Runt)?;
    let frame = &packet[VNET_HDR_LEN..len];
    if hdr.flags & VNET_F_NEEDS_CSUM != 0 {
        let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
        if usize::from(hdr.csum_start) < ETH_HEADER_LEN || end > frame.len() {
            return Err(FrameError::BadOffload);
        }
    }
    if hdr.gso_type == 0 {
        check_len(frame.len(), max_frame_len(mtu))?;
        return Ok(frame);
    }
    // The ECN bit alone (no GSO type) is refused, as the kernel refuses it.
    match hdr.gso_type & !VNET_GSO_ECN {
        1 | 3 | 4 | 5 => {
            if frame.len() > MAX_GSO_FRAME {
                return Err(FrameError::Oversize);
            }
            if hdr.gso_size == 0 || usize::from(hdr.hdr_len) > frame.len() {
                return Err(FrameError::BadOffload);
            }
            // Each segment: the headers plus gso_size bytes must fit the MTU + Ethernet.
            if usize::from(hdr.gso_size) > mtu {
                return Err(FrameError::Oversize);
            }
            Ok(())
        }
        _ => Err(FrameError::BadOffload),
    }?;
    Ok(frame)
}

/// The largest frame accepted for a given MTU.
#[must_use]
pub fn max_frame_len(mtu: usize) -> usize {
    mtu + ETH_HEADER_LEN + VLAN_TAG_LEN
}

/// Checks a frame's length. `len` is the frame's real length on the wire (it may exceed the
/// bytes actually captured).
///
/// # Errors
/// [`FrameError::Runt`] or [`FrameError::Oversize`].
pub fn check_len(len: usize, max_len: usize) -> Result<(), FrameError> {
    if len < ETH_HEADER_LEN {
        Err(FrameError::Runt)
    } else if len > max_len {
        Err(FrameError::Oversize)
    } else {
        Ok(())
    }
}

/// Destination MAC of a frame that passed [`check_len`].
#[must_use]
pub fn dst_mac(frame: &[u8]) -> Option<MacAddr> {
    MacAddr::from_slice(frame)
}

/// Source MAC of a frame that passed [`check_len`].
#[must_use]
pub fn src_mac(frame: &[u8]) -> Option<MacAddr> {
    MacAddr::from_slice(frame.get(6..)?)
}

fn ethertype(frame: &[u8]) -> Option<u16> {
    let b = frame.get(12..14)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn usable_v4(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

fn usable_v6(ip: Ipv6Addr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast() || ip.is_loopback())
}

/// An address the VM showed it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// From an ARP sender field or an IPv4 source.
    V4(Ipv4Addr),
    /// From an IPv6 source or a Neighbor Advertisement target.
    V6(Ipv6Addr),
}

/// The addresses a frame sent BY `mac` shows it owns: the ARP sender address (when the ARP
/// sender hardware address is `mac`), the IPv4 source, the IPv6 source, and the target of a
/// Neighbor Advertisement. Unspecified, multicast and broadcast addresses are ignored, so a
/// DHCP discover or a duplicate-address probe teaches nothing.
#[must_use]
pub fn learn(frame: &[u8], mac: MacAddr) -> Vec<Learned> {
    let mut out = Vec::new();
    if src_mac(frame) != Some(mac) {
        return out;
    }
    let Some(body) = frame.get(ETH_HEADER_LEN..) else {
        return out;
    };
    match ethertype(frame) {
        Some(ETHERTYPE_ARP) => learn_arp(body, mac, &mut out),
        Some(ETHERTYPE_IPV4) => learn_ipv4(body, &mut out),
        Some(ETHERTYPE_IPV6) => learn_ipv6(body, &mut out),
        _ => {}
    }
    out
}

fn learn_arp(body: &[u8], mac: MacAddr, out: &mut Vec<Learned>) {
    // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4.
    if body.get(0..6) != Some(&[0, 1, 8, 0, 6, 4]) {
        return;
    }
    if let (Some(sha), Some(spa)) = (body.get(8..14), body.get(14..18)) {
        let ip = Ipv4Addr::new(spa[0], spa[1], spa[2], spa[3]);
        if MacAddr::from_slice(sha) == Some(mac) && usable_v4(ip) {
            out.push(Learned::V4(ip));
        }
    }
}

fn learn_ipv4(body: &[u8], out: &mut Vec<Learned>) {
    if body.first().map(|b| b >> 4) != Some(4) {
        return;
    }
    if let Some(s) = body.get(12..16) {
        let ip = Ipv4Addr::new(s[0], s[1], s[2], s[3]);
        if usable_v4(ip) {
            out.push(Learned::V4(ip));
        }
    }
}

fn learn_ipv6(body: &[u8], out: &mut Vec<Learned>) {
    if body.first().map(|b| b >> 4) != Some(6) {
        return;
    }
    if let Some(s) = body.get(8..24).and_then(|s| <[u8; 16]>::try_from(s).ok()) {
        let ip = Ipv6Addr::from(s);
        if usable_v6(ip) {
            out.push(Learned::V6(ip));
        }
    }
    // Next header ICMPv6 (58), type 136 = Neighbor Advertisement: learn its target.
    if body.get(6) == Some(&58) && body.get(40) == Some(&136) {
        if let Some(t) = body.get(48..64).and_then(|s| <[u8; 16]>::try_from(s).ok()) {
            let ip = Ipv6Addr::from(t);
            if usable_v6(ip) && !out.contains(&Learned::V6(ip)) {
                out.push(Learned::V6(ip));
            }
        }
    }
}

fn eth_header(dst: MacAddr, src: MacAddr, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(90);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// A gratuitous ARP request (RFC 5227 §3 "ARP Announcement"): sender and target protocol
/// address are both `ip`, broadcast, from `mac`. Neighbours update their ARP caches and
/// switches relearn the port of `mac`.
#[must_use]
pub fn gratuitous_arp(mac: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
    let mut f = eth_header(MacAddr::BROADCAST, mac, ETHERTYPE_ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4, op = request
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f
}

fn ones_complement_sum(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 significant bits.
    !u16::try_from(sum).unwrap_or(0xffff)
}

/// An unsolicited Neighbor Advertisement (RFC 4861 §7.2.6) for `ip`, from `mac`, to all nodes
/// (ff02::1), Override flag set, with the target link-layer address option.
#[must_use]
pub fn unsolicited_na(mac: MacAddr, ip: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let dst_mac = MacAddr([0x33, 0x33, 0, 0, 0, 1]);
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[136, 0, 0, 0]); // type NA, code 0, checksum placeholder
    icmp.extend_from_slice(&[0x20, 0, 0, 0]); // flags: Override
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]); // option: target link-layer address, 8 bytes
    icmp.extend_from_slice(&mac.0);
    let icmp_len = u16::try_from(icmp.len()).unwrap_or(32);

    // Pseudo-header: src, dst, upper-layer length, next header.
    let mut sum = ones_complement_sum(&ip.octets(), 0);
    sum = ones_complement_sum(&all_nodes.octets(), sum);
    sum += u32::from(icmp_len) + 58;
    sum = ones_complement_sum(&icmp, sum);
    let csum = fold(sum).to_be_bytes();
    icmp[2] = csum[0];
    icmp[3] = csum[1];

    let mut f = eth_header(dst_mac, mac, ETHERTYPE_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&icmp_len.to_be_bytes());
    f.extend_from_slice(&[58, 255]); // next header ICMPv6, hop limit 255
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&all_nodes.octets());
    f.extend_from_slice(&icmp);
    f
}

/// A broadcast frame from `mac` that every host ignores (local experimental EtherType), so
/// that switches relearn the port of `mac` even when no address of the VM is known.
#[must_use]
pub fn relearn_frame(mac: MacAddr) -> Vec<u8> {
    let mut f = eth_header(MacAddr::BROADCAST, mac, ETHERTYPE_RELEARN);
    f.extend_from_slice(b"xenft-netback relearn");
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: MacAddr = MacAddr([2, 0, 0, 0, 0, 5]);

    #[test]
    fn mac_parses_and_prints_round_trip() {
        let m: MacAddr = "02:00:00:00:00:05".parse().unwrap();
        assert_eq!(m, VM);
        assert_eq!(m.to_string(), "02:00:00:00:00:05");
        assert!("02:00:00:00:00".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:00:05:06".parse::<MacAddr>().is_err());
        assert!("zz:00:00:00:00:05".parse::<MacAddr>().is_err());
    }

    #[test]
    fn length_check_rejects_runts_and_oversize_frames() {
        let max = max_frame_len(1500);
        assert_eq!(check_len(13, max), Err(FrameError::Runt));
        assert_eq!(check_len(14, max), Ok(()));
        assert_eq!(check_len(1518, max), Ok(()));
        assert_eq!(check_len(1519, max), Err(FrameError::Oversize));
    }

    #[test]
    fn packets_with_offload_headers_are_checked_against_the_mtu() {
        let frame = vec![0u8; 1514];
        let plain = with_plain_vnet_hdr(&frame);
        assert_eq!(
            check_packet(&plain, plain.len(), 1500).map(<[u8]>::len),
            Ok(1514)
        );
        assert_eq!(
            check_packet(&plain, plain.len(), 1400),
            Err(FrameError::Oversize)
        );
        assert_eq!(check_packet(&plain[..20], 20, 1500), Err(FrameError::Runt));
        // Truncated capture: the real length is larger than what was captured.
        assert_eq!(
            check_packet(&plain, plain.len() + 1, 1500),
            Err(FrameError::Oversize)
        );

        let big = vec![0u8; 30_000];
        let gso = |gso_type, gso_size, hdr_len| {
            let h = VnetHdr {
                flags: 0,
                gso_type,
                hdr_len,
                gso_size,
                csum_start: 0,
                csum_offset: 0,
            };
            let mut p = h.to_bytes().to_vec();
            p.extend_from_slice(&big);
            p
        };
        let ok = gso(1, 1448, 66);
        assert!(
            check_packet(&ok, ok.len(), 1500).is_ok(),
            "TCPv4 super-frame"
        );
        let p = gso(1, 8000, 66);
        assert_eq!(check_packet(&p, p.len(), 1500), Err(FrameError::Oversize));
        let p = gso(1, 0, 66);
        assert_eq!(check_packet(&p, p.len(), 1500), Err(FrameError::BadOffload));
        let p = gso(9, 1448, 66);
        assert_eq!(check_packet(&p, p.len(), 1500), Err(FrameError::BadOffload));

        let csum = VnetHdr {
            flags: 1,
            csum_start: 34,
            csum_offset: 6,
            ..VnetHdr::default()
        };
        let mut p = csum.to_bytes().to_vec();
        p.extend_from_slice(&[0u8; 60]);
        assert!(check_packet(&p, p.len(), 1500).is_ok());
        let bad = VnetHdr {
            flags: 1,
            csum_start: 58,
            csum_offset: 6,
            ..VnetHdr::default()
        };
        let mut p = bad.to_bytes().to_vec();
        p.extend_from_slice(&[0u8; 60]);
        assert_eq!(check_packet(&p, p.len(), 1500), Err(FrameError::BadOffload));
    }

    #[test]
    fn gratuitous_arp_teaches_its_own_address() {
        let ip = Ipv4Addr::new(10, 9, 0, 2);
        let f = gratuitous_arp(VM, ip);
        assert_eq!(f.len(), 42);
        assert_eq!(learn(&f, VM), vec![Learned::V4(ip)]);
        // The same frame seen as coming from another MAC teaches nothing about VM.
        assert!(learn(&f, MacAddr([2, 0, 0, 0, 0, 6])).is_empty());
    }

    #[test]
    fn unsolicited_na_has_valid_checksum_and_teaches_target() {
        let ip: Ipv6Addr = "fd00::2".parse().unwrap();
        let f = unsolicited_na(VM, ip);
        let icmp = &f[ETH_HEADER_LEN + 40..];
        let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
        let mut sum = ones_complement_sum(&ip.octets(), 0);
        sum = ones_complement_sum(&all_nodes.octets(), sum);
        sum += u32::try_from(icmp.len()).unwrap() + 58;
        sum = ones_complement_sum(icmp, sum);
        assert_eq!(fold(sum), 0, "checksum over the whole message must verify");
        assert_eq!(learn(&f, VM), vec![Learned::V6(ip)]);
    }

    #[test]
    fn learning_ignores_unspecified_and_truncated_frames() {
        let f = gratuitous_arp(VM, Ipv4Addr::UNSPECIFIED);
        assert!(learn(&f, VM).is_empty());
        for cut in 0..f.len() {
            let _ = learn(&f[..cut], VM);
        }
        let na = unsolicited_na(VM, "fd00::2".parse().unwrap());
        for cut in 0..na.len() {
            let _ = learn(&na[..cut], VM);
        }
    }
}
