//! A minimal NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies).
//!
//! Used by tests (hand-crafted malformed requests, logging acknowledged writes) and the
//! benchmarks (random writes at a queue depth, [`pipelined_writes`]). Not a general client.

use std::path::Path;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use super::proto::*;

/// Client-side failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error or server hang-up.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server said something unexpected.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server answered an option with an error reply type.
    #[error("option {option} refused with reply type {reply:#x}")]
    OptionRefused {
        /// Option sent.
        option: u32,
        /// Reply type received.
        reply: u32,
    },
    /// The server answered a command with an NBD error.
    #[error("command failed with NBD error {0}")]
    Nbd(u32),
}

/// A connected client in transmission phase.
pub struct NbdClient<S> {
    stream: S,
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    cookie: u64,
}

impl NbdClient<UnixStream> {
    /// Connects to a Unix socket and negotiates `export` with `NBD_OPT_GO`.
    pub async fn connect_unix(path: &Path, export: &str) -> Result<Self, ClientError> {
        Self::handshake(UnixStream::connect(path).await?, export).await
    }
}

/// Sends one option and reads the replies up to `NBD_REP_ACK` or an error; returns the
/// payloads of the `NBD_REP_INFO`, `NBD_REP_SERVER` and `NBD_REP_META_CONTEXT` replies.
pub async fn send_option<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> Result<Vec<Bytes>, ClientError> {
    let mut b = BytesMut::new();
    b.put_u64(IHAVEOPT);
    b.put_u32(option);
    b.put_u32(u32::try_from(data.len()).unwrap_or(0));
    b.put_slice(data);
    s.write_all(&b).await?;
    let mut infos = Vec::new();
    loop {
        let magic = s.read_u64().await?;
        let opt = s.read_u32().await?;
        let reply = s.read_u32().await?;
        let len = s.read_u32().await?;
        if magic != NBD_REP_MAGIC || opt != option || len > MAX_OPTION_LEN {
            return Err(ClientError::Protocol(format!(
                "bad option reply {magic:#x} {opt} {len}"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await?;
        match reply {
            NBD_REP_ACK => return Ok(infos),
            NBD_REP_INFO | NBD_REP_SERVER | NBD_REP_META_CONTEXT => {
                infos.push(Bytes::from(payload));
            }
            r => return Err(ClientError::OptionRefused { option, reply: r }),
        }
    }
}

/// Reads the server greeting and sends client flags (fixed newstyle, no zeroes).
pub async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<(), ClientError> {
    let magic = s.read_u64().await?;
    let opt = s.read_u64().await?;
    let _flags = s.read_u16().await?;
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(ClientError::Protocol("not a newstyle NBD server".into()));
    }
    s.write_u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
        .await?;
    Ok(())
}

impl<S: AsyncRead + AsyncWrite + Unpin> NbdClient<S> {
    /// Negotiates `export` over an established stream.
    pub async fn handshake(mut stream: S, export: &str) -> Result<Self, ClientError> {
        greet(&mut stream).await?;
        let mut d = BytesMut::new();
        d.put_u32(u32::try_from(export.len()).unwrap_or(0));
        d.put_slice(export.as_bytes());
        d.put_u16(0);
        let infos = send_option(&mut stream, NBD_OPT_GO, &d).await?;
        let mut size = None;
        let mut flags = 0;
        for i in infos {
            if i.len() == 12 && i[0..2] == NBD_INFO_EXPORT.to_be_bytes() {
                size = Some(u64::from_be_bytes(i[2..10].try_into().unwrap_or_default()));
                flags = u16::from_be_bytes([i[10], i[11]]);
            }
        }
        let size = size.ok_or_else(|| ClientError::Protocol("no NBD_INFO_EXPORT".into()))?;
        Ok(Self {
            stream,
            size,
            flags,
            cookie: 0,
        })
    }

    /// Sends one request and waits for its simple reply; returns the NBD error (0 = success)
    /// and, for successful reads, the data.
    pub async fn request(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<(u32, Bytes), ClientError> {
        self.cookie += 1;
        let h = RequestHeader {
            magic: NBD_REQUEST_MAGIC,
            flags,
            typ,
            cookie: self.cookie,
            offset,
            length,
        };
        self.stream.write_all(&h.encode()).await?;
        self.stream.write_all(payload).await?;
        self.stream.flush().await?;
        let magic = self.stream.read_u32().await?;
        let error = self.stream.read_u32().await?;
        let cookie = self.stream.read_u64().await?;
        if magic != NBD_SIMPLE_REPLY_MAGIC || cookie != self.cookie {
            return Err(ClientError::Protocol(format!(
                "bad reply magic {magic:#x} or cookie {cookie}"
            )));
        }
        let mut data = BytesMut::new();
        if typ == NBD_CMD_READ && error == 0 {
            data.resize(length as usize, 0);
            self.stream.read_exact(&mut data).await?;
        }
        Ok((error, data.freeze()))
    }

    fn check((e, d): (u32, Bytes)) -> Result<Bytes, ClientError> {
        if e == 0 {
            Ok(d)
        } else {
            Err(ClientError::Nbd(e))
        }
    }

    /// Reads.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        Self::check(self.request(NBD_CMD_READ, 0, offset, len, &[]).await?)
    }

    /// Writes (FUA if asked).
    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len()).map_err(|_| ClientError::Nbd(NBD_EINVAL))?;
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
        Self::check(
            self.request(NBD_CMD_WRITE, flags, offset, len, data)
                .await?,
        )
        .map(|_| ())
    }

    /// Flushes.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        Self::check(self.request(NBD_CMD_FLUSH, 0, 0, 0, &[]).await?).map(|_| ())
    }

    /// Sends `NBD_CMD_DISC` and closes.
    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        let h = RequestHeader {
            magic: NBD_REQUEST_MAGIC,
            flags: 0,
            typ: NBD_CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        self.stream.write_all(&h.encode()).await?;
        self.stream.shutdown().await?;
        Ok(())
    }

    /// The raw stream (for sending garbage in tests).
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Consumes the client, returning the stream.
    pub fn into_stream(self) -> S {
        self.stream
    }
}

