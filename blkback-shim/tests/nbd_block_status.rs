//! `NBD_CMD_BLOCK_STATUS` with `base:allocation`: the same extents as qemu-nbd on the same
//! sparse file (nbdinfo --map, qemu-img map), an identical `qemu-img convert`, every hostile
//! negotiation or request answered with the spec's error (never a disconnect or panic), and no
//! hole reported while the primary serves from its peer.

#![allow(clippy::cast_possible_truncation)] // test sizes and lengths are small constants

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{pseudo_random, run, run_ok, LocalServer, MirrorPair, Rt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use xenft_blkback::nbd::block_status::{Extent, DATA, HOLE};
use xenft_blkback::nbd::client::{greet, send_option, ClientError};
use xenft_blkback::nbd::proto::*;

const MIB: u64 = 1 << 20;

/// Writes `data` at `offset` of the file, leaving everything else as it is (holes stay holes).
fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// A 64 MiB sparse image: data at 1-3 MiB, one 4 KiB block at 10 MiB, 40-40.5 MiB and the
/// last 64 KiB; holes elsewhere.
fn sparse_server() -> LocalServer {
    let s = LocalServer::start(64 * MIB);
    write_at(&s.disk, MIB, &pseudo_random(2 * MIB as usize, 1));
    write_at(&s.disk, 10 * MIB, &[0x5a; 4096]);
    write_at(&s.disk, 40 * MIB, &pseudo_random(MIB as usize / 2, 2));
    write_at(&s.disk, 64 * MIB - 65536, &pseudo_random(65536, 3));
    s
}

/// qemu-nbd serving `disk` read-only on a Unix socket, killed (by its own handle) on drop.
struct QemuNbd {
    child: Child,
    uri: String,
}

impl QemuNbd {
    fn start(disk: &Path, sock: &Path) -> Self {
        let child = Command::new("qemu-nbd")
            .args([
                "--read-only",
                "--persistent",
                "--format=raw",
                "--export-name=xenft",
            ])
            .arg(format!("--socket={}", sock.display()))
            .arg(disk)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run qemu-nbd (scripts/deps/blkback.apt): {e}"));
        let mut me = Self {
            child,
            uri: common::nbd_uri(sock),
        };
        for _ in 0..500 {
            if sock.exists() {
                return me;
            }
            if let Ok(Some(st)) = me.child.try_wait() {
                panic!("qemu-nbd exited: {st}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = me.child.kill();
        panic!("qemu-nbd did not create {}", sock.display());
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nbdinfo_map_and_qemu_img_map_match_qemu_nbd_on_a_sparse_file() {
    let s = sparse_server();
    let q = QemuNbd::start(&s.disk, &s.dir.path().join("qemu.sock"));
    let ours = run_ok("nbdinfo", &["--map", &s.uri()]);
    let theirs = run_ok("nbdinfo", &["--map", &q.uri]);
    assert_eq!(ours, theirs, "nbdinfo --map: shim vs qemu-nbd");
    // The map is the file's layout, not one "data" extent.
    let first = ours.lines().next().unwrap();
    let fields: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(&fields[..3], &["0", "1048576", "3"], "{ours}");
    assert!(
        ours.contains("hole,zero") && ours.contains("data"),
        "{ours}"
    );
    let ours = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &s.uri()]);
    let theirs = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &q.uri]);
    assert_eq!(ours, theirs, "qemu-img map: shim vs qemu-nbd");
    assert!(ours.contains("\"data\": false"), "{ours}");
}

#[test]
fn qemu_img_convert_from_the_shim_is_identical_and_sparse() {
    let s = sparse_server();
    let out = s.dir.path().join("copy.img");
    let out_s = out.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &s.uri(), out_s],
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&s.disk).unwrap()
    );
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&out).unwrap().blocks() * 512
    };
    assert!(
        allocated < 8 * MIB,
        "copy allocates {allocated} bytes of 64 MiB"
    );
    run_ok("nbdcopy", &[&s.uri(), out_s]);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&s.disk).unwrap()
    );
}

