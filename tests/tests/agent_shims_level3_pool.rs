//! Level 3 end to end with the real components (root, namespaces): h1 runs a synthetic guest
//! protected by the checkpoint engine, which stamps blkback's disk epochs (`checkpoint N`,
//! `commit N` on h1's blkback); h2's blkback holds each epoch's writes until its commit. An NBD
//! client writes while checkpoints run; h1 (agent, shims, engine) is SIGKILLed. h2's agent must
//! freeze the memory replica at its last checkpoint N, commit the disk epochs <= N, drop the
//! later ones, serve the disk and resume the guest: every acknowledged write of an epoch <= N
//! is on the disk, and none of a later epoch.

mod agent_shims;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_shims::{control, qemu_io, wait_until, Pool};
use xenft_tests::netns::require_root;

const WRITE: u64 = 64 * 1024;

/// A write acknowledged by h1: offset, pattern, blkback's epoch before and after it.
type Acked = (u64, u8, u64, u64);

#[test]
fn a_level3_take_over_keeps_exactly_the_disk_writes_of_the_resumed_checkpoint() {
    if !require_root("a_level3_take_over_keeps_exactly_the_disk_writes_of_the_resumed_checkpoint") {
        return;
    }
    let mut pool = Pool::new();
    pool.level = 3;
    pool.start_blkback(1, "secondary");
    pool.start_netback(1, "standby");
    pool.start_checkpoint(1, "secondary");
    assert!(wait_until(Duration::from_secs(10), || pool
        .blk(1, "epoch-mode on")
        .is_some_and(|v| v["ok"] == true)));
    pool.start_blkback(0, "primary");
    pool.start_netback(0, "buffered");
    assert!(wait_until(Duration::from_secs(10), || pool
        .p("ck.sock")
        .exists()));
    pool.start_checkpoint(0, "primary");
    pool.start_agent(1);
    pool.start_agent(0);
    assert!(
        pool.wait_protected(),
        "h1 never protected vm1\n{}",
        pool.log("agent-h1.log")
    );
    assert!(
        wait_until(Duration::from_secs(20), || control(
            &pool.ckpt_ctl(1),
            "status"
        )
        .is_some_and(|v| v["committed_epoch"].as_u64().unwrap_or(0) > 3)),
        "the memory replica holds no checkpoint\n{}",
        pool.log("ck-h2.log")
    );
    // The engine drives h1's relay too: its output epochs follow the checkpoints.
    let relay_committed = || {
        control(&pool.p("net-h1.ctl"), r#"{"op":"counters"}"#)
            .and_then(|v| v["counters"]["committed_epoch"].as_u64())
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(10), || relay_committed() > 3),
        "the relay's epochs are not committed by the engine: {:?}\n{}",
        control(&pool.p("net-h1.ctl"), r#"{"op":"counters"}"#),
        pool.log("ck-h1.log")
    );

    // The client writes while checkpoints stamp the epochs.
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, uri, ctl) = (
            acked.clone(),
            stop.clone(),
            pool.nbd_uri(0),
            pool.blk_ctl(0),
        );
        std::thread::spawn(move || {
            let epoch = || control(&ctl, "status").and_then(|v| v["primary"]["epoch"].as_u64());
            for k in 0u64..1500 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let pat = u8::try_from(k % 250).unwrap() + 1;
                let Some(e0) = epoch() else { break };
                let (ok, out) =
                    qemu_io(&uri, false, &[format!("write -P {pat} {} 64k", k * WRITE)]);
                if !ok || !out.contains("wrote 65536/65536 bytes") {
                    break;
                }
                let Some(e1) = epoch() else { break };
                acked.lock().unwrap().push((k * WRITE, pat, e0, e1));
            }
        })
    };
    assert!(
        wait_until(Duration::from_secs(20), || acked.lock().unwrap().len()
            >= 30),
        "the NBD client could not write through h1"
    );

    // Act: h1 dies — its checkpoint engine first, so that the last acknowledged writes
    // belong to an epoch no checkpoint completed (the writes of a host that dies between two
    // checkpoints).
    if let Some(mut c) = pool.procs[0].checkpoint.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let before = acked.lock().unwrap().len();
    assert!(wait_until(Duration::from_secs(10), || acked
        .lock()
        .unwrap()
        .len()
        >= before + 3));
    pool.kill_host(0);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        wait_until(Duration::from_secs(15), || pool.vm1(1).is_some_and(
            |(local, _, primary)| local == "running" && primary == "h2"
        )),
        "h2 did not take over: {:?}\n{}",
        pool.vm1(1),
        pool.log("agent-h2.log")
    );

    // Assert: guest resumed at N, disk = writes of epochs <= N.
    let ck = control(&pool.ckpt_ctl(1), "status").unwrap();
    assert_eq!(ck["state"], "running", "{ck}");
    let n = ck["committed_epoch"].as_u64().unwrap();
    let blk = pool.blk(1, "status").unwrap();
    assert_eq!(blk["role"], "primary", "{blk}");
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    for (off, pat, e0, e1) in &acked {
        if *e1 <= n {
            kept.push(format!("read -P {pat} {off} 64k"));
        } else if *e0 > n {
            dropped.push(format!("read -P 0 {off} 64k"));
        }
    }
    assert!(
        !kept.is_empty(),
        "no write landed in an epoch <= {n}: {acked:?}"
    );
    for chunk in kept.chunks(200).chain(dropped.chunks(200)) {
        let (ok, out) = qemu_io(&pool.nbd_uri(1), true, chunk);
        assert!(
            ok && !out.contains("Pattern verification failed")
                && out.matches("read 65536/65536 bytes").count() == chunk.len(),
            "the disk is not checkpoint {n}'s:\n{out}"
        );
    }
    eprintln!(
        "checkpoint {n}: {} acked writes kept, {} of later epochs dropped, {} straddling",
        kept.len(),
        dropped.len(),
        acked.len() - kept.len() - dropped.len()
    );
}
