//! Uplink redirect, for real: the primary's uplink loses carrier; the VM's frames go through the
//! tunnel to the secondary's shim and out of its uplink, replies come back the same way; an
//! open TCP connection survives; traffic returns to the local path when the uplink is back.
//! Privileged (root): builds and removes its own namespaces.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use common::{
    counters, echo, relay_command, shim_config, start_shim, tcp_from_vm, wait_until, Child, Pool,
    CLIENT_IP, R, VM_IP, VM_MAC,
};
use xenft_netback::alink_tunnel::attach;
use xenft_netback::tunnel::{memory_pair, TunnelMsg};
use xenft_netback::{Mode, Shim, ShimConfig};
use xenft_tests::netns::require_root;

const PORT: u16 = 7100;

/// Hands what arrives in `inbox` to `shim` until `stop`.
fn pump(inbox: Receiver<Bytes>, shim: Arc<Shim>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(m) = inbox.recv_timeout(Duration::from_millis(50)) {
                shim.on_tunnel_message(&m);
            }
        }
    })
}

/// The two shims joined by an in-memory tunnel, each end's messages handed to its shim by a
/// pump thread. Dropping it stops and joins the pumps and any thread added to `threads` (which
/// watch `stop`), whether the test passed or not.
struct MemoryTunnel {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl MemoryTunnel {
    fn new(primary: &Arc<Shim>, secondary: &Arc<Shim>) -> MemoryTunnel {
        let (a_tx, a_inbox, b_tx, b_inbox) = memory_pair(4096);
        primary.set_tunnel(Arc::new(a_tx));
        secondary.set_tunnel(Arc::new(b_tx));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vec![
            pump(a_inbox, Arc::clone(primary), Arc::clone(&stop)),
            pump(b_inbox, Arc::clone(secondary), Arc::clone(&stop)),
        ];
        MemoryTunnel { stop, threads }
    }
}

impl Drop for MemoryTunnel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn exchange(conn: &mut TcpStream, round: u32) -> R<()> {
    let mut msg = [0u8; 200];
    msg[..4].copy_from_slice(&round.to_be_bytes());
    conn.write_all(&msg)?;
    let mut back = [0u8; 200];
    conn.read_exact(&mut back)?;
    assert_eq!(back, msg, "echo of round {round}");
    Ok(())
}

/// Whether `shim` is redirecting (`on`) or not within `timeout`.
fn redirect_is(shim: &Shim, on: bool, timeout: Duration) -> bool {
    wait_until(timeout, || shim.counters().redirect.redirecting == on)
}

/// Primary (pass-through, `primary_cfg`) in host_a, secondary (standby) in host_b.
fn shims(pool: &Pool, primary_cfg: ShimConfig) -> R<(Arc<Shim>, Arc<Shim>)> {
    let primary = Arc::new(start_shim(&pool.host_a, primary_cfg)?);
    let mut cfg = shim_config();
    cfg.mode = Mode::Standby;
    let secondary = Arc::new(start_shim(&pool.host_b, cfg)?);
    Ok((primary, secondary))
}

#[test]
fn open_tcp_connection_survives_uplink_loss_through_the_tunnel_and_returns_local() -> R<()> {
    if !require_root("uplink redirect") {
        return Ok(());
    }
    let pool = Pool::new()?;
    let (primary, secondary) = shims(&pool, shim_config())?;
    let _tunnel = MemoryTunnel::new(&primary, &secondary);
    cut_and_restore_uplink(&pool, &primary, &secondary)
}

#[test]
fn open_tcp_connection_survives_uplink_loss_over_the_alink() -> R<()> {
    if !require_root("uplink redirect over the A-link") {
        return Ok(());
    }
    let pool = Pool::new()?;
    let (primary, secondary) = shims(&pool, shim_config())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Two loopback paths in the test's own namespace stand for the hosts' private links.
    let (la, lb) = rt.block_on(xenft_alink::testing::loopback_pair(2))?;
    assert!(rt.block_on(la.wait_connected(Duration::from_secs(5))));
    let att_a = attach(Arc::clone(&primary), &la, rt.handle())?;
    let att_b = attach(Arc::clone(&secondary), &lb, rt.handle())?;
    let result = cut_and_restore_uplink(&pool, &primary, &secondary);
    drop(att_a);
    drop(att_b);
    la.shutdown();
    lb.shutdown();
    result
}

#[test]
fn silent_uplink_with_carrier_is_detected_and_redirected_while_the_peer_sees_the_network() -> R<()>
{
    if !require_root("silent uplink redirect") {
        return Ok(());
    }
    let pool = Pool::new()?;
    let mut cfg = shim_config();
    cfg.silence_timeout = Some(Duration::from_millis(300));
    let (primary, secondary) = shims(&pool, cfg)?;
    let mut tunnel = MemoryTunnel::new(&primary, &secondary);
    // The rest of the LAN: a broadcast every 100 ms, as any network has.
    let stop = Arc::clone(&tunnel.stop);
    tunnel.threads.push(pool.client.spawn(move || {
        let Ok(s) = std::net::UdpSocket::bind((CLIENT_IP, 0)) else {
            return;
        };
        let _ = s.set_broadcast(true);
        while !stop.load(Ordering::Relaxed) {
            let _ = s.send_to(b"lan chatter", ("10.77.0.255", 9999));
            std::thread::sleep(Duration::from_millis(100));
        }
    })?);
    let (mut conn, server) = tcp_from_vm(&pool.client, &pool.vm_a, PORT, echo)?;
    for round in 0..5 {
        exchange(&mut conn, round)?;
    }
    // The switch port stays up (carrier on) but no longer forwards anything.
    pool.sw.ip(&["link", "set", "pa", "nomaster"])?;
    for round in 5..25 {
        exchange(&mut conn, round)?;
    }
    let c = primary.counters();
    assert!(c.redirect.uplink_up, "carrier never went away");
    assert!(c.redirect.redirecting, "{:?}", c.redirect);
    assert_eq!(
        c.redirect.reason,
        Some(xenft_netback::RedirectReason::Silence)
    );
    pool.sw.ip(&["link", "set", "pa", "master", "br0"])?;
    assert!(
        redirect_is(&primary, false, Duration::from_secs(3)),
        "frames arriving again end the redirect"
    );
    for round in 25..30 {
        exchange(&mut conn, round)?;
    }
    drop(conn);
    server.join()
}

#[test]
fn binaries_joined_by_an_alink_between_the_hosts_carry_a_tcp_connection_over_an_uplink_cut() -> R<()>
{
    if !require_root("binary redirect over the A-link") {
        return Ok(());
    }
    let pool = Pool::new()?;
    // The hosts' private link: its own veth pair, separate from the switched network.
    xenft_tests::netns::veth(
        &pool.host_a,
        "al0",
        "10.99.0.1/24",
        &pool.host_b,
        "al0",
        "10.99.0.2/24",
    )?;
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"netback test pool secret, 32 by")?;
    let run = |ns: &xenft_tests::netns::Netns, me: &str, peer: &str, path: &str, mode: &str| {
        let sock = dir.path().join(format!("{me}.sock"));
        let child = relay_command(ns)
            .args(["--mode", mode, "--alink-host", me, "--alink-peer", peer])
            .arg("--alink-secret-file")
            .arg(&secret)
            .args(["--alink-path", path])
            .arg("--control")
            .arg(&sock)
            .spawn()
            .map(Child);
        (sock, child)
    };
    let (sock_a, a) = run(
        &pool.host_a,
        "host-a",
        "host-b",
        "10.99.0.1:7020=10.99.0.2:7020",
        "passthrough",
    );
    let _a = a?;
    let (sock_b, b) = run(
        &pool.host_b,
        "host-b",
        "host-a",
        "10.99.0.2:7020=10.99.0.1:7020",
        "standby",
    );
    let _b = b?;
    assert!(wait_until(Duration::from_secs(5), || sock_a.exists()
        && sock_b.exists()));
    let (mut conn, server) = tcp_from_vm(&pool.client, &pool.vm_a, PORT, echo)?;
    for round in 0..5 {
        exchange(&mut conn, round)?;
    }
    pool.sw.ip(&["link", "set", "pa", "down"])?;
    assert!(
        wait_until(Duration::from_secs(3), || counters(&sock_a)
            .is_ok_and(|c| c.redirect.redirecting)),
        "the primary binary redirects"
    );
    for round in 5..25 {
        exchange(&mut conn, round)?;
    }
    let (ca, cb) = (counters(&sock_a)?, counters(&sock_b)?);
    assert!(
        ca.tunnel_out_frames >= 20 && ca.tunnel_in_frames >= 20,
        "{ca:?}"
    );
    assert!(cb.redirect.serving_peer, "{cb:?}");
    pool.sw.ip(&["link", "set", "pa", "up"])?;
    assert!(wait_until(Duration::from_secs(3), || counters(&sock_a)
        .is_ok_and(|c| !c.redirect.redirecting)));
    for round in 25..30 {
        exchange(&mut conn, round)?;
    }
    drop(conn);
    server.join()
}