// ---- the wire, by hand -----------------------------------------------------------------------

fn meta_request(export: &[u8], queries: &[&[u8]]) -> Vec<u8> {
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

fn go_request() -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(5);
    b.put_slice(b"xenft");
    b.put_u16(0);
    b.to_vec()
}

fn refused(r: Result<Vec<Bytes>, ClientError>) -> u32 {
    match r {
        Err(ClientError::OptionRefused { reply, .. }) => reply,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// One transmission reply: `(error, None)` for a simple reply, `(error, Some(payload))` for
/// a single structured chunk (error chunks give their errno, block status its payload).
async fn reply(st: &mut UnixStream, cookie: u64) -> (u32, Option<(u16, Vec<u8>)>) {
    let magic = st.read_u32().await.unwrap();
    if magic == NBD_SIMPLE_REPLY_MAGIC {
        let e = st.read_u32().await.unwrap();
        assert_eq!(st.read_u64().await.unwrap(), cookie);
        return (e, None);
    }
    assert_eq!(magic, NBD_STRUCTURED_REPLY_MAGIC);
    let flags = st.read_u16().await.unwrap();
    let typ = st.read_u16().await.unwrap();
    assert_eq!(st.read_u64().await.unwrap(), cookie);
    let len = st.read_u32().await.unwrap();
    assert!(len <= 1 << 20, "chunk of {len} bytes");
    let mut p = vec![0u8; len as usize];
    st.read_exact(&mut p).await.unwrap();
    assert_eq!(flags, NBD_REPLY_FLAG_DONE, "one chunk per reply");
    let e = if typ == NBD_REPLY_TYPE_ERROR {
        u32::from_be_bytes(p[..4].try_into().unwrap())
    } else {
        0
    };
    (e, Some((typ, p)))
}

async fn block_status(
    st: &mut UnixStream,
    cookie: u64,
    flags: u16,
    offset: u64,
    length: u32,
) -> (u32, Option<(u16, Vec<u8>)>) {
    let h = RequestHeader {
        magic: NBD_REQUEST_MAGIC,
        flags,
        typ: NBD_CMD_BLOCK_STATUS,
        cookie,
        offset,
        length,
    };
    st.write_all(&h.encode()).await.unwrap();
    reply(st, cookie).await
}

fn extents(payload: &[u8]) -> (u32, Vec<Extent>) {
    assert!(
        payload.len() >= 12 && (payload.len() - 4).is_multiple_of(8),
        "{payload:?}"
    );
    let id = u32::from_be_bytes(payload[..4].try_into().unwrap());
    let e = payload[4..]
        .chunks_exact(8)
        .map(|c| Extent {
            length: u32::from_be_bytes(c[..4].try_into().unwrap()),
            flags: u32::from_be_bytes(c[4..].try_into().unwrap()),
        })
        .collect();
    (id, e)
}

#[test]
fn meta_context_options_refuse_bad_requests_and_select_base_allocation() {
    let s = sparse_server();
    s.rt.block_on(async {
        let mut st = UnixStream::connect(&s.sock).await.unwrap();
        greet(&mut st).await.unwrap();
        let good = meta_request(b"xenft", &[BASE_ALLOCATION.as_bytes()]);
        // Before structured replies.
        let r = send_option(&mut st, NBD_OPT_SET_META_CONTEXT, &good).await;
        assert_eq!(refused(r), NBD_REP_ERR_INVALID);
        send_option(&mut st, NBD_OPT_STRUCTURED_REPLY, b"")
            .await
            .unwrap();
        // Bad lengths: truncated, trailing byte, query count past the data, empty.
        for bad in [
            good[..good.len() - 1].to_vec(),
            [good.clone(), vec![0]].concat(),
            meta_request(b"xenft", &[])[..9].to_vec(),
            vec![0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
            vec![],
        ] {
            for opt in [NBD_OPT_SET_META_CONTEXT, NBD_OPT_LIST_META_CONTEXT] {
                let r = send_option(&mut st, opt, &bad).await;
                assert_eq!(refused(r), NBD_REP_ERR_INVALID, "{bad:?}");
            }
        }
        let r = send_option(
            &mut st,
            NBD_OPT_SET_META_CONTEXT,
            &meta_request(b"other", &[BASE_ALLOCATION.as_bytes()]),
        )
        .await;
        assert_eq!(refused(r), NBD_REP_ERR_UNKNOWN);
        // Unknown namespaces and the wildcard select nothing; LIST with no query lists ours.
        let none = meta_request(b"xenft", &[b"qemu:dirty-bitmap:a", b"base:"]);
        let r = send_option(&mut st, NBD_OPT_SET_META_CONTEXT, &none).await;
        assert!(r.unwrap().is_empty());
        let listed = send_option(&mut st, NBD_OPT_LIST_META_CONTEXT, &meta_request(b"", &[]))
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(&listed[0][4..], BASE_ALLOCATION.as_bytes());
        let set = send_option(&mut st, NBD_OPT_SET_META_CONTEXT, &good)
            .await
            .unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(&set[0][4..], BASE_ALLOCATION.as_bytes());
        let id = u32::from_be_bytes(set[0][..4].try_into().unwrap());
        send_option(&mut st, NBD_OPT_GO, &go_request())
            .await
            .unwrap();
        let (e, p) = block_status(&mut st, 1, 0, 0, 64 << 20).await;
        assert_eq!(e, 0);
        let (pid, ext) = extents(&p.unwrap().1);
        assert_eq!(pid, id, "the id SET gave");
        assert_eq!(
            ext[0],
            Extent {
                length: MIB as u32,
                flags: HOLE
            }
        );
        assert_eq!(
            ext[1],
            Extent {
                length: 2 * MIB as u32,
                flags: DATA
            }
        );
        let total: u64 = ext.iter().map(|e| u64::from(e.length)).sum();
        assert_eq!(total, 64 * MIB);
    });
}

#[test]
fn hostile_block_status_requests_get_einval_and_the_connection_lives_on() {
    let s = sparse_server();
    s.rt.block_on(async {
        // Without structured replies or contexts: a simple EINVAL reply.
        let mut st = UnixStream::connect(&s.sock).await.unwrap();
        greet(&mut st).await.unwrap();
        send_option(&mut st, NBD_OPT_GO, &go_request())
            .await
            .unwrap();
        assert_eq!(
            block_status(&mut st, 1, 0, 0, 4096).await,
            (NBD_EINVAL, None)
        );
        // Structured replies but no context selected: an EINVAL error chunk.
        let mut st = UnixStream::connect(&s.sock).await.unwrap();
        greet(&mut st).await.unwrap();
        send_option(&mut st, NBD_OPT_STRUCTURED_REPLY, b"")
            .await
            .unwrap();
        send_option(&mut st, NBD_OPT_GO, &go_request())
            .await
            .unwrap();
        let (e, p) = block_status(&mut st, 2, 0, 0, 4096).await;
        assert_eq!(
            (e, p.map(|p| p.0)),
            (NBD_EINVAL, Some(NBD_REPLY_TYPE_ERROR))
        );
        // A context selected, then a failed SET: the selection is gone.
        let mut st = UnixStream::connect(&s.sock).await.unwrap();
        greet(&mut st).await.unwrap();
        send_option(&mut st, NBD_OPT_STRUCTURED_REPLY, b"")
            .await
            .unwrap();
        let good = meta_request(b"", &[BASE_ALLOCATION.as_bytes()]);
        send_option(&mut st, NBD_OPT_SET_META_CONTEXT, &good)
            .await
            .unwrap();
        let r = send_option(&mut st, NBD_OPT_SET_META_CONTEXT, &good[..3]).await;
        assert_eq!(refused(r), NBD_REP_ERR_INVALID);
        send_option(&mut st, NBD_OPT_GO, &go_request())
            .await
            .unwrap();
        assert_eq!(block_status(&mut st, 3, 0, 0, 4096).await.0, NBD_EINVAL);

        // Selected properly: zero length, past the end, offset overflow, unknown flag.
        let mut st = UnixStream::connect(&s.sock).await.unwrap();
        greet(&mut st).await.unwrap();
        send_option(&mut st, NBD_OPT_STRUCTURED_REPLY, b"")
            .await
            .unwrap();
        send_option(&mut st, NBD_OPT_SET_META_CONTEXT, &good)
            .await
            .unwrap();
        send_option(&mut st, NBD_OPT_GO, &go_request())
            .await
            .unwrap();
        let size = 64 * MIB;
        for (cookie, (flags, offset, length)) in [
            (0, 0, 0),
            (0, size - 4096, 8192),
            (0, size, 1),
            (0, u64::MAX - 100, 4096),
            (NBD_CMD_FLAG_FUA, 0, 4096),
        ]
        .into_iter()
        .enumerate()
        {
            let (e, p) = block_status(&mut st, cookie as u64 + 10, flags, offset, length).await;
            assert_eq!(
                e, NBD_EINVAL,
                "flags {flags} offset {offset} length {length}"
            );
            assert_eq!(p.map(|p| p.0), Some(NBD_REPLY_TYPE_ERROR));
        }
        // REQ_ONE: one extent, within the request even when the hole runs on.
        let (e, p) = block_status(&mut st, 20, NBD_CMD_FLAG_REQ_ONE, 4096, 8192).await;
        assert_eq!(e, 0);
        assert_eq!(
            extents(&p.unwrap().1).1,
            vec![Extent {
                length: 8192,
                flags: HOLE
            }]
        );
        // The last byte of the export, then an ordinary read: the connection still serves.
        let (e, p) = block_status(&mut st, 21, 0, size - 1, 1).await;
        assert_eq!(e, 0);
        assert_eq!(
            extents(&p.unwrap().1).1,
            vec![Extent {
                length: 1,
                flags: DATA
            }]
        );
        let h = RequestHeader {
            magic: NBD_REQUEST_MAGIC,
            flags: 0,
            typ: NBD_CMD_READ,
            cookie: 22,
            offset: 10 * MIB,
            length: 4,
        };
        st.write_all(&h.encode()).await.unwrap();
        let (e, p) = reply(&mut st, 22).await;
        assert_eq!(e, 0);
        let (typ, payload) = p.unwrap();
        assert_eq!(typ, NBD_REPLY_TYPE_OFFSET_DATA);
        assert_eq!(&payload[8..], &[0x5a; 4]);
    });
}

#[test]
fn remote_mode_reports_data_not_the_failed_local_files_holes() {
    let rt = Rt::new();
    rt.block_on(async {
        let mut m = MirrorPair::new(8 * MIB, |s| Arc::new(s));
        m.connect();
        m.wait_in_sync().await;
        let data = Bytes::from(pseudo_random(4 * MIB as usize, 5));
        m.volume.write(2 * MIB, data.clone(), false).await.unwrap();
        let local = m.volume.block_status(0, 8 * MIB as u32, false).await;
        assert_eq!(
            local[0],
            Extent {
                length: 2 * MIB as u32,
                flags: HOLE
            }
        );
        // The primary's file is truncated under it: reads switch to the peer, and the local
        // file (now all hole past 1 MiB) must not be what block status reports.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&m.pdisk)
            .unwrap()
            .set_len(MIB)
            .unwrap();
        let r = m.volume.read(2 * MIB, 4096).await.unwrap();
        assert_eq!(&r[..], &data[..4096]);
        assert!(!m.primary.serves_locally());
        let remote = m.volume.block_status(0, 8 * MIB as u32, false).await;
        assert_eq!(
            remote,
            vec![Extent {
                length: 8 * MIB as u32,
                flags: DATA
            }]
        );
    });
}

#[test]
fn nbdinfo_map_of_a_file_without_holes_is_one_data_extent() {
    let s = LocalServer::start(4 * MIB);
    write_at(&s.disk, 0, &pseudo_random(4 * MIB as usize, 9));
    let out = run("nbdinfo", &["--map", "--totals", &s.uri()]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("100.0%") && text.contains("data"), "{text}");
}
