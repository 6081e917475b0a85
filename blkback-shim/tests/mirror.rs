//! Mirroring semantics over in-memory sessions: protocol C, ordering, degraded mode, resync,
//! full sync, remote mode, epochs.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{pseudo_random, MirrorPair, Rt};
use xenft_blkback::mirror::bitmap::{DirtyBitmap, DEFAULT_CHUNK};
use xenft_blkback::mirror::primary::PeerLink;
use xenft_blkback::store::{FaultyStore, FileStore, Store};

const MIB: u64 = 1 << 20;

#[test]
fn acked_write_is_already_on_the_secondary() {
    let rt = Rt::new();
    rt.block_on(async {
        let mut m = MirrorPair::new(8 * MIB, |s| Arc::new(s));
        m.connect();
        m.wait_in_sync().await;
        for i in 0..50u64 {
            let data = Bytes::from(vec![u8::try_from(i).unwrap() + 1; 4096]);
            m.volume.write(i * 8192, data.clone(), false).await.unwrap();
            // No flush: protocol C means the secondary applied it before our ack.
            let mut buf = vec![0u8; 4096];
            let f = std::fs::File::open(&m.sdisk).unwrap();
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, i * 8192).unwrap();
            assert_eq!(buf, data, "write {i} acked before the secondary had it");
        }
        assert_eq!(m.primary.status().writes_mirrored, 50);
    });
}

