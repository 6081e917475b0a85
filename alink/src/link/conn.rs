//! One TCP connection of a path lane: dialing or accepting it, the authenticated handshake,
//! and the reader and writer tasks that run it until it fails or is replaced.
//!
//! Handshake: the dialer sends Hello (path, lane, session, nonce, its name, the name it
//! expects) under the pool secret; the acceptor checks names and path and answers HelloAck
//! (its session and nonce, echoing the dialer's nonce). Both derive the connection key as
//! MAC(secret key, "xenft-alink-conn-v2" | dialer nonce | acceptor nonce), so frames of one
//! connection cannot be replayed on another.

use super::*;

pub(super) async fn dial_loop(sh: Arc<Shared>, conn: usize) {
    let mut stop = sh.shutdown.subscribe();
    let path = conn / LANES;
    let pc = sh.cfg.paths[path].clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let attempt = async {
            let sock = if pc.peer.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(|e| e.to_string())?;
            sock.bind(SocketAddr::new(pc.local.ip(), 0))
                .map_err(|e| format!("bind {}: {e}", pc.local.ip()))?;
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(pc.peer))
                .await
                .map_err(|_| "connect timeout".to_string())?
                .map_err(|e| format!("connect {}: {e}", pc.peer))?;
            Ok::<_, String>(stream)
        };
        let res = tokio::select! {
            r = attempt => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match res {
            Ok(stream) => match handshake_dial(&sh, conn, stream).await {
                Ok((stream, key, peer_session)) => {
                    run_connection(&sh, conn, stream, key, peer_session).await;
                }
                Err(e) => {
                    bump(&sh.counters.handshake_failures, 1);
                    tracing::debug!(path, error = %e, "A-link handshake failed");
                }
            },
            Err(e) => tracing::trace!(path, error = %e, "A-link dial failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(sh.cfg.reconnect_interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

pub(super) async fn accept_loop(sh: Arc<Shared>, path: usize, listener: TcpListener) {
    let mut stop = sh.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, from)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let sh = sh.clone();
        tokio::spawn(async move {
            match handshake_accept(&sh, path, stream).await {
                Ok((stream, key, peer_session, lane)) => {
                    run_connection(&sh, path * LANES + lane, stream, key, peer_session).await;
                }
                Err(e) => {
                    bump(&sh.counters.handshake_failures, 1);
                    tracing::debug!(path, %from, error = %e, "A-link handshake refused");
                }
            }
        });
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    // Names are validated to at most 255 bytes.
    out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(&name.as_bytes()[..name.len().min(255)]);
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if buf.len() < n {
        return Err("short handshake payload".into());
    }
    let (a, b) = buf.split_at(n);
    *buf = b;
    Ok(a)
}

fn take_name(buf: &mut &[u8]) -> Result<String, String> {
    let n = usize::from(take(buf, 1)?[0]);
    String::from_utf8(take(buf, n)?.to_vec()).map_err(|_| "host name is not UTF-8".to_string())
}

fn take_u64(buf: &mut &[u8]) -> Result<u64, String> {
    let mut b = [0u8; 8];
    b.copy_from_slice(take(buf, 8)?);
    Ok(u64::from_be_bytes(b))
}

fn conn_key(secret: &[u8], nonce_d: &[u8; 16], nonce_a: &[u8; 16]) -> FrameMac {
    let k = keyed(secret).tag_of(&[b"xenft-alink-conn-v2", nonce_d, nonce_a]);
    keyed(&k)
}

/// Reads one frame. `max_len` caps the payload from the header alone (the handshake allows
/// only control-sized frames, so an unauthenticated peer cannot make us allocate a fragment).
async fn read_frame(
    stream: &mut (impl AsyncReadExt + Unpin),
    key: &FrameMac,
    max_len: usize,
) -> Result<Frame, ReadError> {
    let mut h = [0u8; HEADER_LEN];
    stream.read_exact(&mut h).await.map_err(ReadError::Io)?;
    let header = decode_header(&h).map_err(ReadError::Frame)?;
    if header.len > max_len {
        return Err(ReadError::Frame(FrameError::TooLong {
            len: u32::try_from(header.len).unwrap_or(u32::MAX),
            max: max_len,
        }));
    }
    // Read straight into spare capacity: no zeroing of a fragment we are about to overwrite.
    // The MAC is computed as the payload arrives, so little of it is left once the last byte
    // is in; nothing of the frame is used before the tag is verified. It is fed up to the
    // last MAC_RUN boundary of the MAC'd bytes (header included), never up to wherever a
    // read happened to end: BLAKE3 then hashes whole aligned subtrees at full SIMD width,
    // whereas a run cut at an arbitrary point makes the next one restart with subtrees of
    // 1, 2, 4, ... chunks (measured: ~20 % slower over a 1 MiB fragment read in 40-200 KiB
    // pieces).
    let want = header.len + MAC_LEN;
    let mut body = BytesMut::with_capacity(want);
    let mut mac = key.start();
    mac.update(&h);
    let mut hashed = 0;
    while body.len() < want {
        let mut limited = (&mut *stream).take((want - body.len()) as u64);
        match limited.read_buf(&mut body).await {
            Ok(0) => {
                return Err(ReadError::Frame(FrameError::Truncated(want - body.len())));
            }
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
        let avail = body.len().min(header.len);
        let end = mac_run_end(avail);
        if end > hashed {
            mac.update(&body[hashed..end]);
            hashed = end;
        }
    }
    mac.update(&body[hashed..header.len]);
    let tag = body.split_off(header.len);
    if !mac.verify(&tag) {
        return Err(ReadError::Frame(FrameError::BadMac));
    }
    Ok(Frame {
        kind: header.kind,
        channel: header.channel,
        flags: header.flags,
        seq: header.seq,
        payload: body.freeze(),
    })
}

enum ReadError {
    Io(std::io::Error),
    Frame(FrameError),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::Frame(e) => write!(f, "{e}"),
        }
    }
}

type Handshaken = (TcpStream, FrameMac, u64);

async fn handshake_dial(sh: &Shared, conn: usize, mut s: TcpStream) -> Result<Handshaken, String> {
    let path = conn / LANES;
    let _ = s.set_nodelay(true);
    let mut nonce_d = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut nonce_d);
    let mut p = Vec::new();
    p.extend_from_slice(&u16::try_from(path).unwrap_or(u16::MAX).to_be_bytes());
    p.push(u8::try_from(conn % LANES).unwrap_or(u8::MAX));
    p.extend_from_slice(&sh.session.to_be_bytes());
    p.extend_from_slice(&nonce_d);
    put_name(&mut p, &sh.cfg.local_host);
    put_name(&mut p, &sh.cfg.peer_host);
    let hello = control_frame(Kind::Hello, Channel::Control, 0, Bytes::from(p));
    let work = async {
        s.write_all(&frame::encode(&sh.secret_key, &hello))
            .await
            .map_err(|e| e.to_string())?;
        let f = read_frame(&mut s, &sh.secret_key, frame::MAX_CONTROL_PAYLOAD)
            .await
            .map_err(|e| {
                if let ReadError::Frame(fe) = &e {
                    sh.reject(path, fe);
                }
                e.to_string()
            })?;
        if f.kind != Kind::HelloAck {
            return Err(format!("expected HelloAck, got {:?}", f.kind));
        }
        let mut b = &f.payload[..];
        let peer_session = take_u64(&mut b)?;
        let mut nonce_a = [0u8; 16];
        nonce_a.copy_from_slice(take(&mut b, 16)?);
        if take(&mut b, 16)? != nonce_d {
            return Err("HelloAck does not echo our nonce (replay?)".into());
        }
        Ok((peer_session, nonce_a))
    };
    let (peer_session, nonce_a) = tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| "handshake timeout".to_string())??;
    Ok((
        s,
        conn_key(&sh.cfg.secret, &nonce_d, &nonce_a),
        peer_session,
    ))
}

