//! The transmission phase's replies: simple replies, and structured chunks (`OFFSET_DATA`,
//! `NONE`, `BLOCK_STATUS`, `ERROR`) when the client negotiated them ("Simple reply message",
//! "Structured reply chunk message" in `doc/proto.md`). One writer task per connection encodes
//! them and flushes once per batch.

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use super::proto::*;

/// The successful outcome of one request.
pub(super) enum Body {
    /// No payload (write, flush, trim, zero).
    Empty,
    /// Read data and its offset.
    Data(u64, Bytes),
    /// An encoded `NBD_REPLY_TYPE_BLOCK_STATUS` payload.
    Status(Bytes),
}

/// A reply to one request.
pub(super) struct Reply {
    pub(super) cookie: u64,
    pub(super) structured: bool,
    pub(super) result: Result<Body, u32>,
    /// Read data counts against the connection's in-flight budget until it is written out,
    /// so a client that does not read its replies cannot make us buffer without limit.
    pub(super) _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

pub(super) async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: BufWriter<W>,
    mut rx: mpsc::Receiver<Reply>,
) -> std::io::Result<()> {
    while let Some(r) = rx.recv().await {
        encode_reply(&mut wr, r).await?;
        while let Ok(r) = rx.try_recv() {
            encode_reply(&mut wr, r).await?;
        }
        wr.flush().await?;
    }
    wr.flush().await?;
    wr.shutdown().await
}

async fn encode_reply<W: AsyncWrite + Unpin>(wr: &mut W, r: Reply) -> std::io::Result<()> {
    match (r.structured, r.result) {
        (false, Ok(body)) => {
            wr.write_all(&simple_reply(0, r.cookie)).await?;
            if let Body::Data(_, d) = body {
                wr.write_all(&d).await?;
            }
        }
        (false, Err(errno)) => wr.write_all(&simple_reply(errno, r.cookie)).await?,
        (true, Ok(Body::Status(payload))) => {
            let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
            wr.write_all(&structured_chunk(
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_BLOCK_STATUS,
                r.cookie,
                len,
            ))
            .await?;
            wr.write_all(&payload).await?;
        }
        (true, Ok(Body::Data(_, d))) if d.is_empty() => {
            // A zero-length read: an OFFSET_DATA chunk must carry data, so just finish.
            wr.write_all(&structured_chunk(
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_NONE,
                r.cookie,
                0,
            ))
            .await?;
        }
        (true, Ok(Body::Data(offset, d))) => {
            let len = u32::try_from(d.len() + 8).unwrap_or(u32::MAX);
            wr.write_all(&structured_chunk(
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_OFFSET_DATA,
                r.cookie,
                len,
            ))
            .await?;
            wr.write_all(&offset.to_be_bytes()).await?;
            wr.write_all(&d).await?;
        }
        (true, Ok(Body::Empty)) => {
            wr.write_all(&structured_chunk(
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_NONE,
                r.cookie,
                0,
            ))
            .await?;
        }
        (true, Err(errno)) => {
            let msg = errno_message(errno).as_bytes();
            let len = u32::try_from(6 + msg.len()).unwrap_or(6);
            wr.write_all(&structured_chunk(
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_ERROR,
                r.cookie,
                len,
            ))
            .await?;
            wr.write_all(&errno.to_be_bytes()).await?;
            wr.write_all(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes())
                .await?;
            wr.write_all(msg).await?;
        }
    }
    Ok(())
}

fn errno_message(errno: u32) -> &'static str {
    match errno {
        NBD_EINVAL => "invalid request (flags, range or command)",
        NBD_ENOSPC => "write beyond the end of the export",
        NBD_EOVERFLOW => "request larger than the maximum block size",
        NBD_EIO => "i/o error on both copies",
        NBD_EPERM => "operation not permitted",
        NBD_ENOMEM => "out of memory",
        NBD_ENOTSUP => "not supported",
        NBD_ESHUTDOWN => "server shutting down",
        _ => "error",
    }
}