#[test]
fn concurrent_overlapping_writes_end_identical_on_both_sides() {
    let rt = Rt::new();
    rt.block_on(async {
        let mut m = MirrorPair::new(4 * MIB, |s| Arc::new(s));
        m.connect();
        m.wait_in_sync().await;
        let mut tasks = Vec::new();
        for i in 0..400u64 {
            let v = m.volume.clone();
            tasks.push(tokio::spawn(async move {
                // All writes hit the same 256 KiB with different sizes and offsets.
                let off = (i * 7919) % (256 * 1024);
                let len = 4096 + (i % 13) as usize * 1000;
                let data = Bytes::from(pseudo_random(len, i));
                v.write(off, data, i % 10 == 0).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        m.volume.flush().await.unwrap();
        assert!(m.files_identical());
    });
}

#[test]
fn degraded_writes_continue_and_resync_copies_only_dirty_chunks() {
    let rt = Rt::new();
    rt.block_on(async {
        let mut m = MirrorPair::new(16 * MIB, |s| Arc::new(s));
        m.connect();
        m.wait_in_sync().await;
        m.volume
            .write(0, Bytes::from(pseudo_random(MIB as usize, 1)), false)
            .await
            .unwrap();
        m.kill_secondary().await;
        // 5 writes in 5 distinct chunks, one spanning two chunks.
        let offs = [MIB, 3 * MIB + 100, 5 * MIB, 9 * MIB, 12 * MIB - 1000];
        for (i, o) in offs.iter().enumerate() {
            m.volume
                .write(*o, Bytes::from(pseudo_random(2000, i as u64 + 10)), false)
                .await
                .unwrap();
        }
        let st = m.primary.status();
        assert_eq!(st.peer, PeerLink::Degraded);
        assert_eq!(st.dirty_bytes, 6 * DEFAULT_CHUNK);
        assert!(!m.files_identical());
        let before = m.secondary.status().resync_bytes;
        m.connect();
        m.wait_in_sync().await;
        m.volume.flush().await.unwrap();
        assert!(m.files_identical());
        let copied = m.secondary.status().resync_bytes - before;
        assert_eq!(
            copied,
            6 * DEFAULT_CHUNK,
            "resync must copy exactly the dirty chunks"
        );
        let last = m.primary.status().last_resync.unwrap();
        assert_eq!(last.bytes_copied, 6 * DEFAULT_CHUNK);
        assert!(!last.full);
        assert_eq!(m.primary.status().dirty_bytes, 0);
    });
}

#[test]
fn dirty_bitmap_is_durable_when_a_degraded_write_is_acked() {
    let rt = Rt::new();
    rt.block_on(async {
        let m = MirrorPair::new(8 * MIB, |s| Arc::new(s));
        // Never connected: degraded from the start.
        m.volume
            .write(2 * MIB, Bytes::from(vec![1u8; 100]), false)
            .await
            .unwrap();
        let bm = DirtyBitmap::open(&m.dir.path().join("bitmap"), 8 * MIB, DEFAULT_CHUNK).unwrap();
        assert!(bm.is_dirty(2 * MIB / DEFAULT_CHUNK));
        assert_eq!(bm.dirty_chunks(), 1);
    });
}

#[test]
fn initial_full_sync_skips_holes_and_zero_regions_and_overwrites_stale_secondary() {
    let rt = Rt::new();
    rt.block_on(async {
        let mut m = MirrorPair::new(32 * MIB, |s| Arc::new(s));
        // Primary data written while no peer existed: 2 MiB of data, 1 MiB of explicit zeroes.
        m.volume
            .write(
                4 * MIB,
                Bytes::from(pseudo_random(2 * MIB as usize, 5)),
                false,
            )
            .await
            .unwrap();
        m.volume
            .write(10 * MIB, Bytes::from(vec![0u8; MIB as usize]), false)
            .await
            .unwrap();
        // The secondary holds stale garbage everywhere it will not be sent data.
        std::fs::write(&m.sdisk, vec![0xeeu8; 32 * MIB as usize]).unwrap();
        m.connect();
        m.wait_in_sync().await;
        assert!(
            m.files_identical(),
            "holes and zeroes must be zeroed on the secondary"
        );
        let last = m.primary.status().last_resync.unwrap();
        assert!(last.full);
        assert_eq!(last.bytes_copied, 2 * MIB, "only the data extent is copied");
        assert_eq!(m.secondary.status().resync_bytes, 2 * MIB);
        assert!(m.primary.status().peer_synced);
    });
}

#[test]
fn writes_racing_with_a_rate_limited_resync_end_identical() {
    let rt = Rt::new();
    rt.block_on(async {
        let mut m = MirrorPair::new(16 * MIB, |s| Arc::new(s));
        m.connect();
        m.wait_in_sync().await;
        m.kill_secondary().await;
        for i in 0..16u64 {
            m.volume
                .write(i * MIB, Bytes::from(pseudo_random(MIB as usize, i)), false)
                .await
                .unwrap();
        }
        m.primary.set_resync_rate(2 * MIB);
        m.connect();
        m.wait_for(|l| l == PeerLink::Resyncing).await;
        // Overwrite regions both before and after the resync cursor while it runs.
        for i in 0..64u64 {
            let off = (i * 2_654_435_761) % (16 * MIB - 8192);
            m.volume
                .write(off, Bytes::from(pseudo_random(8192, 100 + i)), false)
                .await
                .unwrap();
            let p = m.primary.status().resync;
            if let Some(p) = p {
                assert!(p.bytes_left <= p.total_bytes);
            }
        }
        let mid = m.primary.status();
        assert_eq!(
            mid.peer,
            PeerLink::Resyncing,
            "rate limit should keep it running"
        );
        let r = mid.resync.unwrap();
        assert!(r.rate_bytes_per_sec > 0.0 && r.eta_secs.is_some());
        m.primary.set_resync_rate(0);
        m.wait_in_sync().await;
        m.volume.flush().await.unwrap();
        assert!(m.files_identical());
    });
}

#[test]
fn epoch_writes_are_held_until_commit_and_dropped_on_failover() {
    let rt = Rt::new();
    rt.block_on(async {
        let mut m = MirrorPair::new(4 * MIB, |s| Arc::new(s));
        m.connect();
        m.wait_in_sync().await;
        m.secondary.set_epoch_mode(true);
        m.primary.set_epoch(1);
        m.volume
            .write(0, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
        m.primary.set_epoch(2);
        m.volume
            .write(8192, Bytes::from(vec![2u8; 4096]), false)
            .await
            .unwrap();
        let sec = std::fs::read(&m.sdisk).unwrap();
        assert!(
            sec[..4096].iter().all(|&b| b == 0),
            "uncommitted epoch reached the store"
        );
        assert_eq!(m.secondary.status().held_epochs, vec![1, 2]);
        m.primary.commit_epoch(1).await.unwrap().unwrap();
        let sec = std::fs::read(&m.sdisk).unwrap();
        assert!(
            sec[..4096].iter().all(|&b| b == 1),
            "committed epoch not applied"
        );
        assert!(sec[8192..12288].iter().all(|&b| b == 0));
        // Failover: epoch 2 never commits.
        assert_eq!(m.secondary.discard_uncommitted(), 1);
        m.secondary.commit_epoch(5).unwrap();
        let sec = std::fs::read(&m.sdisk).unwrap();
        assert!(
            sec[8192..12288].iter().all(|&b| b == 0),
            "discarded epoch was applied"
        );
    });
}

#[test]
fn failed_local_store_switches_to_remote_mode_without_client_errors() {
    let rt = Rt::new();
    rt.block_on(async {
        let cell = Arc::new(std::sync::OnceLock::new());
        let c2 = cell.clone();
        let mut m = MirrorPair::new(8 * MIB, move |s| {
            let f = Arc::new(FaultyStore::new(s));
            let _ = c2.set(f.clone());
            f as Arc<dyn Store>
        });
        let faulty: Arc<FaultyStore<FileStore>> = cell.get().unwrap().clone();
        let mut failures = m.primary.subscribe_failures();
        m.connect();
        m.wait_in_sync().await;
        m.volume
            .write(0, Bytes::from(vec![7u8; 8192]), false)
            .await
            .unwrap();
        faulty.fail();
        // Reads and writes keep working, served by the secondary.
        assert_eq!(&m.volume.read(0, 8192).await.unwrap()[..], &[7u8; 8192][..]);
        m.volume
            .write(4096, Bytes::from(vec![9u8; 4096]), true)
            .await
            .unwrap();
        m.volume.flush().await.unwrap();
        let r = m.volume.read(0, 8192).await.unwrap();
        assert!(r[..4096].iter().all(|&b| b == 7) && r[4096..].iter().all(|&b| b == 9));
        let st = m.primary.status();
        let cause = st.local_failure.expect("failure reported");
        assert!(cause.contains("Read") || cause.contains("Write"), "{cause}");
        assert!(failures.try_recv().is_ok(), "failure event emitted");
        let sec = std::fs::read(&m.sdisk).unwrap();
        assert!(sec[4096..8192].iter().all(|&b| b == 9));
    });
}

#[test]
fn truncated_backing_file_switches_to_remote_mode_and_data_stays_correct() {
    let rt = Rt::new();
    rt.block_on(async {
        let mut m = MirrorPair::new(8 * MIB, |s| Arc::new(s));
        m.connect();
        m.wait_in_sync().await;
        let data = Bytes::from(pseudo_random(4 * MIB as usize, 77));
        m.volume.write(2 * MIB, data.clone(), false).await.unwrap();
        // A real failure: someone truncates the primary's backing file.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&m.pdisk)
            .unwrap()
            .set_len(MIB)
            .unwrap();
        let r = m
            .volume
            .read(2 * MIB, u32::try_from(4 * MIB).unwrap())
            .await
            .unwrap();
        assert_eq!(r, data, "reads must come from the secondary, not as zeroes");
        m.volume
            .write(0, Bytes::from(vec![3u8; 4096]), true)
            .await
            .unwrap();
        assert_eq!(&m.volume.read(0, 4096).await.unwrap()[..], &[3u8; 4096][..]);
        let cause = m.primary.status().local_failure.expect("failure reported");
        assert!(cause.contains("truncated"), "{cause}");
    });
}

#[test]
fn online_verify_reports_exactly_the_differing_blocks() {
    let rt = Rt::new();
    rt.block_on(async {
        let mut m = MirrorPair::new(8 * MIB, |s| Arc::new(s));
        m.connect();
        m.wait_in_sync().await;
        m.volume
            .write(0, Bytes::from(pseudo_random(8 * MIB as usize, 9)), false)
            .await
            .unwrap();
        let r = m.primary.verify(4096).await.unwrap();
        assert_eq!(r.bytes_checked, 8 * MIB);
        assert!(r.differing.is_empty(), "{r:?}");
        // Corrupt the secondary behind the mirror's back: two adjacent blocks and one far away.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&m.sdisk)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 5000], 3 * MIB + 4096).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 1], 7 * MIB).unwrap();
        let r = m.primary.verify(4096).await.unwrap();
        assert_eq!(r.differing, vec![(3 * MIB + 4096, 8192), (7 * MIB, 4096)]);
        assert_eq!(r.differing_bytes, 12288);
    });
}

#[test]
fn failed_secondary_store_degrades_the_mirror_and_reports_the_cause() {
    let rt = Rt::new();
    rt.block_on(async {
        let cell = Arc::new(std::sync::OnceLock::new());
        let c2 = cell.clone();
        let mut m = MirrorPair::with_stores(
            4 * MIB,
            |s| Arc::new(s),
            move |s| {
                let f = Arc::new(FaultyStore::new(s));
                let _ = c2.set(f.clone());
                f as Arc<dyn Store>
            },
        );
        let faulty: Arc<FaultyStore<FileStore>> = cell.get().unwrap().clone();
        m.connect();
        m.wait_in_sync().await;
        faulty.fail();
        // The client never sees the secondary's failure.
        m.volume
            .write(0, Bytes::from(vec![5u8; 4096]), true)
            .await
            .unwrap();
        m.volume
            .write(MIB, Bytes::from(vec![6u8; 4096]), false)
            .await
            .unwrap();
        let st = m.primary.status();
        assert_eq!(st.peer, PeerLink::Degraded);
        assert_eq!(st.dirty_bytes, 2 * DEFAULT_CHUNK);
        let cause = st.peer_failure.expect("cause reported");
        assert!(cause.contains("secondary store"), "{cause}");
        assert!(m.secondary.status().failure.is_some());
    });
}

#[test]
fn remote_mode_refuses_reads_of_ranges_the_secondary_does_not_have_yet() {
    let rt = Rt::new();
    rt.block_on(async {
        let cell = Arc::new(std::sync::OnceLock::new());
        let c2 = cell.clone();
        let mut m = MirrorPair::new(8 * MIB, move |s| {
            let f = Arc::new(FaultyStore::new(s));
            let _ = c2.set(f.clone());
            f as Arc<dyn Store>
        });
        let faulty: Arc<FaultyStore<FileStore>> = cell.get().unwrap().clone();
        m.connect();
        m.wait_in_sync().await;
        m.volume
            .write(0, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
        m.kill_secondary().await;
        // Written while the peer is away: the secondary lacks these chunks until resynced.
        // The first run (4 MiB) is copied at once; the rate limit holds back the second.
        m.volume
            .write(4 * MIB, Bytes::from(vec![2u8; MIB as usize]), false)
            .await
            .unwrap();
        m.volume
            .write(6 * MIB, Bytes::from(vec![3u8; 4096]), false)
            .await
            .unwrap();
        m.primary.set_resync_rate(1);
        m.connect();
        m.wait_for(|l| l == PeerLink::Resyncing).await;
        faulty.fail();
        assert_eq!(&m.volume.read(0, 4096).await.unwrap()[..], &[1u8; 4096][..]);
        assert!(
            m.volume.read(6 * MIB, 4096).await.is_err(),
            "stale data served from the secondary"
        );
    });
}