/// Issues `count` writes of `block` bytes at offsets from `offsets` with `depth` requests in
/// flight (one connection, pipelined), then a flush. Returns the elapsed seconds.
pub async fn pipelined_writes<S>(
    client: NbdClient<S>,
    offsets: Vec<u64>,
    block: u32,
    depth: usize,
) -> Result<f64, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pipelined(client, NBD_CMD_WRITE, offsets, block, depth).await
}

/// Issues reads of `block` bytes at `offsets` with `depth` requests in flight (one connection,
/// pipelined, simple replies). Returns the elapsed seconds.
pub async fn pipelined_reads<S>(
    client: NbdClient<S>,
    offsets: Vec<u64>,
    block: u32,
    depth: usize,
) -> Result<f64, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pipelined(client, NBD_CMD_READ, offsets, block, depth).await
}

/// Writes (then a flush) or reads at `offsets`, `depth` in flight.
async fn pipelined<S>(
    client: NbdClient<S>,
    typ: u16,
    offsets: Vec<u64>,
    block: u32,
    depth: usize,
) -> Result<f64, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let writing = typ == NBD_CMD_WRITE;
    let (mut rd, mut wr) = tokio::io::split(client.stream);
    let data = vec![0x5au8; block as usize];
    // Replies to read: one per request, plus the final flush's when writing.
    let replies = offsets.len() + usize::from(writing);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(depth.max(1));
    let start = std::time::Instant::now();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; if writing { 0 } else { block as usize }];
        for _ in 0..replies {
            let magic = rd.read_u32().await?;
            let error = rd.read_u32().await?;
            let cookie = rd.read_u64().await?;
            if magic != NBD_SIMPLE_REPLY_MAGIC || error != 0 {
                return Err(ClientError::Protocol(format!(
                    "reply magic {magic:#x} error {error}"
                )));
            }
            if !writing {
                rd.read_exact(&mut buf).await?;
            }
            if cookie != u64::MAX && rx.recv().await.is_none() {
                break;
            }
        }
        Ok::<_, ClientError>(())
    });
    for (i, off) in offsets.iter().enumerate() {
        if tx.send(()).await.is_err() {
            break;
        }
        let h = RequestHeader {
            magic: NBD_REQUEST_MAGIC,
            flags: 0,
            typ,
            cookie: i as u64,
            offset: *off,
            length: block,
        };
        wr.write_all(&h.encode()).await?;
        if writing {
            wr.write_all(&data).await?;
        }
    }
    if writing {
        let h = RequestHeader {
            magic: NBD_REQUEST_MAGIC,
            flags: 0,
            typ: NBD_CMD_FLUSH,
            cookie: u64::MAX,
            offset: 0,
            length: 0,
        };
        wr.write_all(&h.encode()).await?;
    }
    wr.flush().await?;
    drop(tx);
    reader
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))??;
    Ok(start.elapsed().as_secs_f64())
}
