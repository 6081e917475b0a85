//! Metadata querying with the one context this server offers, `base:allocation`.
//!
//! Follows the NBD protocol document (`doc/proto.md`): "Metadata querying", "The `base:`
//! metadata namespace", the options `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`,
//! the command `NBD_CMD_BLOCK_STATUS` and the structured chunk `NBD_REPLY_TYPE_BLOCK_STATUS`.
//! Extents come from the backing file's holes (`SEEK_DATA`/`SEEK_HOLE`, see
//! [`crate::store::Store::next_data`]): a hole is reported `NBD_STATE_HOLE | NBD_STATE_ZERO`, data
//! as 0 ("allocated, contents unknown"), which a server may always report safely.

use bytes::{BufMut, Bytes, BytesMut};

use super::proto::{BASE_ALLOCATION, NBD_STATE_HOLE, NBD_STATE_ZERO};

/// The id this server gives `base:allocation` in `NBD_REP_META_CONTEXT` after a
/// `NBD_OPT_SET_META_CONTEXT` (any value works; clients treat it as opaque).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Most descriptors in one reply chunk. The spec asks for at most 2^20; 2^16 bounds one reply
/// to 512 KiB while still covering any ordinary image in a few requests (clients continue at
/// the first offset a reply did not cover).
pub const MAX_EXTENTS: usize = 1 << 16;

/// Longest string the spec allows (export names, context queries).
const MAX_STRING: usize = 4096;

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`:
///
/// ```text
/// C: 32 bits, length of export name
/// C: String, export name
/// C: 32 bits, number of queries
/// C: per query: 32 bits, length of query; String, query
/// ```
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    /// Export the contexts are asked for.
    pub export: &'a [u8],
    /// Query strings (namespace, colon, leaf name).
    pub queries: Vec<&'a [u8]>,
}

/// Why a metadata option payload is syntactically invalid (answered `NBD_REP_ERR_INVALID`).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetaParseError {
    /// A length or count points beyond the option's data.
    #[error("a length or count runs past the end of the option data")]
    Truncated,
    /// Bytes left over after the last query.
    #[error("{0} bytes after the last query")]
    TrailingBytes(usize),
    /// A string longer than the spec's 4096 bytes.
    #[error("a string of {0} bytes (the limit is 4096)")]
    StringTooLong(usize),
}

impl MetaRequest<'_> {
    /// Parses the option data, refusing any length that does not fit it exactly.
    pub fn parse(data: &[u8]) -> Result<MetaRequest<'_>, MetaParseError> {
        let mut rest = data;
        let export = take_string(&mut rest)?;
        let count = take_u32(&mut rest)?;
        // Each query takes at least its 4-byte length: a count the data cannot hold is refused
        // before anything is allocated for it.
        if usize::try_from(count).map_or(true, |c| c > rest.len() / 4) {
            return Err(MetaParseError::Truncated);
        }
        let mut queries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            queries.push(take_string(&mut rest)?);
        }
        if !rest.is_empty() {
            return Err(MetaParseError::TrailingBytes(rest.len()));
        }
        Ok(MetaRequest { export, queries })
    }

    /// Whether `base:allocation` answers this request. `NBD_OPT_SET_META_CONTEXT` selects it
    /// only by its full name (zero queries select nothing; `base:` is ignored);
    /// `NBD_OPT_LIST_META_CONTEXT` lists it for zero queries, its name or the `base:` wildcard.
    /// Queries of other namespaces are ignored, as the spec requires.
    #[must_use]
    pub fn selects_base_allocation(&self, listing: bool) -> bool {
        if listing && self.queries.is_empty() {
            return true;
        }
        self.queries
            .iter()
            .any(|q| *q == BASE_ALLOCATION.as_bytes() || (listing && *q == b"base:"))
    }
}

fn take_u32(rest: &mut &[u8]) -> Result<u32, MetaParseError> {
    let (head, tail) = rest
        .split_first_chunk::<4>()
        .ok_or(MetaParseError::Truncated)?;
    *rest = tail;
    Ok(u32::from_be_bytes(*head))
}

fn take_string<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], MetaParseError> {
    let len = usize::try_from(take_u32(rest)?).map_err(|_| MetaParseError::Truncated)?;
    if len > rest.len() {
        return Err(MetaParseError::Truncated);
    }
    if len > MAX_STRING {
        return Err(MetaParseError::StringTooLong(len));
    }
    let (s, tail) = rest.split_at(len);
    *rest = tail;
    Ok(s)
}

