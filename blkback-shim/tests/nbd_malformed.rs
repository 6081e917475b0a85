//! Hostile or broken NBD clients: every bad request gets the spec's error or a clean
//! disconnect of that client only; nothing is written outside the export; other clients keep
//! working.
#![allow(clippy::cast_possible_truncation)] // random test fields are truncated on purpose

mod common;

use bytes::{BufMut, BytesMut};
use common::LocalServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use xenft_blkback::nbd::client::{greet, send_option, ClientError, NbdClient};
use xenft_blkback::nbd::proto::*;

const SIZE: u64 = 4 << 20;

async fn client(s: &LocalServer) -> NbdClient<UnixStream> {
    NbdClient::connect_unix(&s.sock, "xenft").await.unwrap()
}

/// True when the server closed the connection (EOF or reset) within five seconds.
async fn closed(stream: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[test]
fn out_of_range_requests_get_einval_or_enospc_and_write_nothing() {
    let s = LocalServer::start(SIZE);
    s.rt.block_on(async {
        let mut c = client(&s).await;
        assert_eq!(c.size, SIZE);
        let (e, _) = c
            .request(NBD_CMD_READ, 0, SIZE - 512, 1024, &[])
            .await
            .unwrap();
        assert_eq!(e, NBD_EINVAL);
        let (e, _) = c
            .request(NBD_CMD_WRITE, 0, SIZE - 512, 1024, &[9u8; 1024])
            .await
            .unwrap();
        assert_eq!(e, NBD_ENOSPC);
        let (e, _) = c
            .request(NBD_CMD_WRITE, 0, u64::MAX - 10, 100, &[9u8; 100])
            .await
            .unwrap();
        assert_eq!(e, NBD_ENOSPC, "offset+length overflow");
        let (e, _) = c
            .request(NBD_CMD_WRITE_ZEROES, 0, SIZE, 1, &[])
            .await
            .unwrap();
        assert_eq!(e, NBD_ENOSPC);
        let (e, _) = c
            .request(NBD_CMD_TRIM, 0, SIZE + 4096, 4096, &[])
            .await
            .unwrap();
        assert_eq!(e, NBD_EINVAL);
        // The connection still works after errors.
        c.write(SIZE - 4, &[1, 2, 3, 4], false).await.unwrap();
        assert_eq!(&c.read(SIZE - 4, 4).await.unwrap()[..], &[1, 2, 3, 4]);
    });
    let meta = std::fs::metadata(&s.disk).unwrap();
    assert_eq!(meta.len(), SIZE, "nothing written past the end");
    let disk = std::fs::read(&s.disk).unwrap();
    assert!(disk[..disk.len() - 4].iter().all(|&b| b == 0));
}

#[test]
fn oversized_read_is_refused_and_oversized_write_disconnects_only_that_client() {
    let s = LocalServer::start(SIZE);
    s.rt.block_on(async {
        let mut other = client(&s).await;
        let mut c = client(&s).await;
        let (e, _) = c
            .request(NBD_CMD_READ, 0, 0, MAX_PAYLOAD + 1, &[])
            .await
            .unwrap();
        assert_eq!(e, NBD_EINVAL);
        // A write header announcing 64 MiB: the server must not buffer it; it hangs up.
        let h = RequestHeader {
            magic: NBD_REQUEST_MAGIC,
            flags: 0,
            typ: NBD_CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: 64 << 20,
        };
        let st = c.stream_mut();
        st.write_all(&h.encode()).await.unwrap();
        // The server may already have hung up: a broken pipe here is fine.
        let _ = st.write_all(&[0u8; 4096]).await;
        assert!(closed(st).await, "server must drop the connection");
        other.write(0, b"still here", true).await.unwrap();
        assert_eq!(&other.read(0, 10).await.unwrap()[..], b"still here");
    });
}

#[test]
fn unknown_command_and_unknown_flags_get_einval() {
    let s = LocalServer::start(SIZE);
    s.rt.block_on(async {
        let mut c = client(&s).await;
        let (e, _) = c.request(42, 0, 0, 0, &[]).await.unwrap();
        assert_eq!(e, NBD_EINVAL);
        let (e, _) = c.request(NBD_CMD_READ, 1 << 9, 0, 512, &[]).await.unwrap();
        assert_eq!(e, NBD_EINVAL);
        let (e, _) = c
            .request(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0, &[])
            .await
            .unwrap();
        assert_eq!(e, NBD_EINVAL);
        c.flush().await.unwrap();
        c.disconnect().await.unwrap();
    });
}

#[test]
fn bad_request_magic_disconnects() {
    let s = LocalServer::start(SIZE);
    s.rt.block_on(async {
        let mut c = client(&s).await;
        let st = c.stream_mut();
        st.write_all(&[0xde; 28]).await.unwrap();
        assert!(closed(st).await);
        let mut again = client(&s).await;
        again.read(0, 512).await.unwrap();
    });
}

#[test]
fn option_haggling_errors_follow_the_spec() {
    let s = LocalServer::start(SIZE);
    s.rt.block_on(async {
        let mut st = UnixStream::connect(&s.sock).await.unwrap();
        greet(&mut st).await.unwrap();
        match send_option(&mut st, 999, b"junk").await {
            Err(ClientError::OptionRefused { reply, .. }) => assert_eq!(reply, NBD_REP_ERR_UNSUP),
            other => panic!("{other:?}"),
        }
        match send_option(&mut st, NBD_OPT_LIST, b"x").await {
            Err(ClientError::OptionRefused { reply, .. }) => assert_eq!(reply, NBD_REP_ERR_INVALID),
            other => panic!("{other:?}"),
        }
        let list = send_option(&mut st, NBD_OPT_LIST, b"").await.unwrap();
        assert_eq!(&list[0][4..], b"xenft");
        let mut go = BytesMut::new();
        go.put_u32(4);
        go.put_slice(b"nope");
        go.put_u16(0);
        match send_option(&mut st, NBD_OPT_GO, &go).await {
            Err(ClientError::OptionRefused { reply, .. }) => assert_eq!(reply, NBD_REP_ERR_UNKNOWN),
            other => panic!("{other:?}"),
        }
        // Name length pointing past the payload.
        let mut bad = BytesMut::new();
        bad.put_u32(1000);
        bad.put_u16(0);
        match send_option(&mut st, NBD_OPT_INFO, &bad).await {
            Err(ClientError::OptionRefused { reply, .. }) => assert_eq!(reply, NBD_REP_ERR_INVALID),
            other => panic!("{other:?}"),
        }
        match send_option(&mut st, NBD_OPT_STARTTLS, b"").await {
            Err(ClientError::OptionRefused { reply, .. }) => assert_eq!(reply, NBD_REP_ERR_POLICY),
            other => panic!("{other:?}"),
        }
        send_option(&mut st, NBD_OPT_ABORT, b"").await.unwrap();
        assert!(closed(&mut st).await);
    });
}

#[test]
fn bad_option_magic_oversized_option_and_unknown_export_name_disconnect() {
    let s = LocalServer::start(SIZE);
    s.rt.block_on(async {
        let mut st = UnixStream::connect(&s.sock).await.unwrap();
        greet(&mut st).await.unwrap();
        st.write_all(&[0x11; 16]).await.unwrap();
        assert!(closed(&mut st).await, "bad option magic");

        let mut st = UnixStream::connect(&s.sock).await.unwrap();
        greet(&mut st).await.unwrap();
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(NBD_OPT_GO);
        b.put_u32(u32::MAX);
        st.write_all(&b).await.unwrap();
        assert!(closed(&mut st).await, "4 GiB option payload");

        let mut st = UnixStream::connect(&s.sock).await.unwrap();
        greet(&mut st).await.unwrap();
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(NBD_OPT_EXPORT_NAME);
        b.put_u32(3);
        b.put_slice(b"zzz");
        st.write_all(&b).await.unwrap();
        assert!(closed(&mut st).await, "unknown export via EXPORT_NAME");

        let mut st = UnixStream::connect(&s.sock).await.unwrap();
        let _ = st.read_u64().await.unwrap();
        let _ = st.read_u64().await.unwrap();
        let _ = st.read_u16().await.unwrap();
        st.write_u32(1 << 7).await.unwrap();
        assert!(closed(&mut st).await, "unknown client flags");
    });
}

#[test]
fn export_name_enters_transmission_with_default_name() {
    let s = LocalServer::start(SIZE);
    s.rt.block_on(async {
        let mut st = UnixStream::connect(&s.sock).await.unwrap();
        greet(&mut st).await.unwrap();
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(NBD_OPT_EXPORT_NAME);
        b.put_u32(0);
        st.write_all(&b).await.unwrap();
        assert_eq!(st.read_u64().await.unwrap(), SIZE);
        let flags = st.read_u16().await.unwrap();
        assert_ne!(flags & NBD_FLAG_SEND_FUA, 0);
        // NO_ZEROES was negotiated: the next bytes are a reply to our request.
        let h = RequestHeader {
            magic: NBD_REQUEST_MAGIC,
            flags: 0,
            typ: NBD_CMD_FLUSH,
            cookie: 77,
            offset: 0,
            length: 0,
        };
        st.write_all(&h.encode()).await.unwrap();
        let mut r = [0u8; 16];
        st.read_exact(&mut r).await.unwrap();
        assert_eq!(r, simple_reply(0, 77));
    });
}

#[test]
fn structured_read_error_is_an_error_chunk() {
    let s = LocalServer::start(SIZE);
    s.rt.block_on(async {
        let mut st = UnixStream::connect(&s.sock).await.unwrap();
        greet(&mut st).await.unwrap();
        send_option(&mut st, NBD_OPT_STRUCTURED_REPLY, b"")
            .await
            .unwrap();
        let mut go = BytesMut::new();
        go.put_u32(0);
        go.put_u16(0);
        send_option(&mut st, NBD_OPT_GO, &go).await.unwrap();
        let h = RequestHeader {
            magic: NBD_REQUEST_MAGIC,
            flags: 0,
            typ: NBD_CMD_READ,
            cookie: 5,
            offset: SIZE,
            length: 512,
        };
        st.write_all(&h.encode()).await.unwrap();
        assert_eq!(st.read_u32().await.unwrap(), NBD_STRUCTURED_REPLY_MAGIC);
        assert_eq!(st.read_u16().await.unwrap(), NBD_REPLY_FLAG_DONE);
        assert_eq!(st.read_u16().await.unwrap(), NBD_REPLY_TYPE_ERROR);
        assert_eq!(st.read_u64().await.unwrap(), 5);
        let len = st.read_u32().await.unwrap();
        assert_eq!(st.read_u32().await.unwrap(), NBD_EINVAL);
        let mlen = st.read_u16().await.unwrap();
        assert_eq!(u32::from(mlen) + 6, len);
    });
}

#[test]
fn random_garbage_in_both_phases_never_takes_the_server_down() {
    let s = LocalServer::start(SIZE);
    s.rt.block_on(async {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200u32 {
            let mut st = UnixStream::connect(&s.sock).await.unwrap();
            if round % 2 == 0 {
                // Garbage during negotiation.
                let _ = st.read_u64().await;
            } else {
                // Garbage after a valid handshake: headers with the right magic and random
                // fields, then random bytes.
                let mut c = NbdClient::handshake(st, "xenft").await.unwrap();
                for _ in 0..4 {
                    let h = RequestHeader {
                        magic: NBD_REQUEST_MAGIC,
                        flags: (rnd() & 0xffff) as u16,
                        typ: (rnd() % 12) as u16,
                        cookie: rnd(),
                        offset: rnd() % (2 * SIZE),
                        length: (rnd() % (1 << 16)) as u32,
                    };
                    let _ = c.stream_mut().write_all(&h.encode()).await;
                }
                st = c.into_stream();
            }
            let len = (rnd() % 300) as usize;
            let junk: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            let _ = st.write_all(&junk).await;
            drop(st);
        }
        // Writes beyond the end never extended the file, and a fresh client still works.
        let mut c = client(&s).await;
        c.write(0, b"alive", true).await.unwrap();
        assert_eq!(&c.read(0, 5).await.unwrap()[..], b"alive");
    });
    assert_eq!(std::fs::metadata(&s.disk).unwrap().len(), SIZE);
}
