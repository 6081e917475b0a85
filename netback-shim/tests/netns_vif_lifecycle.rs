//! The vif exists only while the domain runs: the relay starts without it, binds it when it
//! appears, and rebinds it after the domain is destroyed and started again (new ifindex).
//! Privileged (root): builds and removes its own namespaces.

mod common;

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::time::Duration;

use common::{
    relay_command, shim_config, start_shim, tcp_from_vm, wait_until, Capture, Child, Line,
    CLIENT_IP, R, VM_IP, VM_MAC,
};
use xenft_control::netback::{Reply, Request};
use xenft_netback::{Mode, Shim};
use xenft_tests::netns::{require_root, Netns};

/// One TCP connection from the VM to an echo server on the client: both directions flow.
fn echo_round_trip(line: &Line, port: u16) -> R<()> {
    let (mut conn, server) = tcp_from_vm(&line.client, &line.vm, port, common::echo)?;
    let msg = b"vif lifecycle round trip";
    conn.write_all(msg)?;
    let mut back = [0u8; 24];
    conn.read_exact(&mut back)?;
    assert_eq!(&back, msg, "echoed by the client");
    drop(conn);
    server.join()?;
    Ok(())
}

/// Sends `n` UDP datagrams from the client to the VM's address (unicast to the VM's MAC).
fn client_send_udp(client: &Netns, n: usize) -> R<()> {
    client
        .spawn(move || -> std::io::Result<()> {
            let s = UdpSocket::bind((CLIENT_IP, 0))?;
            for _ in 0..n {
                s.send_to(b"for the vm", (VM_IP, 9))?;
            }
            Ok(())
        })?
        .join()
        .map_err(|_| "sender panicked")??;
    Ok(())
}

/// The client sends until the relay counts frames dropped for an absent vif.
fn frames_for_absent_vif_are_counted(line: &Line, shim: &Shim) -> R<()> {
    let before = shim.counters().dropped.vif_absent;
    let mut dropped = false;
    for _ in 0..20 {
        client_send_udp(&line.client, 5)?;
        if wait_until(Duration::from_millis(200), || {
            shim.counters().dropped.vif_absent > before
        }) {
            dropped = true;
            break;
        }
    }
    assert!(
        dropped,
        "frames for the VM while its vif is absent: {:?}",
        shim.counters()
    );
    Ok(())
}

#[test]
fn relay_started_before_the_vif_exists_binds_it_when_it_appears() -> R<()> {
    if !require_root("vif appears later") {
        return Ok(());
    }
    let line = Line::without_vif()?;
    let shim = start_shim(&line.host, shim_config())?;
    let c = shim.counters();
    assert!(!c.vif_bound, "no vif yet: {c:?}");
    assert_eq!(c.vif_ifindex, None);
    assert_eq!(c.vif_binds, 0);
    frames_for_absent_vif_are_counted(&line, &shim)?;

    line.add_vif()?;
    assert!(
        wait_until(Duration::from_secs(5), || shim.counters().vif_bound),
        "the relay binds the vif once it exists: {:?}",
        shim.counters()
    );
    echo_round_trip(&line, 7101)?;
    let c = shim.counters();
    assert_eq!(c.vif_binds, 1);
    assert_eq!(c.vif_losses, 0);
    assert!(c.vif_ifindex.is_some());
    assert!(c.from_vm_frames > 0 && c.to_vm_frames > 0, "{c:?}");
    Ok(())
}

