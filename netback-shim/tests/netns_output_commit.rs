//! Level-3 output commit, for real: vm ── host (shim) ── client in network namespaces.
//! Privileged (root): builds and removes its own namespaces.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{
    shim_config, start_shim, tcp_from_vm, vm_send_udp, wait_until, Capture, Line, CLIENT_IP, R,
    VM_IP, VM_MAC,
};
use xenft_netback::Mode;
use xenft_tests::netns::require_root;

const PORT: u16 = 9000;

#[test]
fn client_sees_no_frame_of_an_epoch_before_its_commit_and_all_in_order_after() -> R<()> {
    if !require_root("output commit") {
        return Ok(());
    }
    let line = Line::new()?;
    line.static_neighbours()?;
    let mut cfg = shim_config();
    cfg.mode = Mode::Buffered;
    let shim = start_shim(&line.host, cfg)?;
    let cap = Capture::start(&line.client, "eth0", VM_MAC)?;

    shim.begin_epoch(1)?;
    vm_send_udp(&line.vm, PORT, 0..20, 64)?;
    assert!(
        wait_until(Duration::from_secs(3), || shim.counters().held_frames_now
            == 20),
        "the shim holds the 20 frames of epoch 1: {:?}",
        shim.counters()
    );
    shim.begin_epoch(2)?;
    vm_send_udp(&line.vm, PORT, 20..25, 64)?;
    assert!(wait_until(Duration::from_secs(3), || shim
        .counters()
        .held_frames_now
        == 25));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        cap.udp_seqs(PORT).is_empty(),
        "nothing left before commit: {:?}",
        cap.udp_seqs(PORT)
    );

    assert_eq!(shim.commit(1)?, 20);
    assert!(wait_until(Duration::from_secs(3), || cap
        .udp_seqs(PORT)
        .len()
        >= 20));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        cap.udp_seqs(PORT),
        (0..20).collect::<Vec<_>>(),
        "epoch 1 only, in order"
    );

    assert_eq!(shim.commit(2)?, 5);
    assert!(wait_until(Duration::from_secs(3), || cap
        .udp_seqs(PORT)
        .len()
        >= 25));
    assert_eq!(cap.udp_seqs(PORT), (0..25).collect::<Vec<_>>());

    let c = shim.counters();
    assert_eq!(c.held_frames_total, 25);
    assert_eq!(c.released_frames, 25);
    assert_eq!(c.held_frames_now, 0);
    assert_eq!(c.committed_epoch, 2);
    assert_eq!(
        c.learned_ipv4,
        vec![VM_IP],
        "address learnt from the VM's traffic"
    );
    Ok(())
}

