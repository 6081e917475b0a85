//! Control protocol between [`super::LocalDomain`] and the synthetic guest process.
//!
//! Once set up, the guest sends an unsolicited response whose payload names its dirty tracking
//! mode (`async` or `sync`). Requests are one opcode byte. The engine may send a request before reading the previous
//! response (it does so after `OP_RESUME`); responses come in request order. Every response (including the unsolicited one sent once the
//! guest is ready) is `status:u8 len:u32le payload[len]`; status 0 = ok, 1 = error with a UTF-8
//! message as payload.

use std::io::{self, Read, Write};

/// Stop the workload at a safe point; ok once it is parked.
pub const OP_PAUSE: u8 = 1;
/// Let the workload run again.
pub const OP_RESUME: u8 = 2;
/// Return the dirty pages (u32le each) and write-protect them again.
pub const OP_READ_CLEAR_DIRTY: u8 = 3;
/// Return the encoded workload state; the guest must be paused.
pub const OP_GET_CONTEXT: u8 = 4;
/// Empty the dirty log and write-protect all memory.
pub const OP_ENABLE_DIRTY_LOG: u8 = 5;
/// Exit the guest process.
pub const OP_SHUTDOWN: u8 = 6;
/// Pause, then return `ctx_len:u32le ctx dirty pfns (u32le each)` and re-protect the pages.
pub const OP_CHECKPOINT: u8 = 7;

/// Response status: success.
pub const STATUS_OK: u8 = 0;
/// Response status: error, payload is a message.
pub const STATUS_ERR: u8 = 1;

/// Writes one response.
pub fn write_response(w: &mut impl Write, status: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "payload too large"))?;
    let mut head = [0u8; 5];
    head[0] = status;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)
}

/// Reads one response, refusing payloads over `max` bytes.
pub fn read_response(r: &mut impl Read, max: usize) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let mut l = [0u8; 4];
    l.copy_from_slice(&head[1..]);
    let len = usize::try_from(u32::from_le_bytes(l)).unwrap_or(usize::MAX);
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("response of {len} bytes exceeds {max}"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok((head[0], payload))
}