#[test]
fn relay_rebinds_a_vif_recreated_under_the_same_name() -> R<()> {
    if !require_root("vif recreated") {
        return Ok(());
    }
    let line = Line::new()?;
    line.static_neighbours()?;
    let shim = start_shim(&line.host, shim_config())?;
    let first = shim.counters();
    assert!(first.vif_bound, "the vif exists at start: {first:?}");
    assert_eq!(first.vif_binds, 1);
    let first_index = first.vif_ifindex.ok_or("no ifindex")?;
    echo_round_trip(&line, 7102)?;

    // The domain is destroyed: its vif goes.
    line.del_vif()?;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let c = shim.counters();
            !c.vif_bound && c.vif_losses == 1
        }),
        "the relay notices the vif is gone: {:?}",
        shim.counters()
    );
    assert_eq!(shim.counters().vif_ifindex, None);
    frames_for_absent_vif_are_counted(&line, &shim)?;

    // The domain is started again: a new vif with the same name and a new ifindex.
    line.add_vif()?;
    assert!(
        wait_until(Duration::from_secs(5), || shim.counters().vif_bound),
        "the relay binds the new vif: {:?}",
        shim.counters()
    );
    let c = shim.counters();
    assert_eq!(c.vif_binds, 2);
    assert_ne!(
        c.vif_ifindex,
        Some(first_index),
        "bound to the new interface"
    );
    echo_round_trip(&line, 7103)?;
    Ok(())
}

/// True when `f` is a gratuitous ARP from the VM's MAC for `VM_IP`.
fn is_gratuitous_arp_for_vm(f: &[u8]) -> bool {
    f.get(12..14) == Some(&[0x08, 0x06])
        && f.get(22..28) == Some(&VM_MAC.0[..])
        && f.get(28..32) == Some(&VM_IP.octets()[..])
        && f.get(38..42) == Some(&VM_IP.octets()[..])
}

#[test]
fn takeover_with_the_vif_absent_answers_ok_and_announces_on_the_uplink() -> R<()> {
    if !require_root("takeover without vif") {
        return Ok(());
    }
    let line = Line::without_vif()?;
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("relay.sock");
    let _relay = Child(
        relay_command(&line.host)
            .args(["--mode", "standby", "--control"])
            .arg(&sock)
            .spawn()?,
    );
    assert!(
        wait_until(Duration::from_secs(5), || sock.exists()),
        "the relay serves its control socket without the vif"
    );
    let capture = Capture::start(&line.client, "eth0", VM_MAC)?;

    // The agent replicates the primary's addresses, then takes over before the domain runs.
    let reply = common::call(
        &sock,
        &Request::AddAddresses {
            addresses: vec![VM_IP.into()],
        },
    )?;
    assert_eq!(reply, Reply::Done);
    let reply = common::call(
        &sock,
        &Request::Takeover {
            mode: Mode::Passthrough,
        },
    )
    .map_err(|e| format!("takeover without vif: {e}"))?;
    assert_eq!(
        reply,
        Reply::Announced { announced: 2 },
        "gratuitous ARP and relearn frame"
    );
    assert!(
        wait_until(Duration::from_secs(2), || capture
            .frames
            .lock()
            .unwrap()
            .iter()
            .any(|f| is_gratuitous_arp_for_vm(f))),
        "the client sees the gratuitous ARP"
    );
    let c = common::counters(&sock)?;
    assert!(!c.vif_bound, "{c:?}");
    assert_eq!(c.mode, Mode::Passthrough);

    // The domain starts on this host now: its traffic flows.
    line.add_vif()?;
    assert!(
        wait_until(Duration::from_secs(5), || {
            common::counters(&sock).is_ok_and(|c| c.vif_bound)
        }),
        "the relay binds the vif after the takeover"
    );
    echo_round_trip(&line, 7104)?;
    Ok(())
}

/// A relay started with the vif present behaves as before: bound at once.
#[test]
fn relay_started_with_the_vif_present_is_bound_at_once() -> R<()> {
    if !require_root("vif present at start") {
        return Ok(());
    }
    let line = Line::new()?;
    let mut cfg = shim_config();
    cfg.mode = Mode::Standby;
    let shim = start_shim(&line.host, cfg)?;
    let c = shim.counters();
    assert!(c.vif_bound && c.vif_ifindex.is_some(), "{c:?}");
    assert_eq!((c.vif_binds, c.vif_losses), (1, 0));
    Ok(())
}