async fn handshake_accept(
    sh: &Shared,
    path: usize,
    mut s: TcpStream,
) -> Result<(TcpStream, FrameMac, u64, usize), String> {
    let _ = s.set_nodelay(true);
    let work = async {
        let f = read_frame(&mut s, &sh.secret_key, frame::MAX_CONTROL_PAYLOAD)
            .await
            .map_err(|e| {
                if let ReadError::Frame(fe) = &e {
                    sh.reject(path, fe);
                }
                e.to_string()
            })?;
        if f.kind != Kind::Hello {
            return Err(format!("expected Hello, got {:?}", f.kind));
        }
        let mut b = &f.payload[..];
        let mut pb = [0u8; 2];
        pb.copy_from_slice(take(&mut b, 2)?);
        let their_path = usize::from(u16::from_be_bytes(pb));
        let lane = usize::from(take(&mut b, 1)?[0]);
        if lane >= LANES {
            return Err(format!("unknown lane {lane}"));
        }
        let peer_session = take_u64(&mut b)?;
        let mut nonce_d = [0u8; 16];
        nonce_d.copy_from_slice(take(&mut b, 16)?);
        let from = take_name(&mut b)?;
        let to = take_name(&mut b)?;
        if from != sh.cfg.peer_host || to != sh.cfg.local_host {
            return Err(format!(
                "hello from '{from}' to '{to}'; expected '{}' to '{}'",
                sh.cfg.peer_host, sh.cfg.local_host
            ));
        }
        if their_path != path {
            return Err(format!(
                "peer says path {their_path}, this listener is path {path}"
            ));
        }
        let mut nonce_a = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce_a);
        let mut p = Vec::with_capacity(40);
        p.extend_from_slice(&sh.session.to_be_bytes());
        p.extend_from_slice(&nonce_a);
        p.extend_from_slice(&nonce_d);
        let ack = control_frame(Kind::HelloAck, Channel::Control, 0, Bytes::from(p));
        s.write_all(&frame::encode(&sh.secret_key, &ack))
            .await
            .map_err(|e| e.to_string())?;
        Ok((peer_session, nonce_d, nonce_a, lane))
    };
    let (peer_session, nonce_d, nonce_a, lane) = tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| "handshake timeout".to_string())??;
    Ok((
        s,
        conn_key(&sh.cfg.secret, &nonce_d, &nonce_a),
        peer_session,
        lane,
    ))
}