#[test]
fn ping_from_vm_completes_only_after_commit() -> R<()> {
    if !require_root("ping after commit") {
        return Ok(());
    }
    let line = Line::new()?;
    line.static_neighbours()?;
    let mut cfg = shim_config();
    cfg.mode = Mode::Buffered;
    let shim = start_shim(&line.host, cfg)?;
    shim.begin_epoch(1)?;
    let mut ping = line
        .vm
        .command("ping")
        .args(["-c", "1", "-W", "10", &CLIENT_IP.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    assert!(wait_until(Duration::from_secs(3), || shim
        .counters()
        .held_frames_now
        >= 1));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        ping.try_wait()?.is_none(),
        "ping must not complete before commit"
    );
    shim.commit(1)?;
    let done = wait_until(Duration::from_secs(5), || {
        matches!(ping.try_wait(), Ok(Some(_)))
    });
    if !done {
        let _ = ping.kill();
    }
    let status = ping.wait()?;
    assert!(
        done && status.success(),
        "ping completes after commit: {status}"
    );
    Ok(())
}

#[test]
fn oversize_frames_from_vm_are_dropped_and_counted_never_forwarded() -> R<()> {
    if !require_root("oversize drop") {
        return Ok(());
    }
    let line = Line::new()?;
    line.static_neighbours()?;
    // The VM side allows jumbo frames; the shim is configured for MTU 1500.
    line.vm.ip(&["link", "set", "eth0", "mtu", "9000"])?;
    line.host.ip(&["link", "set", "vif0", "mtu", "9000"])?;
    let shim = start_shim(&line.host, shim_config())?;
    let cap = Capture::start(&line.client, "eth0", VM_MAC)?;
    vm_send_udp(&line.vm, PORT, 0..1, 4000)?;
    vm_send_udp(&line.vm, PORT, 1..2, 100)?;
    assert!(wait_until(Duration::from_secs(3), || cap
        .udp_seqs(PORT)
        .len()
        == 1));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(cap.udp_seqs(PORT), vec![1], "only the small frame crossed");
    assert_eq!(shim.counters().dropped.oversize, 1);
    Ok(())
}

#[test]
fn full_buffer_asks_for_early_checkpoint_and_stalls_instead_of_dropping() -> R<()> {
    if !require_root("buffer bound") {
        return Ok(());
    }
    let line = Line::new()?;
    line.static_neighbours()?;
    let mut cfg = shim_config();
    cfg.mode = Mode::Buffered;
    // Room for twenty 1042-byte frames, each held with its 10-byte offload header.
    cfg.buffer_limit = 20 * 1052;
    let shim = start_shim(&line.host, cfg)?;
    let (tx, rx) = std::sync::mpsc::channel();
    shim.set_early_checkpoint_hook(std::sync::Arc::new(move |epoch| {
        let _ = tx.send(epoch);
    }));
    let cap = Capture::start(&line.client, "eth0", VM_MAC)?;
    shim.begin_epoch(1)?;
    vm_send_udp(&line.vm, PORT, 0..30, 1000)?; // 1000 B payload = 1042 B frames
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(3))?,
        1,
        "early checkpoint for epoch 1"
    );
    assert!(wait_until(Duration::from_secs(3), || shim
        .counters()
        .overflow_stalls
        == 1));
    let c = shim.counters();
    assert_eq!(c.held_frames_now, 20);
    assert!(c.held_bytes_now <= 20 * 1052);
    assert_eq!(c.early_checkpoint_requests, 1);
    // The checkpoint engine checkpoints early: next epoch, commit the full one.
    shim.begin_epoch(2)?;
    shim.commit(1)?;
    assert!(wait_until(Duration::from_secs(3), || shim
        .counters()
        .held_frames_now
        == 10));
    shim.commit(2)?;
    assert!(wait_until(Duration::from_secs(3), || cap
        .udp_seqs(PORT)
        .len()
        == 30));
    assert_eq!(
        cap.udp_seqs(PORT),
        (0..30).collect::<Vec<_>>(),
        "none dropped, order kept"
    );
    assert_eq!(shim.counters().dropped, xenft_netback::Drops::default());
    Ok(())
}

#[test]
fn vm_mac_is_learnt_from_first_frame_and_other_sources_are_refused_as_spoofed() -> R<()> {
    if !require_root("MAC learning") {
        return Ok(());
    }
    let line = Line::new()?;
    line.static_neighbours()?;
    let mut cfg = shim_config();
    cfg.vm_mac = None;
    let shim = start_shim(&line.host, cfg)?;
    let cap = Capture::start(&line.client, "eth0", VM_MAC)?;
    vm_send_udp(&line.vm, PORT, 0..3, 64)?;
    assert!(wait_until(Duration::from_secs(3), || cap
        .udp_seqs(PORT)
        .len()
        == 3));
    assert_eq!(shim.counters().vm_mac, Some(VM_MAC.to_string()));
    // The VM forges frames from another MAC (raw socket inside the VM).
    let forged = line.vm.spawn(|| -> std::io::Result<()> {
        let s = xenft_netback::sys::PacketSocket::open("eth0")?;
        let mut f = xenft_netback::frame::gratuitous_arp(
            xenft_netback::frame::MacAddr([2, 0, 0, 0, 0, 0x66]),
            CLIENT_IP,
        );
        f.resize(60, 0);
        for _ in 0..4 {
            s.send(&f)?;
        }
        Ok(())
    })?;
    forged.join().map_err(|_| "forger panicked")??;
    assert!(wait_until(Duration::from_secs(3), || shim
        .counters()
        .dropped
        .spoofed_source
        == 4));
    assert_eq!(shim.counters().to_uplink_frames, 3);
    Ok(())
}

#[test]
fn oversize_frames_from_the_network_never_reach_the_vm() -> R<()> {
    if !require_root("inbound oversize") {
        return Ok(());
    }
    let line = Line::new()?;
    line.static_neighbours()?;
    line.client.ip(&["link", "set", "eth0", "mtu", "9000"])?;
    line.host.ip(&["link", "set", "up0", "mtu", "9000"])?;
    let shim = start_shim(&line.host, shim_config())?;
    let got = line.vm.spawn(|| -> std::io::Result<Vec<usize>> {
        let s = UdpSocket::bind((VM_IP, PORT))?;
        s.set_read_timeout(Some(Duration::from_millis(1500)))?;
        let mut sizes = Vec::new();
        let mut buf = vec![0u8; 9000];
        while let Ok(n) = s.recv(&mut buf) {
            sizes.push(n);
        }
        Ok(sizes)
    })?;
    std::thread::sleep(Duration::from_millis(200));
    line.client
        .spawn(|| -> std::io::Result<()> {
            let s = UdpSocket::bind((CLIENT_IP, 0))?;
            s.send_to(&[1u8; 5000], (VM_IP, PORT))?;
            s.send_to(&[2u8; 500], (VM_IP, PORT))?;
            Ok(())
        })?
        .join()
        .map_err(|_| "client panicked")??;
    let sizes = got.join().map_err(|_| "receiver panicked")??;
    assert_eq!(
        sizes,
        vec![500],
        "only the frame within the MTU reached the VM"
    );
    assert_eq!(shim.counters().dropped.oversize, 1);
    Ok(())
}

