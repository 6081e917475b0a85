//! The xenstore wire protocol (xen `docs/misc/xenstore.txt`), the thin layer that gives us
//! transactions over xenstored's socket, plus a small server exposing a [`MemStore`] with the
//! same protocol (so the xenstore-rs backend is tested against real protocol bytes).
//!
//! ```text
//! struct xsd_sockmsg {
//!     uint32_t type;   /* XS_READ, XS_WRITE, ... */
//!     uint32_t req_id; /* echoed in the daemon's response */
//!     uint32_t tx_id;  /* transaction id, 0 if none */
//!     uint32_t len;    /* payload length, at most XENSTORE_PAYLOAD_MAX (4096) */
//! };                   /* native byte order, followed by the payload */
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Mutex};

use super::memory::MemStore;
use super::{TxId, WatchEvents, XenStore, XsError, MAX_PAYLOAD};

/// Message types used here (numbering of `xs_wire.h`).
#[allow(missing_docs)]
pub mod kind {
    pub const DIRECTORY: u32 = 1;
    pub const READ: u32 = 2;
    pub const WATCH: u32 = 4;
    pub const UNWATCH: u32 = 5;
    pub const TRANSACTION_START: u32 = 6;
    pub const TRANSACTION_END: u32 = 7;
    pub const WRITE: u32 = 11;
    pub const MKDIR: u32 = 12;
    pub const RM: u32 = 13;
    pub const WATCH_EVENT: u32 = 15;
    pub const ERROR: u32 = 16;
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    /// Message type.
    pub kind: u32,
    /// Request id.
    pub req_id: u32,
    /// Transaction id (0: none).
    pub tx_id: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Reads one message (payload bounded by [`MAX_PAYLOAD`]).
///
/// # Errors
/// [`XsError::Io`] or [`XsError::Protocol`] for an oversized payload.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Msg, XsError> {
    let mut h = [0u8; 16];
    r.read_exact(&mut h).await?;
    let word = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let len = usize::try_from(word(12)).map_err(|_| XsError::Protocol("length".into()))?;
    if len > MAX_PAYLOAD {
        return Err(XsError::Protocol(format!("payload of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Msg {
        kind: word(0),
        req_id: word(4),
        tx_id: word(8),
        payload,
    })
}

/// Writes one message.
///
/// # Errors
/// [`XsError`].
pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, m: &Msg) -> Result<(), XsError> {
    if m.payload.len() > MAX_PAYLOAD {
        return Err(XsError::Invalid(format!(
            "payload of {} bytes",
            m.payload.len()
        )));
    }
    let len = u32::try_from(m.payload.len()).map_err(|_| XsError::Invalid("length".into()))?;
    let mut buf = Vec::with_capacity(16 + m.payload.len());
    for v in [m.kind, m.req_id, m.tx_id, len] {
        buf.extend_from_slice(&v.to_ne_bytes());
    }
    buf.extend_from_slice(&m.payload);
    w.write_all(&buf).await?;
    Ok(())
}

fn nul_list(parts: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p.as_bytes());
        v.push(0);
    }
    v
}