/// The scenario: a TCP connection from the VM to the client, the primary's switch port goes
/// down and comes back; every exchange succeeds, on the same connection.
fn cut_and_restore_uplink(pool: &Pool, primary: &Shim, secondary: &Shim) -> R<()> {
    // Echo server in the client namespace, a connection to it from the primary's VM.
    let (mut conn, server) = tcp_from_vm(&pool.client, &pool.vm_a, PORT, echo)?;
    assert_eq!(conn.local_addr()?.ip(), VM_IP);
    for round in 0..5 {
        exchange(&mut conn, round)?;
    }
    assert_eq!(pool.fdb_port(VM_MAC)?.as_deref(), Some("pa"));

    // Cable cut between the primary and the switch.
    pool.sw.ip(&["link", "set", "pa", "down"])?;
    assert!(
        redirect_is(primary, true, Duration::from_secs(2)),
        "the primary redirects when its uplink loses carrier"
    );
    for round in 5..25 {
        exchange(&mut conn, round)?;
    }
    let (p, s) = (primary.counters(), secondary.counters());
    assert!(
        p.tunnel_out_frames >= 20 && p.tunnel_in_frames >= 20,
        "{p:?}"
    );
    assert!(s.redirect.serving_peer && s.tunnel_in_frames >= 20, "{s:?}");
    assert_eq!(pool.fdb_port(VM_MAC)?.as_deref(), Some("pb"));
    assert_eq!(
        s.to_vm_frames, 0,
        "the standby copy of the VM received nothing"
    );

    // Cable back: traffic returns to the local path.
    pool.sw.ip(&["link", "set", "pa", "up"])?;
    assert!(
        redirect_is(primary, false, Duration::from_secs(3)),
        "the primary stops redirecting when its uplink is back"
    );
    let tunnelled = primary.counters().tunnel_out_frames;
    for round in 25..30 {
        exchange(&mut conn, round)?;
    }
    assert_eq!(
        primary.counters().tunnel_out_frames,
        tunnelled,
        "local path again"
    );
    assert_eq!(pool.fdb_port(VM_MAC)?.as_deref(), Some("pa"));
    assert!(wait_until(Duration::from_secs(2), || !secondary
        .counters()
        .redirect
        .serving_peer));
    drop(conn);
    server.join()
}

