//! An NBD client that behaves as tapdisk's (xapi-project/blktap `drivers/block-nbd.c`): it
//! opens a Unix socket, expects the oldstyle handshake (`NBDMAGIC`, `0x00420281861253`, the
//! size as u64, the flags as u32, 124 zero bytes), then sends only READ (0), WRITE (1) and
//! DISC (2) with no command flags — never FLUSH, never FUA — with 8-byte handles `td%05x`,
//! several requests in flight, matching replies by handle.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// One connection.
pub struct Tapdisk {
    s: UnixStream,
    /// Export size from the handshake.
    pub size: u64,
    next: u32,
}

impl Tapdisk {
    /// Connects and does the oldstyle handshake.
    pub fn connect(sock: &Path) -> std::io::Result<Self> {
        let mut s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        let mut h = [0u8; 152];
        s.read_exact(&mut h)?;
        let bad = |what: &str| std::io::Error::other(format!("handshake: {what}"));
        if &h[0..8] != b"NBDMAGIC" {
            return Err(bad("no NBDMAGIC"));
        }
        if be64(&h[8..16]) != 0x0000_4202_8186_1253 {
            return Err(bad("not the oldstyle magic"));
        }
        let size = be64(&h[16..24]);
        Ok(Self { s, size, next: 0 })
    }

    fn header(&mut self, typ: u32, offset: u64, len: u32) -> ([u8; 8], Vec<u8>) {
        let handle: [u8; 8] = {
            let mut b = [0u8; 8];
            let t = format!("td{:05x}", self.next % 0xffff);
            b[..7].copy_from_slice(t.as_bytes());
            b
        };
        self.next += 1;
        let mut r = Vec::with_capacity(28);
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&typ.to_be_bytes());
        r.extend_from_slice(&handle);
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        (handle, r)
    }

    /// Sends a WRITE without waiting; returns its handle.
    pub fn send_write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<[u8; 8]> {
        let len = u32::try_from(data.len()).map_err(std::io::Error::other)?;
        let (h, mut r) = self.header(1, offset, len);
        r.extend_from_slice(data);
        self.s.write_all(&r)?;
        Ok(h)
    }

    /// Reads one simple reply: `(handle, error)`.
    pub fn recv_reply(&mut self) -> std::io::Result<([u8; 8], u32)> {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        if be32(&r[0..4]) != REPLY_MAGIC {
            return Err(std::io::Error::other("bad reply magic"));
        }
        let err = be32(&r[4..8]);
        let mut handle = [0u8; 8];
        handle.copy_from_slice(&r[8..16]);
        Ok((handle, err))
    }

    /// One WRITE, waiting for its reply (queue depth 1).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let h = self.send_write(offset, data)?;
        let (rh, err) = self.recv_reply()?;
        if rh != h || err != 0 {
            return Err(std::io::Error::other(format!("write failed: error {err}")));
        }
        Ok(())
    }

    /// One READ (queue depth 1).
    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let (h, r) = self.header(0, offset, len);
        self.s.write_all(&r)?;
        let (rh, err) = self.recv_reply()?;
        if rh != h || err != 0 {
            return Err(std::io::Error::other(format!("read failed: error {err}")));
        }
        let mut b = vec![0u8; len as usize];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }

    /// DISC, as tapdisk closes.
    pub fn disconnect(mut self) {
        let (_, r) = self.header(2, 0, 0);
        let _ = self.s.write_all(&r);
    }
}

/// Deterministic block contents for block `i`.
pub fn block(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}