#[test]
fn bulk_tcp_with_offloads_on_crosses_intact_as_super_frames() -> R<()> {
    if !require_root("bulk TCP with offloads") {
        return Ok(());
    }
    use std::io::{Read, Write};
    const TOTAL: usize = 8 << 20;
    let line = Line::new()?;
    let shim = start_shim(&line.host, shim_config())?;
    let (mut conn, reader) = tcp_from_vm(&line.client, &line.vm, 9200, |mut c| {
        c.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut all = Vec::with_capacity(TOTAL);
        c.read_to_end(&mut all)?;
        Ok(all)
    })?;
    let pattern: Vec<u8> = (0..TOTAL)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    conn.write_all(&pattern)?;
    drop(conn);
    let got = reader.join()?;
    assert!(
        got == pattern,
        "{} bytes arrived, content intact: {}",
        got.len(),
        got == pattern
    );
    let c = shim.counters();
    assert!(
        c.from_vm_bytes / c.from_vm_frames.max(1) > 1514,
        "offloaded super-frames crossed whole (average {} bytes)",
        c.from_vm_bytes / c.from_vm_frames.max(1)
    );
    assert_eq!(c.dropped, xenft_netback::Drops::default());
    Ok(())
}

#[test]
fn frames_for_the_vm_still_arrive_while_its_output_waits_for_room() -> R<()> {
    if !require_root("inbound during a stall") {
        return Ok(());
    }
    let line = Line::new()?;
    line.static_neighbours()?;
    let mut cfg = shim_config();
    cfg.mode = Mode::Buffered;
    cfg.buffer_limit = 20 * 1052;
    let shim = start_shim(&line.host, cfg)?;
    let cap = Capture::start(&line.client, "eth0", VM_MAC)?;
    shim.begin_epoch(1)?;
    vm_send_udp(&line.vm, PORT, 0..30, 1000)?;
    assert!(
        wait_until(Duration::from_secs(3), || shim.counters().overflow_stalls
            == 1),
        "the VM's output stalls on the full buffer: {:?}",
        shim.counters()
    );
    // The relay forwards both ways on one thread: a frame for the VM must not wait for the
    // commit that ends the stall.
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let receiver = line.vm.spawn(move || -> std::io::Result<Vec<u8>> {
        let s = UdpSocket::bind((VM_IP, PORT + 1))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let _ = bound_tx.send(());
        let mut buf = [0u8; 64];
        let (n, _) = s.recv_from(&mut buf)?;
        Ok(buf[..n].to_vec())
    })?;
    bound_rx.recv_timeout(Duration::from_secs(3))?;
    line.client
        .spawn(|| -> std::io::Result<usize> {
            UdpSocket::bind((CLIENT_IP, 0))?.send_to(b"while stalled", (VM_IP, PORT + 1))
        })?
        .join()
        .map_err(|_| "sender panicked")??;
    let got = receiver.join().map_err(|_| "receiver panicked")??;
    assert_eq!(got, b"while stalled");
    // The relay counts a frame after it wrote it to the vif: the VM may read it first.
    assert!(
        wait_until(Duration::from_secs(3), || shim.counters().to_vm_frames == 1),
        "one frame counted toward the VM: {:?}",
        shim.counters()
    );
    let c = shim.counters();
    assert_eq!(c.held_frames_now, 20, "still stalled, nothing released");
    assert!(cap.udp_seqs(PORT).is_empty(), "no frame of epoch 1 left");
    shim.begin_epoch(2)?;
    shim.commit(1)?;
    assert!(wait_until(Duration::from_secs(3), || shim
        .counters()
        .held_frames_now
        == 10));
    shim.commit(2)?;
    assert!(wait_until(Duration::from_secs(3), || cap
        .udp_seqs(PORT)
        .len()
        == 30));
    assert_eq!(cap.udp_seqs(PORT), (0..30).collect::<Vec<_>>());
    Ok(())
}
