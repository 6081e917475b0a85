//! Linux-only system calls: AF_PACKET sockets and interface flags.
//!
//! This is the only module of the crate with `unsafe` code. Every block has a `SAFETY` comment.
//! Everything else in the crate sees a [`PacketSocket`]: a raw socket bound to one interface
//! that receives every frame arriving on it (promiscuous), never sees its own transmissions
//! (`PACKET_IGNORE_OUTGOING`), and sends whole Ethernet frames.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// `ETH_P_ALL` in network byte order, as AF_PACKET wants it.
fn eth_p_all_be() -> u16 {
    u16::try_from(libc::ETH_P_ALL).unwrap_or(3).to_be()
}

/// `PACKET_IGNORE_OUTGOING` (linux/if_packet.h, Linux ≥ 4.20).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// `PACKET_QDISC_BYPASS` (linux/if_packet.h): transmit straight to the driver.
const PACKET_QDISC_BYPASS: libc::c_int = 20;
/// `PACKET_VNET_HDR` (linux/if_packet.h): every frame carries a `virtio_net_hdr` first.
const PACKET_VNET_HDR: libc::c_int = 15;
/// `PACKET_ADD_MEMBERSHIP` (linux/if_packet.h).
const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
/// `PACKET_MR_PROMISC` (linux/if_packet.h).
const PACKET_MR_PROMISC: libc::c_ushort = 1;

/// `struct packet_mreq` (linux/if_packet.h).
#[repr(C)]
struct PacketMreq {
    mr_ifindex: libc::c_int,
    mr_type: libc::c_ushort,
    mr_alen: libc::c_ushort,
    mr_address: [u8; 8],
}

/// `struct ifreq` restricted to the flags member (linux/if.h): 16 bytes of name, then a union
/// of at least 24 bytes of which we read the first `short`.
#[repr(C)]
struct IfreqFlags {
    ifr_name: [libc::c_char; libc::IFNAMSIZ],
    ifr_flags: libc::c_short,
    _pad: [u8; 22],
}

/// A raw AF_PACKET socket bound to one interface.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifname: String,
    ifindex: libc::c_int,
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<T>())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "option too large"))?;
    // SAFETY: `val` points to a live, initialised `T` of exactly `len` bytes; the kernel only
    // reads it during the call. `fd` is an open socket owned by the caller.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(val).cast::<libc::c_void>(),
            len,
        )
    };
    check(rc)
}

impl PacketSocket {
    /// Opens a raw socket on `ifname` (in the calling thread's network namespace), puts the
    /// interface in promiscuous mode for as long as the socket lives, and ignores frames the
    /// host itself sends on it.
    ///
    /// # Errors
    /// When the interface does not exist, the caller lacks `CAP_NET_RAW`, or a socket option is
    /// refused (`PACKET_IGNORE_OUTGOING` needs Linux 4.20).
    pub fn open(ifname: &str) -> io::Result<Self> {
        Self::open_with(ifname, false)
    }

    /// Like [`PacketSocket::open`], but every frame received or sent is preceded by a 10-byte
    /// `virtio_net_hdr` ([`crate::frame::VnetHdr`]): offloaded frames (partial checksum,
    /// GSO super-frames) are then described instead of arriving half-finished, and the kernel
    /// completes them on transmit.
    ///
    /// # Errors
    /// As [`PacketSocket::open`].
    pub fn open_vnet(ifname: &str) -> io::Result<Self> {
        Self::open_with(ifname, true)
    }