/// One block status descriptor: `length` bytes with `base:allocation` `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes covered (never zero).
    pub length: u32,
    /// `NBD_STATE_*` bits.
    pub flags: u32,
}

/// Flags of a hole: not allocated, reads as zeroes.
pub const HOLE: u32 = NBD_STATE_HOLE | NBD_STATE_ZERO;
/// Flags of allocated data (contents unknown).
pub const DATA: u32 = 0;

/// The `base:allocation` extents of `[offset, offset + len)` (`len > 0`, range inside the
/// export), from `next_data(pos)`: the first data extent `(start, end)` at or after `pos`, or
/// `None` when only holes remain ([`crate::store::Store::next_data`]). With `req_one`, exactly
/// one extent; otherwise consecutive extents of different flags, at most `max`, covering the
/// range or a prefix of it. A `next_data` that makes no progress is read as data to the end.
pub fn allocation_extents<E>(
    offset: u64,
    len: u32,
    req_one: bool,
    max: usize,
    mut next_data: impl FnMut(u64) -> Result<Option<(u64, u64)>, E>,
) -> Result<Vec<Extent>, E> {
    let end = offset.saturating_add(u64::from(len));
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let (stop, flags) = match next_data(pos)? {
            None => (end, HOLE),
            Some((start, _)) if start > pos => (start.min(end), HOLE),
            Some((_, data_end)) if data_end > pos => (data_end.min(end), DATA),
            Some(_) => (end, DATA),
        };
        // stop - pos <= len, which is a u32.
        let n = u32::try_from(stop - pos).unwrap_or(u32::MAX);
        let full = out.len() >= max;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += n,
            _ if full => break,
            _ => out.push(Extent { length: n, flags }),
        }
        pos = stop;
        if req_one {
            break;
        }
    }
    Ok(out)
}

/// The payload of one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: context id, then per extent its
/// length and flags (all 32-bit big-endian).
#[must_use]
pub fn encode_block_status(context_id: u32, extents: &[Extent]) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + 8 * extents.len());
    b.put_u32(context_id);
    for e in extents {
        b.put_u32(e.length);
        b.put_u32(e.flags);
    }
    b.freeze()
}

/// The payload of an `NBD_REP_META_CONTEXT` option reply: context id, then the name.
#[must_use]
pub fn encode_meta_context(context_id: u32, name: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + name.len());
    b.put_u32(context_id);
    b.put_slice(name.as_bytes());
    b.freeze()
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test strings are short
mod tests {
    use super::*;

    fn request(export: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u32(export.len() as u32);
        b.put_slice(export);
        b.put_u32(queries.len() as u32);
        for q in queries {
            b.put_u32(q.len() as u32);
            b.put_slice(q);
        }
        b.to_vec()
    }

    #[test]
    fn meta_request_parses_export_and_queries() {
        let d = request(b"xenft", &[b"base:allocation", b"qemu:dirty-bitmap:x"]);
        let r = MetaRequest::parse(&d).unwrap();
        assert_eq!(r.export, b"xenft");
        assert_eq!(
            r.queries,
            vec![&b"base:allocation"[..], b"qemu:dirty-bitmap:x"]
        );
        assert!(r.selects_base_allocation(false));
    }

    #[test]
    fn meta_request_with_bad_lengths_is_refused() {
        let good = request(b"", &[b"base:allocation"]);
        // Every truncation of a valid request is refused, never read past.
        for cut in 0..good.len() {
            assert_eq!(
                MetaRequest::parse(&good[..cut]),
                Err(MetaParseError::Truncated),
                "cut at {cut}"
            );
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            MetaRequest::parse(&trailing),
            Err(MetaParseError::TrailingBytes(1))
        );
        // Export name length past the data.
        assert_eq!(
            MetaRequest::parse(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]),
            Err(MetaParseError::Truncated)
        );
        // A query count of 4 billion with no queries behind it.
        assert_eq!(
            MetaRequest::parse(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(MetaParseError::Truncated)
        );
        // A query length past the data.
        let mut q = request(b"", &[b"base:allocation"]);
        q[11] = 200;
        assert_eq!(MetaRequest::parse(&q), Err(MetaParseError::Truncated));
        // A query over the spec's 4096-byte string limit.
        let long = vec![b'x'; 5000];
        assert_eq!(
            MetaRequest::parse(&request(b"", &[&long])),
            Err(MetaParseError::StringTooLong(5000))
        );
    }