#[test]
fn garbage_on_the_tunnel_is_dropped_and_counted() -> R<()> {
    if !require_root("tunnel garbage") {
        return Ok(());
    }
    let line = common::Line::new()?;
    let shim = start_shim(&line.host, shim_config())?;
    let other = xenft_netback::frame::MacAddr([2, 0, 0, 0, 0, 9]);
    for msg in [
        Bytes::from_static(b""),
        Bytes::from_static(b"garbage!garbage!"),
        TunnelMsg::RedirectStart(other).encode(),
        // A frame for the VM while no redirect is active: unexpected, not delivered.
        TunnelMsg::ToVm(VM_MAC, Bytes::from(vec![0u8; 60])).encode(),
    ] {
        shim.on_tunnel_message(&msg);
    }
    let c = shim.counters();
    assert_eq!(c.dropped.tunnel_garbage, 3);
    assert_eq!(c.dropped.tunnel_unexpected, 1);
    assert_eq!(c.to_vm_frames, 0);
    assert!(!c.redirect.serving_peer);
    Ok(())
}

#[test]
fn garbage_from_the_peer_on_the_alink_net_channel_is_dropped_and_counted() -> R<()> {
    if !require_root("A-link garbage") {
        return Ok(());
    }
    let line = common::Line::new()?;
    let shim = Arc::new(start_shim(&line.host, shim_config())?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (la, lb) = rt.block_on(xenft_alink::testing::loopback_pair(1))?;
    let att = attach(Arc::clone(&shim), &la, rt.handle())?;
    rt.block_on(async {
        lb.send(
            xenft_alink::Channel::Net,
            Bytes::from_static(b"\x01\x09not a tunnel message"),
        )
        .await?;
        lb.send(xenft_alink::Channel::Net, Bytes::from_static(b"x"))
            .await
    })?;
    assert!(
        wait_until(Duration::from_secs(5), || shim
            .counters()
            .dropped
            .tunnel_garbage
            == 2),
        "{:?}",
        shim.counters().dropped
    );
    assert_eq!(shim.counters().to_vm_frames, 0);
    drop(att);
    la.shutdown();
    lb.shutdown();
    Ok(())
}

#[test]
fn serving_side_stops_announcing_the_mac_once_the_peer_returns() -> R<()> {
    if !require_root("announcement repeats") {
        return Ok(());
    }
    let line = common::Line::new()?;
    let mut cfg = shim_config();
    cfg.mode = Mode::Standby;
    let shim = start_shim(&line.host, cfg)?;
    let (tx, _peer_inbox, _unused_tx, _unused_inbox) = memory_pair(64);
    shim.set_tunnel(Arc::new(tx));
    shim.on_tunnel_message(&TunnelMsg::RedirectStart(VM_MAC).encode());
    assert!(shim.counters().redirect.serving_peer);
    assert_eq!(
        shim.counters().announcements_sent,
        1,
        "relearn frame (no address known)"
    );
    std::thread::sleep(Duration::from_millis(50));
    shim.on_tunnel_message(&TunnelMsg::RedirectStop(VM_MAC).encode());
    // Past every scheduled repeat: a late one would pull the MAC away from the returned peer.
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(shim.counters().announcements_sent, 1);
    Ok(())
}

#[test]
fn agent_can_force_the_redirect_on_and_off_without_losing_the_connection() -> R<()> {
    if !require_root("forced redirect") {
        return Ok(());
    }
    let pool = Pool::new()?;
    let (primary, secondary) = shims(&pool, shim_config())?;
    let _tunnel = MemoryTunnel::new(&primary, &secondary);
    let (mut conn, server) = tcp_from_vm(&pool.client, &pool.vm_a, PORT, echo)?;
    exchange(&mut conn, 0)?;
    primary.set_redirect(Some(true));
    assert!(redirect_is(&primary, true, Duration::from_secs(2)));
    assert_eq!(
        primary.counters().redirect.reason,
        Some(xenft_netback::RedirectReason::Forced)
    );
    for round in 1..10 {
        exchange(&mut conn, round)?;
    }
    assert_eq!(pool.fdb_port(VM_MAC)?.as_deref(), Some("pb"));
    assert!(primary.counters().tunnel_out_frames >= 9);
    primary.set_redirect(Some(false));
    assert!(redirect_is(&primary, false, Duration::from_secs(2)));
    for round in 10..15 {
        exchange(&mut conn, round)?;
    }
    assert_eq!(pool.fdb_port(VM_MAC)?.as_deref(), Some("pa"));
    primary.set_redirect(None);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !primary.counters().redirect.redirecting,
        "healthy uplink: stays local"
    );
    drop(conn);
    server.join()
}