    fn open_with(ifname: &str, vnet_hdr: bool) -> io::Result<Self> {
        if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name {ifname:?} must be 1..=15 bytes"),
            ));
        }
        let index = nix::net::if_::if_nametoindex(ifname)
            .map_err(|e| io::Error::new(io::ErrorKind::NotFound, format!("{ifname}: {e}")))?;
        let ifindex = libc::c_int::try_from(index)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "interface index too large"))?;
        // Protocol 0 at creation: the socket receives nothing until bound, so no frame from
        // another interface can slip in between socket() and bind().
        // SAFETY: plain system call with constant arguments; the result is checked below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        check(raw)?;
        // SAFETY: `raw` is a freshly created, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        setsockopt(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &1_i32)?;
        if vnet_hdr {
            setsockopt(&fd, libc::SOL_PACKET, PACKET_VNET_HDR, &1_i32)?;
        }
        let mreq = PacketMreq {
            mr_ifindex: ifindex,
            mr_type: PACKET_MR_PROMISC,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        setsockopt(&fd, libc::SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mreq)?;
        // The relay is the only sender on these interfaces and keeps its own order: skip the
        // qdisc layer (its locks and queue) on transmit.
        setsockopt(&fd, libc::SOL_PACKET, PACKET_QDISC_BYPASS, &1_i32)?;
        // 4 MiB receive buffer: absorbs bursts while the relay thread is descheduled.
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &(4_i32 << 20))?;

        let addr = libc::sockaddr_ll {
            sll_family: u16::try_from(libc::AF_PACKET).unwrap_or(17),
            sll_protocol: eth_p_all_be(),
            sll_ifindex: ifindex,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "sockaddr too large"))?;
        // SAFETY: `addr` is a valid `sockaddr_ll` of `len` bytes, read by the kernel only
        // during the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                len,
            )
        };
        check(rc)?;
        Ok(PacketSocket {
            fd,
            ifname: ifname.to_string(),
            ifindex,
        })
    }

    /// The interface this socket is bound to.
    #[must_use]
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Sets how long [`PacketSocket::recv`] waits before returning `Ok(None)`.
    ///
    /// # Errors
    /// When the kernel refuses the option.
    pub fn set_recv_timeout(&self, timeout: Duration) -> io::Result<()> {
        // nix's TimeVal: the C types differ between glibc and musl (the static build).
        let tv = <nix::sys::time::TimeVal as nix::sys::time::TimeValLike>::microseconds(
            i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX),
        );
        setsockopt(&self.fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, tv.as_ref())
    }

    /// Receives one frame into `buf`. Returns the frame's REAL length, which is larger than
    /// `buf.len()` when the frame was truncated (callers treat that as oversize). `Ok(None)`
    /// when the receive timeout expired.
    ///
    /// # Errors
    /// Any socket error other than a timeout or an interrupted call.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is a valid writable region of `buf.len()` bytes for the whole call;
        // with MSG_TRUNC the kernel still writes at most `buf.len()` bytes.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(err),
            };
        }
        Ok(Some(usize::try_from(n).unwrap_or(0)))
    }

    /// Sends one whole Ethernet frame out of the interface.
    ///
    /// # Errors
    /// When the kernel refuses the frame (interface down, frame too large, no buffer space).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is a valid readable region of `frame.len()` bytes for the call.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast::<libc::c_void>(),
                frame.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// True when the interface is administratively up AND has carrier (`IFF_UP` and
    /// `IFF_RUNNING`). Asked through the socket, so it answers for the socket's own network
    /// namespace (unlike `/sys/class/net`, which shows the namespace sysfs was mounted in).
    ///
    /// # Errors
    /// When the ioctl fails (interface removed).
    pub fn link_up(&self) -> io::Result<bool> {
        let mut req = IfreqFlags {
            ifr_name: [0; libc::IFNAMSIZ],
            ifr_flags: 0,
            _pad: [0; 22],
        };
        let name = CString::new(self.ifname.as_str())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
        for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = libc::c_char::from_ne_bytes([*src]);
        }
        // SAFETY: `req` is a properly sized, initialised `struct ifreq` prefix (40 bytes, as
        // large as the kernel's) that lives for the whole call; SIOCGIFFLAGS writes only
        // `ifr_flags`.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                // The request's C type is unsigned long on glibc, int on musl.
                libc::SIOCGIFFLAGS as _,
                std::ptr::from_mut(&mut req),
            )
        };
        check(rc)?;
        let flags = libc::c_int::from(req.ifr_flags);
        Ok(flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0)
    }

    /// Receives up to `batch.slots()` frames in one call: waits (up to the receive timeout)
    /// for the first, then takes whatever else is already queued. Returns how many frames are
    /// in `batch` (0 on timeout).
    ///
    /// # Errors
    /// Any socket error other than a timeout or an interrupted call.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.count = 0;
        let mut iovs: Vec<libc::iovec> = batch
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast::<libc::c_void>(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: an all-zero `mmsghdr` is a valid value (null name and control).
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = std::ptr::from_mut(iov);
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let vlen = libc::c_uint::try_from(msgs.len()).unwrap_or(libc::c_uint::MAX);
        // SAFETY: `msgs` holds `vlen` headers, each pointing at one iovec of `iovs`, each
        // pointing at a live buffer of `batch.bufs` of the stated length; all outlive the call
        // and nothing else accesses them meanwhile. MSG_TRUNC makes `msg_len` the frame's real
        // length but the kernel still writes at most `iov_len` bytes.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                vlen,
                // int on glibc, unsigned int on musl.
                (libc::MSG_TRUNC | libc::MSG_WAITFORONE) as _,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        }
        let n = usize::try_from(n).unwrap_or(0).min(msgs.len());
        for (len, m) in batch.lens.iter_mut().zip(&msgs).take(n) {
            *len = usize::try_from(m.msg_len).unwrap_or(usize::MAX);
        }
        batch.count = n;
        Ok(n)
    }

    /// Sends several whole frames in one call. Returns how many were sent (the rest failed).
    ///
    /// # Errors
    /// When not even the first frame could be sent.
    pub fn send_batch(&self, frames: &[&[u8]]) -> io::Result<usize> {
        if frames.is_empty() {
            return Ok(0);
        }
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                // sendmmsg only reads through this pointer.
                iov_base: f.as_ptr().cast_mut().cast::<libc::c_void>(),
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: an all-zero `mmsghdr` is a valid value (null name and control).
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = std::ptr::from_mut(iov);
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut sent = 0;
        while sent < msgs.len() {
            let rest = &mut msgs[sent..];
            let vlen = libc::c_uint::try_from(rest.len()).unwrap_or(libc::c_uint::MAX);
            // SAFETY: `rest` holds `vlen` headers pointing at iovecs of `iovs`, which point
            // at the caller's frames; all outlive the call and the kernel only reads them.
            let n = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), rest.as_mut_ptr(), vlen, 0) };
            if n <= 0 {
                if sent == 0 {
                    return Err(io::Error::last_os_error());
                }
                break;
            }
            sent += usize::try_from(n).unwrap_or(0);
        }
        Ok(sent)
    }

    /// The interface index the socket is bound to.
    #[must_use]
    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }
}