/// Runs an authenticated connection until it fails or is replaced.
async fn run_connection(
    sh: &Arc<Shared>,
    conn: usize,
    stream: TcpStream,
    key: FrameMac,
    peer_session: u64,
) {
    let generation = sh.conn_up(conn, peer_session);
    let (rd, wr) = stream.into_split();
    let wake = sh.lock().conns[conn].wake.clone();
    let mut writer = {
        let sh = sh.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let reason = write_loop(&sh, conn, generation, wr, &key, &wake).await;
            sh.conn_down(conn, generation, &reason);
        })
    };
    // The reader runs as its own task: reading a frame is not cancel-safe, so it must never be
    // a branch of a select that another branch can win half-way through a frame.
    let mut reader = {
        let sh = sh.clone();
        tokio::spawn(async move {
            let reason = read_loop(&sh, conn, generation, rd, &key).await;
            sh.conn_down(conn, generation, &reason);
        })
    };
    let mut stop = sh.shutdown.subscribe();
    let mut check = tokio::time::interval(sh.cfg.heartbeat_interval);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {
                sh.conn_down(conn, generation, "link shut down");
                break;
            }
            // Either side ending ends the connection.
            _ = &mut writer => break,
            _ = &mut reader => break,
            // A writer blocked on the full socket of a cut cable, or a reader waiting on it,
            // never sees that the connection was declared down: look, and abort them below.
            _ = check.tick() => {
                if sh.lock().conns[conn].generation != generation {
                    break;
                }
            }
        }
    }
    writer.abort();
    reader.abort();
}

async fn read_loop(
    sh: &Shared,
    conn: usize,
    generation: u64,
    mut rd: tokio::net::tcp::OwnedReadHalf,
    key: &FrameMac,
) -> String {
    loop {
        match read_frame(&mut rd, key, MAX_FRAGMENT).await {
            Ok(f) => {
                let large = f.payload.len() > 64 * 1024;
                bump(&sh.counters.frames_received, 1);
                bump(
                    &sh.counters.bytes_received,
                    (HEADER_LEN + f.payload.len() + MAC_LEN) as u64,
                );
                if let Err(e) = sh.on_frame(conn, generation, f) {
                    return e.to_string();
                }
                if large {
                    tokio::task::yield_now().await;
                }
            }
            Err(ReadError::Frame(e)) => {
                sh.reject(conn / LANES, &e);
                return format!("rejected frame: {e}");
            }
            Err(ReadError::Io(e)) => return format!("read: {e}"),
        }
    }
}

/// A frame to write: its header fields and its payload in two parts.
struct OutFrame {
    kind: Kind,
    channel: Channel,
    flags: u8,
    seq: u64,
    payload: Piece,
}

