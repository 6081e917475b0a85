//! NBD wire constants and fixed-layout structures.
//!
//! Names and values follow the NBD protocol document (NetworkBlockDevice/nbd, `doc/proto.md`):
//! "Handshake phase" (magics, handshake/client/transmission flags, option and option-reply types,
//! `NBD_INFO_*`) and "Transmission phase" (request/reply magics, `NBD_CMD_*`,
//! `NBD_CMD_FLAG_*`, structured reply chunk types, error values). All integers are big-endian
//! ("network byte order") on the wire.

/// `NBDMAGIC`, first 8 bytes the server sends (`INIT_PASSWD`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic of newstyle negotiation, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// `cliserv_magic`: second server magic of the oldstyle handshake (`NBDMAGIC`, this, the
/// export size as u64, the flags as u32, 124 zero bytes), the only handshake tapdisk's NBD
/// client (blktap `drivers/block-nbd.c`, `tdnbd_nbd_negotiate`) understands.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic prefixing every option reply (`0x3e889045565a9`).
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: server supports fixed newstyle negotiation.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: client does not want the 124 zero bytes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: MUST always be set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: FLUSH/FUA effects are visible across all connections.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose an export and enter transmission (no reply on error: disconnect).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Option: start TLS (not supported: NOTLS mode).
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: describe an export without entering transmission.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Option: use structured replies in transmission.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list the metadata contexts of an export ("Metadata querying").
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select the metadata contexts `NBD_CMD_BLOCK_STATUS` reports.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: accepted / end of list.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: one export description (`NBD_OPT_LIST`).
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: one `NBD_INFO_*` item (`NBD_OPT_INFO` / `NBD_OPT_GO`).
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: one metadata context (32-bit id, then its name).
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Option reply error bit (bit 31).
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: unknown option.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR + 1;
/// Option error: forbidden by policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR + 2;
/// Option error: syntactically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR + 3;
/// Option error: unknown export.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR + 6;
/// Option error: request too big.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR + 9;

/// Info item: export size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Info item: export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Info item: human description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Info item: block size constraints (minimum, preferred, maximum).
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Request magic.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: soft disconnect.
pub const NBD_CMD_DISC: u16 = 2;
/// Command: flush all completed writes to stable storage.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: discard (contents become unspecified; we make them read as zero).
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Command: report the status of a range for each selected metadata context.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access (durable before the reply).
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: `NBD_CMD_WRITE_ZEROES` must not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: `NBD_CMD_BLOCK_STATUS` wants exactly one extent, no longer than the request.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flag: last chunk of this reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured chunk: no payload.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Structured chunk: 64-bit offset then data.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured chunk: block status (32-bit context id, then (32-bit length, 32-bit flags)
/// descriptors).
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured chunk: error (32-bit errno, 16-bit message length, message).
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// The one metadata context this server offers ("The `base:` metadata namespace").
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is not allocated in the backing storage.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// Error: operation not permitted (write to read-only export).
pub const NBD_EPERM: u32 = 1;
/// Error: input/output error.
pub const NBD_EIO: u32 = 5;
/// Error: out of memory.
pub const NBD_ENOMEM: u32 = 12;
/// Error: invalid argument (bad flags, out-of-range read, unknown command).
pub const NBD_EINVAL: u32 = 22;
/// Error: no space (write beyond the end of the export).
pub const NBD_ENOSPC: u32 = 28;
/// Error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Error: operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Error: server shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Largest READ/WRITE payload this server accepts (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest option payload read during negotiation (strings are at most 4096 bytes by spec).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// A transmission-phase request header (28 bytes on the wire).
///
/// ```text
/// C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC)
/// C: 16 bits, command flags
/// C: 16 bits, type
/// C: 64 bits, handle (cookie)
/// C: 64 bits, offset (unsigned)
/// C: 32 bits, length (unsigned)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Magic (must be [`NBD_REQUEST_MAGIC`]).
    pub magic: u32,
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub typ: u16,
    /// Opaque handle echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl RequestHeader {
    /// Size on the wire.
    pub const LEN: usize = 28;

    /// Decodes the fixed 28-byte header.
    #[must_use]
    pub fn decode(b: &[u8; Self::LEN]) -> Self {
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        Self {
            magic: u32_at(0),
            flags: u16_at(4),
            typ: u16_at(6),
            cookie: u64_at(8),
            offset: u64_at(16),
            length: u32_at(24),
        }
    }

    /// Encodes the header (used by tests and the bench client).
    #[must_use]
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Encodes a simple reply header: magic, error, cookie (16 bytes).
#[must_use]
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encodes a structured reply chunk header: magic, flags, type, cookie, payload length (20 bytes).
#[must_use]
pub fn structured_chunk(flags: u16, typ: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Encodes an option reply header: magic, option, reply type, payload length (20 bytes).
#[must_use]
pub fn option_reply(option: u32, reply: u32, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&reply.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_roundtrips() {
        let h = RequestHeader {
            magic: NBD_REQUEST_MAGIC,
            flags: NBD_CMD_FLAG_FUA,
            typ: NBD_CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(RequestHeader::decode(&h.encode()), h);
    }

    #[test]
    fn magics_spell_the_spec_strings() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }
}