    #[test]
    fn set_selects_only_the_full_name_and_list_also_wildcards() {
        let (none, wild) = (request(b"", &[]), request(b"", &[b"base:"]));
        let other = request(b"", &[b"qemu:allocation-depth", b"base:x"]);
        let none = MetaRequest::parse(&none).unwrap();
        assert!(!none.selects_base_allocation(false), "SET with no query");
        assert!(none.selects_base_allocation(true), "LIST with no query");
        let wild = MetaRequest::parse(&wild).unwrap();
        assert!(!wild.selects_base_allocation(false));
        assert!(wild.selects_base_allocation(true));
        let other = MetaRequest::parse(&other).unwrap();
        assert!(!other.selects_base_allocation(false));
        assert!(!other.selects_base_allocation(true));
    }

    /// A file of `size` bytes with data at the given ranges, as `Store::next_data` sees it.
    fn file(
        size: u64,
        data: &'static [(u64, u64)],
    ) -> impl FnMut(u64) -> Result<Option<(u64, u64)>, ()> {
        move |pos| {
            if pos >= size {
                return Ok(None);
            }
            Ok(data
                .iter()
                .find(|&&(_, e)| e > pos)
                .map(|&(s, e)| (s.max(pos), e)))
        }
    }

    fn ext(length: u32, flags: u32) -> Extent {
        Extent { length, flags }
    }

    #[test]
    fn extents_alternate_holes_and_data_and_stop_at_the_range_end() {
        let f = file(1 << 20, &[(4096, 12288), (65536, 131072)]);
        let e = allocation_extents(0, 1 << 20, false, MAX_EXTENTS, f).unwrap();
        assert_eq!(
            e,
            vec![
                ext(4096, HOLE),
                ext(8192, DATA),
                ext(65536 - 12288, HOLE),
                ext(65536, DATA),
                ext((1 << 20) - 131072, HOLE),
            ]
        );
        // A range starting inside data and ending inside a hole.
        let f = file(1 << 20, &[(4096, 12288), (65536, 131072)]);
        let e = allocation_extents(8192, 8192, false, MAX_EXTENTS, f).unwrap();
        assert_eq!(e, vec![ext(4096, DATA), ext(4096, HOLE)]);
    }

    #[test]
    fn req_one_gives_one_extent_within_the_request() {
        let f = file(1 << 20, &[(0, 1 << 20)]);
        let e = allocation_extents(512, 1000, true, MAX_EXTENTS, f).unwrap();
        assert_eq!(e, vec![ext(1000, DATA)]);
        let f = file(1 << 20, &[(4096, 8192)]);
        let e = allocation_extents(0, 1 << 20, true, MAX_EXTENTS, f).unwrap();
        assert_eq!(e, vec![ext(4096, HOLE)]);
    }

    #[test]
    fn extents_are_capped_and_cover_a_prefix() {
        let f = file(1 << 20, &[(4096, 8192), (12288, 16384), (20480, 24576)]);
        let e = allocation_extents(0, 1 << 20, false, 3, f).unwrap();
        assert_eq!(e, vec![ext(4096, HOLE), ext(4096, DATA), ext(4096, HOLE)]);
    }

    #[test]
    fn a_store_that_makes_no_progress_reads_as_data() {
        let e = allocation_extents(100, 50, false, MAX_EXTENTS, |_| Ok::<_, ()>(Some((0, 10))))
            .unwrap();
        assert_eq!(e, vec![ext(50, DATA)]);
    }

    #[test]
    fn store_errors_are_passed_on() {
        let r = allocation_extents(0, 10, false, MAX_EXTENTS, |_| {
            Err::<Option<(u64, u64)>, _>("eio")
        });
        assert_eq!(r, Err("eio"));
    }

    #[test]
    fn block_status_payload_layout() {
        let b = encode_block_status(7, &[ext(4096, HOLE), ext(512, DATA)]);
        assert_eq!(
            &b[..],
            &[0, 0, 0, 7, 0, 0, 16, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0]
        );
        let m = encode_meta_context(1, BASE_ALLOCATION);
        assert_eq!(&m[..4], &[0, 0, 0, 1]);
        assert_eq!(&m[4..], b"base:allocation");
    }
}