/// What the writer takes next: a link-internal frame of this connection, else (when it is its
/// lane's active connection) the next unsent fragment of the lane's highest-priority channel.
fn next_frame(sh: &Shared, conn: usize, generation: u64) -> Result<Option<OutFrame>, String> {
    let mut st = sh.lock();
    if st.conns[conn].generation != generation || !st.conns[conn].up {
        return Err("connection replaced".into());
    }
    if let Some(f) = st.conns[conn].urgent.pop_front() {
        return Ok(Some(OutFrame {
            kind: f.kind,
            channel: f.channel,
            flags: f.flags,
            seq: f.seq,
            payload: Piece {
                head: f.payload,
                body: Bytes::new(),
            },
        }));
    }
    let lane = conn % LANES;
    if st.active[lane] != Some(conn) {
        return Ok(None);
    }
    for ch in Channel::BY_PRIORITY
        .into_iter()
        .filter(|&c| lane_of(c) == lane)
    {
        let tx = &mut st.tx[ch.index()];
        if let Some((seq, flags, payload)) = tx.queue.get(tx.sent) {
            let f = OutFrame {
                kind: Kind::Data,
                channel: ch,
                flags: *flags,
                seq: *seq,
                payload: payload.clone(),
            };
            tx.sent += 1;
            return Ok(Some(f));
        }
    }
    Ok(None)
}

/// The reader feeds the MAC in runs that end on multiples of this many bytes of the MAC'd
/// stream (header and payload).
const MAC_RUN: usize = 64 * 1024;

/// How much of a payload of which `avail` bytes have arrived the reader may hash now: up to
/// the last [`MAC_RUN`] boundary of header plus payload (0 before the first).
fn mac_run_end(avail: usize) -> usize {
    ((HEADER_LEN + avail) / MAC_RUN * MAC_RUN).saturating_sub(HEADER_LEN)
}

/// Frames with payloads at least this large are written with one vectored write straight from
/// their buffers; smaller ones are gathered in the writer's buffer.
const DIRECT_WRITE: usize = 16 * 1024;
/// The writer's buffer of small frames is written out once it holds this much.
const SMALL_BUFFER: usize = 64 * 1024;

/// Writes every byte of `parts` in order, with as few (vectored) writes as the socket allows.
async fn write_all_parts(
    w: &mut (impl AsyncWriteExt + Unpin),
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < parts.len() {
        if off >= parts[idx].len() {
            idx += 1;
            off = 0;
            continue;
        }
        let mut slices = Vec::with_capacity(parts.len() - idx);
        slices.push(std::io::IoSlice::new(&parts[idx][off..]));
        slices.extend(
            parts[idx + 1..]
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| std::io::IoSlice::new(p)),
        );
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && idx < parts.len() {
            let left = parts[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

async fn write_loop(
    sh: &Shared,
    path: usize,
    generation: u64,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    key: &FrameMac,
    wake: &Notify,
) -> String {
    // Small frames (acks, heartbeats, small messages) are gathered here and written when the
    // writer runs out of work, before a large frame, or when this fills up.
    let mut small: Vec<u8> = Vec::with_capacity(SMALL_BUFFER);
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let f = match next_frame(sh, path, generation) {
            Err(e) => return e,
            Ok(f) => f,
        };
        let Some(f) = f else {
            if !small.is_empty() {
                if let Err(e) = w.write_all(&small).await {
                    return format!("write: {e}");
                }
                small.clear();
            }
            notified.await;
            continue;
        };
        let len = f.payload.len();
        let h = encode_header(f.kind, f.channel, f.flags, f.seq, len);
        let res = if len >= DIRECT_WRITE {
            // Header and payload leave first; the MAC is computed while the peer reads them,
            // and its tag leaves with whatever is written next (at the latest when the writer
            // runs out of work).
            let r = write_all_parts(&mut w, &[&small, &h, &f.payload.head, &f.payload.body]).await;
            small.clear();
            small.extend_from_slice(&key.tag_of(&[&h, &f.payload.head, &f.payload.body]));
            r
        } else {
            let tag = key.tag_of(&[&h, &f.payload.head, &f.payload.body]);
            small.extend_from_slice(&h);
            small.extend_from_slice(&f.payload.head);
            small.extend_from_slice(&f.payload.body);
            small.extend_from_slice(&tag);
            if small.len() >= SMALL_BUFFER {
                let r = w.write_all(&small).await;
                small.clear();
                r
            } else {
                Ok(())
            }
        };
        if let Err(e) = res {
            return format!("write: {e}");
        }
        bump(&sh.counters.frames_sent, 1);
        if len > 64 * 1024 {
            // MAC'ing a large fragment holds this worker for a while: let urgent-lane tasks
            // (heartbeats, acks) run before the next one instead of after a whole budget.
            tokio::task::yield_now().await;
        }
        bump(&sh.counters.bytes_sent, (HEADER_LEN + len + MAC_LEN) as u64);
    }
}

#[cfg(test)]
mod tests;