/// Receive slots for [`PacketSocket::recv_batch`].
#[derive(Debug)]
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    count: usize,
}

impl RecvBatch {
    /// `slots` buffers of `slot_len` bytes each.
    #[must_use]
    pub fn new(slots: usize, slot_len: usize) -> Self {
        RecvBatch {
            bufs: vec![vec![0; slot_len.max(1)]; slots.max(1)],
            lens: vec![0; slots.max(1)],
            count: 0,
        }
    }

    /// The frames of the last receive: `(captured bytes, real length on the wire)`. The real
    /// length exceeds the captured bytes when the frame was larger than a slot.
    pub fn frames(&self) -> impl Iterator<Item = (&[u8], usize)> {
        self.bufs
            .iter()
            .zip(&self.lens)
            .take(self.count)
            .map(|(b, &len)| (&b[..len.min(b.len())], len))
    }
}

/// Runs the calling thread under `SCHED_FIFO` at `priority` (1..=99), so that a relay thread
/// is woken ahead of ordinary work on a busy host. Bounded by the kernel's real-time throttling.
///
/// # Errors
/// When the caller lacks `CAP_SYS_NICE` or the priority is out of range.
pub fn set_realtime_priority(priority: u8) -> io::Result<()> {
    // SAFETY: `sched_param` is plain integers, for which all-zero is valid; musl's has more
    // fields than glibc's, so it is zeroed and the one field set.
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = libc::c_int::from(priority);
    // SAFETY: `param` is a valid `sched_param` read by the kernel during the call; pid 0 is
    // the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param) };
    check(rc)
}
