//! The agent driving the real shims (root, network namespaces): host h1 runs vm1 with its
//! disk mirrored by `xenft-blkback` to h2; a real NBD client writes through h1; h1's agent,
//! shims and VM are SIGKILLed. h2's agent must decide the take-over (and say why), promote its
//! blkback so that it serves the disk with every acknowledged write, start the VM and announce
//! the VM's address (gratuitous ARP seen by a client).

mod agent_shims;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_shims::{qemu_io, wait_until, ArpWatch, Pool};
use xenft_tests::netns::require_root;

/// Bytes per logged write.
const WRITE: u64 = 64 * 1024;

#[test]
fn sigkill_of_the_primary_host_makes_the_secondary_serve_every_acked_write_and_announce_the_vm() {
    if !require_root("sigkill_of_the_primary_host_makes_the_secondary_serve_every_acked_write_and_announce_the_vm") {
        return;
    }
    // Arrange: both hosts up, vm1 protected (disk in sync).
    let mut pool = Pool::new();
    pool.start_primary_on_h1();
    assert!(
        pool.wait_protected(),
        "h1 never protected vm1: {:?}\n{}",
        pool.vm1(0),
        pool.log("agent-h1.log")
    );
    // (The primary's agent adopts the VM as running where it was configured: it starts a
    // domain only on a restart or a take-over.)

    // A real NBD client writes a logged pattern through h1's blkback, one 64 KiB write per
    // qemu-io run, until the primary dies under it.
    let acked: Arc<Mutex<Vec<(u64, u8)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, uri) = (acked.clone(), stop.clone(), pool.nbd_uri(0));
        std::thread::spawn(move || {
            for k in 0u64..1500 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let pat = u8::try_from(k % 250).unwrap() + 1;
                let (ok, out) =
                    qemu_io(&uri, false, &[format!("write -P {pat} {} 64k", k * WRITE)]);
                if !ok || !out.contains("wrote 65536/65536 bytes") {
                    break;
                }
                acked.lock().unwrap().push((k * WRITE, pat));
            }
        })
    };
    assert!(
        wait_until(Duration::from_secs(20), || acked.lock().unwrap().len()
            >= 20),
        "the NBD client could not write through h1"
    );
    let arp = ArpWatch::start(&pool.client, "eth0");

    // Act: h1 dies mid-stream.
    let killed = Instant::now();
    pool.kill_host(0);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();

    // Assert: h2 takes over, says why, and runs the VM.
    let took_over = wait_until(Duration::from_secs(15), || pool.runs_vm1(1));
    assert!(
        took_over,
        "h2 did not take over: {:?}\n{}",
        pool.vm1(1),
        pool.log("agent-h2.log")
    );
    let st = pool.status(1).unwrap();
    let why: Vec<String> = st["last_decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["vm"] == "vm1")
        .map(|d| d["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        why.iter()
            .any(|r| r.contains("silent on every path") && r.contains("taking over")),
        "no take-over decision with its reason: {why:#?}"
    );
    assert!(
        pool.vm_pid_file(1).exists(),
        "h2's agent did not start the VM"
    );

    // h2's blkback was promoted and serves every acknowledged write over NBD.
    let blk = pool.blk_status(1).unwrap();
    assert_eq!(blk["role"], "primary", "h2's blkback not promoted: {blk}");
    let cmds: Vec<String> = acked
        .iter()
        .map(|(off, pat)| format!("read -P {pat} {off} 64k"))
        .collect();
    for chunk in cmds.chunks(200) {
        let (ok, out) = qemu_io(&pool.nbd_uri(1), true, chunk);
        assert!(
            ok && !out.contains("Pattern verification failed") && !out.contains("error"),
            "an acknowledged write is missing on h2's disk:\n{out}"
        );
        assert_eq!(
            out.matches("read 65536/65536 bytes").count(),
            chunk.len(),
            "{out}"
        );
    }

    // h2's status API shows the components' own state.
    let components_ok = wait_until(Duration::from_secs(5), || {
        pool.status(1).is_some_and(|v| {
            let c = &v["components"]["vm1"];
            c["disk"]["role"] == "primary" && c["net"]["mode"] == "passthrough"
        })
    });
    assert!(
        components_ok,
        "components not in h2's status: {}",
        pool.status(1)
            .map(|v| v["components"].clone())
            .unwrap_or_default()
    );

    // The client network sees the VM's address announced from h2.
    assert!(
        wait_until(Duration::from_secs(5), || arp.seen_since(killed) > 0),
        "no gratuitous ARP for the VM after the take-over\n{}",
        pool.log("net-h2.log")
    );
    eprintln!(
        "acked writes {}, take-over to GARP seen within {:?}",
        acked.len(),
        killed.elapsed()
    );
}
