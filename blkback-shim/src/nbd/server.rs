//! The NBD server: fixed-newstyle negotiation and the transmission phase.
//!
//! One task per connection reads requests; each request runs as its own task (so a client at
//! queue depth 16 gets 16 operations in flight) and sends its reply through a single writer task.
//! In-flight payload bytes per connection are bounded by a semaphore, so a hostile client cannot
//! make the server allocate without limit. Every protocol violation that leaves the stream in an
//! unknown state (bad magic, oversized write payload, unknown client flags) ends that connection
//! only; other clients are unaffected.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

use super::block_status::{
    encode_block_status, encode_meta_context, MetaRequest, BASE_ALLOCATION_ID, MAX_EXTENTS,
};
use super::proto::*;
use super::reply::{write_replies, Body, Reply};
use crate::volume::Volume;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Socket error (includes the client going away mid-message).
    #[error("connection i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke a MUST of the protocol; we hard-disconnect.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Export settings shared by all connections.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Export name (clients may also ask for the default export "").
    pub name: String,
    /// Human description returned by `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Maximum payload bytes in flight per connection.
    pub max_inflight_bytes: u32,
    /// Oldstyle handshake instead of fixed newstyle (no options, no export name): for clients
    /// that speak nothing else, such as tapdisk's `block-nbd.c`.
    pub oldstyle: bool,
    /// Every WRITE, WRITE_ZEROES and TRIM is handled as if it carried FUA: its reply comes only
    /// once it is durable on the local store and, mirrored, on the peer's. For clients that
    /// never send FLUSH or FUA (tapdisk) yet expect a completed write to survive a crash.
    pub write_through: bool,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            name: "xenft".into(),
            description: "xenft mirrored disk".into(),
            max_inflight_bytes: 128 * 1024 * 1024,
            oldstyle: false,
            write_through: false,
        }
    }
}

/// An NBD server for one export backed by a [`Volume`].
#[derive(Clone)]
pub struct NbdServer {
    volume: Arc<Volume>,
    cfg: Arc<ExportConfig>,
}

impl NbdServer {
    /// A server exporting `volume`.
    pub fn new(volume: Arc<Volume>, cfg: ExportConfig) -> Self {
        Self {
            volume,
            cfg: Arc::new(cfg),
        }
    }