fn split_nul(p: &[u8]) -> Vec<String> {
    let p = p.strip_suffix(&[0]).unwrap_or(p);
    if p.is_empty() {
        return Vec::new();
    }
    p.split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn error_of(payload: &[u8], path: &str) -> XsError {
    let code = split_nul(payload).into_iter().next().unwrap_or_default();
    match code.as_str() {
        "EAGAIN" => XsError::Again,
        "ENOENT" => XsError::NotFound(path.to_string()),
        "EINVAL" => XsError::Invalid(path.to_string()),
        _ => XsError::Other(code),
    }
}

/// A protocol client on its own connection, one request at a time (no watches: those go
/// through xenstore-rs).
pub struct WireClient {
    conn: Mutex<UnixStream>,
    next: AtomicU32,
}

impl WireClient {
    /// Connects to xenstored's socket (usually `/run/xenstored/socket`).
    ///
    /// # Errors
    /// [`XsError::Io`].
    pub async fn connect(path: &Path) -> Result<Self, XsError> {
        Ok(Self {
            conn: Mutex::new(UnixStream::connect(path).await?),
            next: AtomicU32::new(1),
        })
    }

    async fn call(
        &self,
        kind: u32,
        tx: Option<TxId>,
        payload: Vec<u8>,
        path: &str,
    ) -> Result<Msg, XsError> {
        let req_id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut c = self.conn.lock().await;
        write_msg(
            &mut *c,
            &Msg {
                kind,
                req_id,
                tx_id: tx.map_or(0, |t| t.0),
                payload,
            },
        )
        .await?;
        loop {
            let m = read_msg(&mut *c).await?;
            if m.kind == kind::WATCH_EVENT {
                continue; // not ours: this connection registers no watches
            }
            if m.req_id != req_id {
                return Err(XsError::Protocol(format!(
                    "reply to request {} while waiting for {req_id}",
                    m.req_id
                )));
            }
            if m.kind == kind::ERROR {
                return Err(error_of(&m.payload, path));
            }
            if m.kind != kind {
                return Err(XsError::Protocol(format!(
                    "reply of type {} to type {kind}",
                    m.kind
                )));
            }
            return Ok(m);
        }
    }
}

impl XenStore for WireClient {
    async fn read(&self, tx: Option<TxId>, path: &str) -> Result<Option<String>, XsError> {
        super::check_path(path)?;
        match self.call(kind::READ, tx, nul_list(&[path]), path).await {
            Ok(m) => Ok(Some(
                String::from_utf8_lossy(m.payload.strip_suffix(&[0]).unwrap_or(&m.payload))
                    .into_owned(),
            )),
            Err(XsError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn write(&self, tx: Option<TxId>, path: &str, value: &str) -> Result<(), XsError> {
        super::check_path(path)?;
        let mut p = nul_list(&[path]);
        p.extend_from_slice(value.as_bytes());
        self.call(kind::WRITE, tx, p, path).await.map(|_| ())
    }

    async fn rm(&self, tx: Option<TxId>, path: &str) -> Result<(), XsError> {
        super::check_path(path)?;
        match self.call(kind::RM, tx, nul_list(&[path]), path).await {
            Ok(_) | Err(XsError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn directory(&self, tx: Option<TxId>, path: &str) -> Result<Vec<String>, XsError> {
        super::check_path(path)?;
        let m = self
            .call(kind::DIRECTORY, tx, nul_list(&[path]), path)
            .await?;
        Ok(split_nul(&m.payload))
    }

    async fn begin(&self) -> Result<TxId, XsError> {
        let m = self
            .call(kind::TRANSACTION_START, None, vec![0], "")
            .await?;
        let id = split_nul(&m.payload).into_iter().next().unwrap_or_default();
        id.parse()
            .map(TxId)
            .map_err(|_| XsError::Protocol(format!("transaction id {id:?}")))
    }

    async fn end(&self, tx: TxId, commit: bool) -> Result<(), XsError> {
        let p = nul_list(&[if commit { "T" } else { "F" }]);
        self.call(kind::TRANSACTION_END, Some(tx), p, "")
            .await
            .map(|_| ())
    }

    async fn watch(&self, _path: &str) -> Result<WatchEvents, XsError> {
        Err(XsError::Other(
            "watches go through the xenstore-rs connection".into(),
        ))
    }
}

/// Serves a [`MemStore`] with the xenstore protocol on a Unix socket until `stop` changes.
pub async fn serve_memstore(
    store: MemStore,
    listener: UnixListener,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            acc = listener.accept() => {
                let Ok((sock, _)) = acc else { continue };
                let (store, stop) = (store.clone(), stop.clone());
                tokio::spawn(serve_conn(store, sock, stop));
            }
        }
    }
}

async fn serve_conn(store: MemStore, sock: UnixStream, mut stop: watch::Receiver<bool>) {
    let (mut rd, mut wr) = sock.into_split();
    let (out_tx, mut out_rx) = mpsc::channel::<Msg>(256);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if write_msg(&mut wr, &m).await.is_err() {
                return;
            }
        }
    });
    let mut watches: Vec<(String, String, tokio::task::JoinHandle<()>)> = Vec::new();
    loop {
        let m = tokio::select! {
            _ = stop.changed() => break,
            m = read_msg(&mut rd) => match m { Ok(m) => m, Err(_) => break },
        };
        let tx = (m.tx_id != 0).then_some(TxId(m.tx_id));
        let args = split_nul(&m.payload);
        let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
        let reply: Result<Vec<u8>, XsError> = match m.kind {
            kind::READ => store.read(tx, &arg(0)).await.and_then(|v| {
                v.map(String::into_bytes)
                    .ok_or_else(|| XsError::NotFound(arg(0)))
            }),
            kind::WRITE | kind::MKDIR => {
                let path = arg(0);
                let value = m
                    .payload
                    .iter()
                    .position(|&b| b == 0)
                    .map(|i| String::from_utf8_lossy(&m.payload[i + 1..]).into_owned())
                    .unwrap_or_default();
                store
                    .write(tx, &path, &value)
                    .await
                    .map(|()| b"OK\0".to_vec())
            }
            kind::RM => store.rm(tx, &arg(0)).await.map(|()| b"OK\0".to_vec()),
            kind::DIRECTORY => store.directory(tx, &arg(0)).await.map(|d| {
                let refs: Vec<&str> = d.iter().map(String::as_str).collect();
                nul_list(&refs)
            }),
            kind::TRANSACTION_START => store.begin().await.map(|t| nul_list(&[&t.0.to_string()])),
            kind::TRANSACTION_END => match tx {
                Some(t) => store.end(t, arg(0) == "T").await.map(|()| b"OK\0".to_vec()),
                None => Err(XsError::Invalid("no transaction".into())),
            },
            kind::WATCH if watches.len() < 128 => match store.watch(&arg(0)).await {
                Ok(mut events) => {
                    let (path, token) = (arg(0), arg(1));
                    let out = out_tx.clone();
                    let tok = token.clone();
                    // The reply must precede the first event.
                    let _ = out
                        .send(Msg {
                            kind: kind::WATCH,
                            req_id: m.req_id,
                            tx_id: 0,
                            payload: b"OK\0".to_vec(),
                        })
                        .await;
                    let task = tokio::spawn(async move {
                        while let Some(p) = events.recv().await {
                            let ev = Msg {
                                kind: kind::WATCH_EVENT,
                                req_id: 0,
                                tx_id: 0,
                                payload: nul_list(&[&p, &tok]),
                            };
                            if out.send(ev).await.is_err() {
                                return;
                            }
                        }
                    });
                    watches.push((path, token, task));
                    continue;
                }
                Err(e) => Err(e),
            },
            kind::UNWATCH => {
                let (path, token) = (arg(0), arg(1));
                if let Some(i) = watches
                    .iter()
                    .position(|(p, t, _)| *p == path && *t == token)
                {
                    watches.remove(i).2.abort();
                    Ok(b"OK\0".to_vec())
                } else {
                    Err(XsError::NotFound(path))
                }
            }
            _ => Err(XsError::Invalid(format!("type {}", m.kind))),
        };
        let (kind_out, payload) = match reply {
            Ok(p) => (m.kind, p),
            Err(e) => {
                let code = match e {
                    XsError::Again => "EAGAIN",
                    XsError::NotFound(_) => "ENOENT",
                    XsError::Invalid(_) => "EINVAL",
                    _ => "EIO",
                };
                (kind::ERROR, nul_list(&[code]))
            }
        };
        if out_tx
            .send(Msg {
                kind: kind_out,
                req_id: m.req_id,
                tx_id: m.tx_id,
                payload,
            })
            .await
            .is_err()
        {
            break;
        }
    }
    for (_, _, t) in watches {
        t.abort();
    }
    drop(out_tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_round_trip_and_oversized_payloads_are_refused() {
        let m = Msg {
            kind: kind::WRITE,
            req_id: 9,
            tx_id: 3,
            payload: b"/a\0b".to_vec(),
        };
        let mut buf = Vec::new();
        write_msg(&mut buf, &m).await.unwrap();
        assert_eq!(read_msg(&mut &buf[..]).await.unwrap(), m);
        let mut bad = buf.clone();
        bad[12..16].copy_from_slice(&100_000u32.to_ne_bytes());
        assert!(matches!(
            read_msg(&mut &bad[..]).await,
            Err(XsError::Protocol(_))
        ));
    }
}
