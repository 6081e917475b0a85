//! The oldstyle handshake and write-through mode, as tapdisk's NBD client (blktap
//! `drivers/block-nbd.c`) needs them: it reads `NBDMAGIC`, the oldstyle magic, the size, the
//! flags and 124 zero bytes, then sends READ/WRITE/DISC only — never FLUSH, never FUA. With
//! `write_through` every write must be durable on the local store and on the mirror's
//! secondary before its reply; without it a write may still sit in the page cache.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{MirrorPair, Rt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xenft_blkback::nbd::proto::{NBDMAGIC, OLDSTYLE_MAGIC};
use xenft_blkback::nbd::server::{ExportConfig, NbdServer};
use xenft_blkback::store::{FileStore, Store, StoreError};

/// Counts bytes written since the last sync: what a crash could still lose.
struct Tracking {
    inner: FileStore,
    unsynced: AtomicU64,
    syncs: AtomicU64,
    lock: Mutex<()>,
}

impl Tracking {
    fn wrap(inner: FileStore) -> Arc<Self> {
        Arc::new(Self {
            inner,
            unsynced: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            lock: Mutex::new(()),
        })
    }
}

impl Store for Tracking {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        let _g = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.inner.write_at(buf, offset)?;
        self.unsynced.fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(())
    }
    fn sync(&self) -> Result<(), StoreError> {
        // Writes that complete while the fdatasync runs may or may not be covered: only those
        // before it are counted as synced.
        let before = {
            let _g = self
                .lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.unsynced.load(Ordering::SeqCst)
        };
        self.inner.sync()?;
        self.unsynced.fetch_sub(before, Ordering::SeqCst);
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64, punch: bool) -> Result<(), StoreError> {
        self.inner.zero(offset, len, punch)
    }
    fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>, StoreError> {
        self.inner.next_data(offset)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A tapdisk-like client: oldstyle handshake, then one WRITE (type 1, flags 0) at a time.
async fn tapdisk_write(stream: &mut tokio::net::UnixStream, offset: u64, data: &[u8], n: u64) {
    let mut req = Vec::with_capacity(28 + data.len());
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&1u32.to_be_bytes()); // NBD_CMD_WRITE, no flags
    req.extend_from_slice(format!("td{n:05x}\0").as_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    req.extend_from_slice(data);
    stream.write_all(&req).await.unwrap();
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[0..4], &0x6744_6698u32.to_be_bytes(), "reply magic");
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "write {n} failed");
    assert_eq!(&reply[8..16], &req[8..16], "handle echoed");
}

async fn oldstyle_connect(sock: &std::path::Path, size: u64) -> tokio::net::UnixStream {
    let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
    let mut hello = [0u8; 152];
    s.read_exact(&mut hello).await.unwrap();
    assert_eq!(
        u64::from_be_bytes(hello[0..8].try_into().unwrap()),
        NBDMAGIC
    );
    assert_eq!(
        u64::from_be_bytes(hello[8..16].try_into().unwrap()),
        OLDSTYLE_MAGIC
    );
    assert_eq!(u64::from_be_bytes(hello[16..24].try_into().unwrap()), size);
    assert!(hello[28..].iter().all(|b| *b == 0), "124 zero bytes");
    s
}

/// Serves a mirrored pair (both stores tracked) with `cfg` and writes 20 blocks the way tapdisk
/// does; returns the most unsynced bytes seen on (primary, secondary) right after a reply.
fn run_pair(write_through: bool) -> (u64, u64, Vec<u8>, Vec<u8>) {
    let rt = Rt::new();
    rt.block_on(async {
        let (mut ps, mut ss) = (None, None);
        let mut pair = MirrorPair::with_stores(
            4 << 20,
            |f| {
                let t = Tracking::wrap(f);
                ps = Some(t.clone());
                t
            },
            |f| {
                let t = Tracking::wrap(f);
                ss = Some(t.clone());
                t
            },
        );
        let (ps, ss) = (ps.unwrap(), ss.unwrap());
        pair.connect();
        pair.wait_in_sync().await;
        let cfg = ExportConfig {
            oldstyle: true,
            write_through,
            ..ExportConfig::default()
        };
        let server = NbdServer::new(pair.volume.clone(), cfg);
        let sock = pair.dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move { server.serve_unix(listener).await });
        let mut c = oldstyle_connect(&sock, 4 << 20).await;
        let (mut worst_p, mut worst_s) = (0, 0);
        for i in 0..20u64 {
            let data = common::pseudo_random(4096, i);
            tapdisk_write(&mut c, i * 8192, &data, i).await;
            worst_p = worst_p.max(ps.unsynced.load(Ordering::SeqCst));
            worst_s = worst_s.max(ss.unsynced.load(Ordering::SeqCst));
        }
        let p = std::fs::read(&pair.pdisk).unwrap();
        let s = std::fs::read(&pair.sdisk).unwrap();
        (worst_p, worst_s, p, s)
    })
}

#[test]
fn write_through_replies_only_when_the_write_is_durable_on_both_copies() {
    let (p, s, pdata, sdata) = run_pair(true);
    assert_eq!(p, 0, "primary: a reply came before its write was synced");
    assert_eq!(s, 0, "secondary: a reply came before its write was synced");
    assert_eq!(pdata, sdata, "both copies hold every acknowledged write");
    for i in 0..20u64 {
        let at = usize::try_from(i * 8192).unwrap();
        assert_eq!(&pdata[at..at + 4096], &common::pseudo_random(4096, i)[..]);
    }
}

#[test]
fn without_write_through_a_write_without_fua_may_be_acknowledged_unsynced() {
    // The default keeps the NBD contract (durable only after FLUSH/FUA): what tapdisk would get
    // without the SR's write-through mode.
    let (p, s, pdata, sdata) = run_pair(false);
    assert!(
        p > 0 && s > 0,
        "expected unsynced acknowledged writes: {p} {s}"
    );
    assert_eq!(pdata, sdata);
}