    /// Accepts clients on a Unix socket until the listener fails.
    pub async fn serve_unix(&self, listener: UnixListener) -> std::io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.handle(stream).await {
                    info!(error = %e, "nbd client (unix) disconnected");
                }
            });
        }
    }

    /// Accepts clients on TCP until the listener fails.
    pub async fn serve_tcp(&self, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.handle(stream).await {
                    info!(%peer, error = %e, "nbd client disconnected");
                }
            });
        }
    }

    /// Serves one connection to its end.
    pub async fn handle<S>(&self, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut rd, wr) = tokio::io::split(stream);
        let mut wr = BufWriter::with_capacity(256 * 1024, wr);
        if self.cfg.oldstyle {
            let mut hello = BytesMut::with_capacity(152);
            hello.put_u64(NBDMAGIC);
            hello.put_u64(OLDSTYLE_MAGIC);
            hello.put_u64(self.volume.size());
            hello.put_u32(u32::from(self.transmission_flags()));
            hello.put_bytes(0, 124);
            wr.write_all(&hello).await?;
            wr.flush().await?;
            return self.transmission(rd, wr, Session::default()).await;
        }
        let Some(session) = self.negotiate(&mut rd, &mut wr).await? else {
            return Ok(());
        };
        self.transmission(rd, wr, session).await
    }

    fn transmission_flags(&self) -> u16 {
        NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_CAN_MULTI_CONN
    }

    fn name_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.cfg.name.as_bytes()
    }

    /// Handshake and option haggling. Returns what was negotiated when the client entered
    /// transmission, `None` when it aborted.
    async fn negotiate<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Option<Session>, NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut hello = BytesMut::with_capacity(18);
        hello.put_u64(NBDMAGIC);
        hello.put_u64(IHAVEOPT);
        hello.put_u16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        wr.write_all(&hello).await?;
        wr.flush().await?;
        let cflags = rd.read_u32().await?;
        if cflags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
            return Err(NbdError::Protocol(format!(
                "unknown client flags {cflags:#x}"
            )));
        }
        let no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES != 0;
        let mut session = Session::default();
        loop {
            let magic = rd.read_u64().await?;
            if magic != IHAVEOPT {
                return Err(NbdError::Protocol(format!("bad option magic {magic:#x}")));
            }
            let opt = rd.read_u32().await?;
            let len = rd.read_u32().await?;
            if len > MAX_OPTION_LEN {
                return Err(NbdError::Protocol(format!(
                    "option {opt} length {len} over {MAX_OPTION_LEN}"
                )));
            }
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data).await?;
            debug!(opt, len, "nbd option");
            match opt {
                NBD_OPT_EXPORT_NAME => {
                    if !self.name_matches(&data) {
                        return Err(NbdError::Protocol("unknown export name".into()));
                    }
                    let mut b = BytesMut::with_capacity(134);
                    b.put_u64(self.volume.size());
                    b.put_u16(self.transmission_flags());
                    if !no_zeroes {
                        b.put_bytes(0, 124);
                    }
                    wr.write_all(&b).await?;
                    wr.flush().await?;
                    return Ok(Some(session));
                }
                NBD_OPT_ABORT => {
                    send_opt_reply(wr, opt, NBD_REP_ACK, &[]).await?;
                    return Ok(None);
                }
                NBD_OPT_LIST => {
                    if !data.is_empty() {
                        send_opt_reply(wr, opt, NBD_REP_ERR_INVALID, b"LIST takes no data").await?;
                        continue;
                    }
                    let name = self.cfg.name.as_bytes();
                    let mut b = BytesMut::new();
                    b.put_u32(u32::try_from(name.len()).unwrap_or(0));
                    b.put_slice(name);
                    send_opt_reply(wr, opt, NBD_REP_SERVER, &b).await?;
                    send_opt_reply(wr, opt, NBD_REP_ACK, &[]).await?;
                }
                NBD_OPT_STRUCTURED_REPLY => {
                    if data.is_empty() {
                        session.structured = true;
                        send_opt_reply(wr, opt, NBD_REP_ACK, &[]).await?;
                    } else {
                        send_opt_reply(wr, opt, NBD_REP_ERR_INVALID, b"takes no data").await?;
                    }
                }
                NBD_OPT_INFO | NBD_OPT_GO => {
                    let Some((name, infos)) = parse_info_request(&data) else {
                        send_opt_reply(wr, opt, NBD_REP_ERR_INVALID, b"malformed INFO/GO").await?;
                        continue;
                    };
                    if !self.name_matches(name) {
                        send_opt_reply(wr, opt, NBD_REP_ERR_UNKNOWN, b"no such export").await?;
                        continue;
                    }
                    let mut b = BytesMut::new();
                    b.put_u16(NBD_INFO_EXPORT);
                    b.put_u64(self.volume.size());
                    b.put_u16(self.transmission_flags());
                    send_opt_reply(wr, opt, NBD_REP_INFO, &b).await?;
                    // Block size constraints are always sent so clients honour our 32 MiB cap.
                    let mut b = BytesMut::new();
                    b.put_u16(NBD_INFO_BLOCK_SIZE);
                    b.put_u32(1);
                    b.put_u32(4096);
                    b.put_u32(MAX_PAYLOAD);
                    send_opt_reply(wr, opt, NBD_REP_INFO, &b).await?;
                    for info in infos {
                        let text = match info {
                            NBD_INFO_NAME => self.cfg.name.as_bytes(),
                            NBD_INFO_DESCRIPTION => self.cfg.description.as_bytes(),
                            _ => continue,
                        };
                        let mut b = BytesMut::new();
                        b.put_u16(info);
                        b.put_slice(text);
                        send_opt_reply(wr, opt, NBD_REP_INFO, &b).await?;
                    }
                    send_opt_reply(wr, opt, NBD_REP_ACK, &[]).await?;
                    if opt == NBD_OPT_GO {
                        return Ok(Some(session));
                    }
                }
                NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                    self.meta_context_option(wr, opt, &data, &mut session)
                        .await?;
                }
                NBD_OPT_STARTTLS => {
                    send_opt_reply(wr, opt, NBD_REP_ERR_POLICY, b"TLS not offered").await?;
                }
                _ => {
                    send_opt_reply(wr, opt, NBD_REP_ERR_UNSUP, b"unsupported option").await?;
                }
            }
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`. Both need structured replies
    /// first; a SET replaces the selection even when it fails.
    async fn meta_context_option<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        opt: u32,
        data: &[u8],
        session: &mut Session,
    ) -> std::io::Result<()> {
        let setting = opt == NBD_OPT_SET_META_CONTEXT;
        if setting {
            session.base_allocation = false;
        }
        if !session.structured {
            let msg = b"negotiate structured replies first";
            return send_opt_reply(wr, opt, NBD_REP_ERR_INVALID, msg).await;
        }
        let req = match MetaRequest::parse(data) {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("malformed metadata context request: {e}");
                return send_opt_reply(wr, opt, NBD_REP_ERR_INVALID, msg.as_bytes()).await;
            }
        };
        if !self.name_matches(req.export) {
            return send_opt_reply(wr, opt, NBD_REP_ERR_UNKNOWN, b"no such export").await;
        }
        if req.selects_base_allocation(!setting) {
            // Ids in LIST replies are reserved (zero); SET gives the one BLOCK_STATUS uses.
            let id = if setting { BASE_ALLOCATION_ID } else { 0 };
            let reply = encode_meta_context(id, BASE_ALLOCATION);
            send_opt_reply(wr, opt, NBD_REP_META_CONTEXT, &reply).await?;
            session.base_allocation = setting;
        }
        send_opt_reply(wr, opt, NBD_REP_ACK, &[]).await
    }

    async fn transmission<R, W>(
        &self,
        mut rd: R,
        wr: BufWriter<W>,
        session: Session,
    ) -> Result<(), NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel::<Reply>(256);
        let writer = tokio::spawn(write_replies(wr, rx));
        let budget = Arc::new(Semaphore::new(self.cfg.max_inflight_bytes as usize));
        let size = self.volume.size();
        let structured = session.structured;
        let result = loop {
            let mut hb = [0u8; RequestHeader::LEN];
            match rd.read_exact(&mut hb).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e.into()),
            }
            let h = RequestHeader::decode(&hb);
            if h.magic != NBD_REQUEST_MAGIC {
                break Err(NbdError::Protocol(format!(
                    "bad request magic {:#x}",
                    h.magic
                )));
            }
            if h.typ == NBD_CMD_DISC {
                break Ok(());
            }
            let in_range = h
                .offset
                .checked_add(u64::from(h.length))
                .is_some_and(|end| end <= size);
            // The payload of a WRITE must be consumed before anything else can be parsed.
            let payload = if h.typ == NBD_CMD_WRITE {
                if h.length > MAX_PAYLOAD {
                    break Err(NbdError::Protocol(format!(
                        "write payload {} over the {MAX_PAYLOAD} byte cap",
                        h.length
                    )));
                }
                let Ok(permit) = budget.clone().acquire_many_owned(h.length.max(1)).await else {
                    break Ok(());
                };
                let want = h.length as usize;
                let mut data = BytesMut::with_capacity(want);
                let mut eof = false;
                while data.len() < want {
                    // read_buf fills spare capacity without zeroing it first.
                    match (&mut rd)
                        .take((want - data.len()) as u64)
                        .read_buf(&mut data)
                        .await
                    {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                if eof || data.len() < want {
                    break Err(NbdError::Protocol(
                        "client went away inside a write payload".into(),
                    ));
                }
                Some((data.freeze(), permit))
            } else {
                None
            };
            // Reads and block status answer in structured chunks when negotiated; the rest
            // in simple replies (they carry no data).
            let chunked = structured && matches!(h.typ, NBD_CMD_READ | NBD_CMD_BLOCK_STATUS);
            let reply_err = |errno: u32| Reply {
                cookie: h.cookie,
                structured: chunked,
                result: Err(errno),
                _budget: None,
            };
            let known_flags = match h.typ {
                NBD_CMD_READ | NBD_CMD_FLUSH => 0,
                NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
                NBD_CMD_WRITE | NBD_CMD_TRIM => NBD_CMD_FLAG_FUA,
                NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
                _ => {
                    warn!(typ = h.typ, "unknown nbd command");
                    if tx.send(reply_err(NBD_EINVAL)).await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
            };
            if h.flags & !known_flags != 0 {
                if tx.send(reply_err(NBD_EINVAL)).await.is_err() {
                    break Ok(());
                }
                continue;
            }
            let fua = h.flags & NBD_CMD_FLAG_FUA != 0 || self.cfg.write_through;
            match h.typ {
                NBD_CMD_READ if h.length > MAX_PAYLOAD => {
                    let e = if structured {
                        NBD_EOVERFLOW
                    } else {
                        NBD_EINVAL
                    };
                    if tx.send(reply_err(e)).await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
                // Without a selected context (which needs structured replies), with a zero
                // length (unspecified by the spec, refused) or past the end: EINVAL.
                NBD_CMD_BLOCK_STATUS if !session.base_allocation || h.length == 0 || !in_range => {
                    if tx.send(reply_err(NBD_EINVAL)).await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
                NBD_CMD_READ | NBD_CMD_TRIM if !in_range => {
                    if tx.send(reply_err(NBD_EINVAL)).await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
                NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES if !in_range => {
                    if tx.send(reply_err(NBD_ENOSPC)).await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
                _ => {}
            }
            let reply_bytes = match h.typ {
                NBD_CMD_READ => Some(h.length.max(1)),
                NBD_CMD_BLOCK_STATUS => Some(BLOCK_STATUS_REPLY_MAX),
                _ => None,
            };
            let permit = match reply_bytes {
                Some(n) => match budget.clone().acquire_many_owned(n).await {
                    Ok(p) => Some(p),
                    Err(_) => break Ok(()),
                },
                None => None,
            };
            // Unmirrored reads and writes: the blocking thread that does the I/O sends the
            // reply itself, one hand-off fewer per request than an async task awaiting it.
            if let (Some(store), NBD_CMD_WRITE) = (self.volume.local_store(), h.typ) {
                let tx = tx.clone();
                tokio::task::spawn_blocking(move || {
                    let result = match payload {
                        Some((data, _permit)) => {
                            Volume::write_local(&*store, h.offset, &data, fua).map(|()| Body::Empty)
                        }
                        None => Volume::read_local(&*store, h.offset, h.length)
                            .map(|d| Body::Data(h.offset, d)),
                    };
                    let _ = tx.blocking_send(Reply {
                        cookie: h.cookie,
                        structured: chunked,
                        result,
                        _budget: permit,
                    });
                });
                continue;
            }
            let vol = self.volume.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = match h.typ {
                    NBD_CMD_READ => vol
                        .read(h.offset, h.length)
                        .await
                        .map(|d| Body::Data(h.offset, d)),
                    NBD_CMD_WRITE => match payload {
                        Some((data, permit)) => {
                            let r = vol.write(h.offset, data, fua).await.map(|()| Body::Empty);
                            drop(permit);
                            r
                        }
                        None => Err(NBD_EINVAL),
                    },
                    NBD_CMD_FLUSH => vol.flush().await.map(|()| Body::Empty),
                    NBD_CMD_TRIM => vol
                        .zero(h.offset, u64::from(h.length), true, fua)
                        .await
                        .map(|()| Body::Empty),
                    NBD_CMD_BLOCK_STATUS => {
                        let req_one = h.flags & NBD_CMD_FLAG_REQ_ONE != 0;
                        let extents = vol.block_status(h.offset, h.length, req_one).await;
                        Ok(Body::Status(encode_block_status(
                            BASE_ALLOCATION_ID,
                            &extents,
                        )))
                    }
                    _ => {
                        let punch = h.flags & NBD_CMD_FLAG_NO_HOLE == 0;
                        vol.zero(h.offset, u64::from(h.length), punch, fua)
                            .await
                            .map(|()| Body::Empty)
                    }
                };
                let _ = tx
                    .send(Reply {
                        cookie: h.cookie,
                        structured: chunked,
                        result,
                        _budget: permit,
                    })
                    .await;
            });
        };
        // Soft or hard disconnect: let in-flight requests finish and their replies go out.
        drop(tx);
        match writer.await {
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(e)) => debug!(error = %e, "reply writer ended"),
        }
        result
    }
}

/// What a connection negotiated before transmission.
#[derive(Debug, Default, Clone, Copy)]
struct Session {
    /// `NBD_OPT_STRUCTURED_REPLY` was accepted.
    structured: bool,
    /// The last `NBD_OPT_SET_META_CONTEXT` selected `base:allocation`.
    base_allocation: bool,
}

/// Most bytes one block status reply takes (context id and `MAX_EXTENTS` descriptors),
/// counted against the connection's in-flight budget like read data.
#[allow(clippy::cast_possible_truncation)] // 4 + 8 * 2^16
const BLOCK_STATUS_REPLY_MAX: u32 = 4 + 8 * MAX_EXTENTS as u32;

async fn send_opt_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opt: u32,
    reply: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(data.len()).unwrap_or(0);
    wr.write_all(&option_reply(opt, reply, len)).await?;
    wr.write_all(data).await?;
    wr.flush().await
}

/// Parses the `NBD_OPT_INFO`/`NBD_OPT_GO` payload: u32 name length, name, u16 count, count u16s.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = usize::try_from(u32::from_be_bytes(data.get(0..4)?.try_into().ok()?)).ok()?;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let n = usize::from(u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?));
    let items = rest.get(2..)?;
    if items.len() != n * 2 {
        return None;
    }
    let infos = items
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, infos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parses_and_rejects_bad_lengths() {
        let mut d = vec![0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3];
        let (n, i) = parse_info_request(&d).unwrap();
        assert_eq!(n, b"ab");
        assert_eq!(i, vec![3]);
        d.push(0);
        assert!(parse_info_request(&d).is_none());
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0]).is_none());
        assert!(parse_info_request(&[]).is_none());
    }
}
