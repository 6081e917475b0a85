//! Isolation of a fenced copy: the relay passes no frame in either direction whatever the VM
//! does, keeps what it held for an epoch, and lets frames through again on unfence (or a
//! take-over). Privileged (root): builds and removes its own namespaces.

mod common;

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    counters, relay_command, shim_config, start_shim, vm_send_udp, wait_until, Capture, Child,
    Line, CLIENT_IP, R, VM_IP, VM_MAC,
};
use xenft_control::netback::{Reply, Request};
use xenft_control::{Client, Netback};
use xenft_netback::Mode;
use xenft_tests::netns::{require_root, Netns};

const PORT: u16 = 9300;

/// Sends `n` UDP datagrams from the client to the VM's `port` (the VM need not listen: the
/// relay counts what it delivers).
fn client_send_udp(client: &Netns, port: u16, n: u8) -> R<()> {
    client
        .spawn(move || -> std::io::Result<()> {
            let s = std::net::UdpSocket::bind((CLIENT_IP, 0))?;
            for i in 0..n {
                s.send_to(&[i; 64], (VM_IP, port))?;
            }
            Ok(())
        })?
        .join()
        .map_err(|_| "sender panicked")??;
    Ok(())
}

#[test]
fn an_isolated_relay_passes_nothing_either_way_keeps_its_held_epoch_and_a_takeover_ends_it() -> R<()>
{
    if !require_root("isolated relay") {
        return Ok(());
    }
    // Arrange: a buffered relay (level 3) holding epoch 1's frames.
    let line = Line::new()?;
    line.static_neighbours()?;
    let mut cfg = shim_config();
    cfg.mode = Mode::Buffered;
    let shim = start_shim(&line.host, cfg)?;
    let cap = Capture::start(&line.client, "eth0", VM_MAC)?;
    shim.begin_epoch(1)?;
    vm_send_udp(&line.vm, PORT, 0..5, 100)?;
    assert!(wait_until(Duration::from_secs(3), || shim
        .counters()
        .held_frames_now
        == 5));

    // Act: fence.
    shim.set_isolated(true);
    vm_send_udp(&line.vm, PORT, 5..10, 100)?;
    client_send_udp(&line.client, PORT, 4)?;

    // Assert: nothing left the VM, nothing reached it, nothing announced; epoch 1 still held.
    assert!(wait_until(Duration::from_secs(3), || shim
        .counters()
        .dropped
        .isolated
        >= 9));
    let c = shim.counters();
    assert!(c.isolated);
    assert_eq!((c.to_vm_frames, c.to_uplink_frames), (0, 0), "{c:?}");
    assert_eq!(c.held_frames_now, 5, "the fence keeps the held epoch");
    assert_eq!(shim.announce(), 0, "a fenced copy announces nothing");
    std::thread::sleep(Duration::from_millis(200));
    assert!(cap.udp_seqs(PORT).is_empty(), "{:?}", cap.udp_seqs(PORT));

    // Act: unfence, then commit epoch 1.
    shim.set_isolated(false);
    assert_eq!(shim.commit(1)?, 5);

    // Assert: the held frames leave, in order; the ones sent while fenced never do.
    assert!(wait_until(Duration::from_secs(3), || cap
        .udp_seqs(PORT)
        .len()
        == 5));
    assert_eq!(cap.udp_seqs(PORT), vec![0, 1, 2, 3, 4]);
    client_send_udp(&line.client, PORT, 2)?;
    assert!(wait_until(Duration::from_secs(3), || shim
        .counters()
        .to_vm_frames
        >= 2));

    // A take-over (the agent gave this copy the VM) ends an isolation and announces.
    shim.set_isolated(true);
    assert!(shim.takeover(Mode::Passthrough) > 0);
    assert!(!shim.counters().isolated);
    vm_send_udp(&line.vm, PORT, 20..21, 100)?;
    assert!(wait_until(Duration::from_secs(3), || cap
        .udp_seqs(PORT)
        .contains(&20)));
    Ok(())
}

/// A TCP listener on the VM's address that accepts (and drops) connections until dropped.
struct VmListener {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl VmListener {
    fn start(vm: &Netns, port: u16) -> R<Self> {
        let listener = vm
            .spawn(move || TcpListener::bind((VM_IP, port)))?
            .join()
            .map_err(|_| "bind panicked")??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                if listener.accept().is_err() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for VmListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP connection from the client to the VM's service, or why not (2 s at most).
fn connect_from_client(client: &Netns, port: u16) -> R<Result<(), String>> {
    let r = client
        .spawn(move || {
            TcpStream::connect_timeout(&(VM_IP, port).into(), Duration::from_secs(2))
                .map(drop)
                .map_err(|e| e.to_string())
        })?
        .join()
        .map_err(|_| "connect panicked")?;
    Ok(r)
}

/// The client forgets the VM's MAC, a static entry included (the next connection needs an
/// ARP answer).
fn forget_neighbours(client: &Netns) -> R<()> {
    let _ = client.ip(&["neigh", "del", &VM_IP.to_string(), "dev", "eth0"]);
    client.ip(&["neigh", "flush", "dev", "eth0"])?;
    Ok(())
}

#[test]
fn a_fenced_vms_address_answers_neither_arp_nor_tcp_from_outside_until_unfenced() -> R<()> {
    if !require_root("fenced VM silent on the network") {
        return Ok(());
    }
    // Arrange: the production relay between a VM that runs (and would answer) and a client.
    let line = Line::new()?;
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("ctl.sock");
    let _relay = Child(
        relay_command(&line.host)
            .args(["--mode", "passthrough"])
            .arg("--control")
            .arg(&sock)
            .spawn()?,
    );
    assert!(wait_until(Duration::from_secs(5), || sock.exists()));
    let ctl: Client<Netback> = Client::new(&sock, Duration::from_secs(5));
    let _service = VmListener::start(&line.vm, PORT)?;
    assert_eq!(connect_from_client(&line.client, PORT)?, Ok(()));

    // Act: the agent fences the copy.
    assert_eq!(ctl.call(&Request::Isolate { on: true })?, Reply::Done);

    // Assert: no ARP answer, and with the MAC known, no SYN-ACK either.
    forget_neighbours(&line.client)?;
    let arp = connect_from_client(&line.client, PORT)?;
    assert!(arp.is_err(), "the fenced VM answered through ARP");
    line.static_neighbours()?;
    let syn = connect_from_client(&line.client, PORT)?;
    assert!(syn.is_err(), "the fenced VM answered a SYN");
    let c = counters(&sock)?;
    assert!(c.isolated, "{c:?}");
    assert!(c.dropped.isolated > 0, "{:?}", c.dropped);

    // Act: unfence.
    assert_eq!(ctl.call(&Request::Isolate { on: false })?, Reply::Done);

    // Assert: the address answers again, ARP included.
    forget_neighbours(&line.client)?;
    assert_eq!(connect_from_client(&line.client, PORT)?, Ok(()));
    assert!(!counters(&sock)?.isolated);
    Ok(())
}
