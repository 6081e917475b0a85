//! Takeover with the same MAC and IP, for real: two hosts and a client on one bridge.
//! The primary is the `xenft-netback` binary (killed with SIGKILL); the secondary is the library
//! in standby. Privileged (root): builds and removes its own namespaces.

mod common;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    relay_command, shim_config, start_shim, wait_until, Child, Pool, CLIENT_IP, R, VM_IP, VM_MAC,
};
use xenft_netback::Mode;
use xenft_tests::netns::{require_root, Netns};

const PORT: u16 = 7000;

/// A UDP echo server in `ns` that prefixes each reply with `tag`.
fn echo_server(ns: &Netns, tag: u8, stop: Arc<AtomicBool>) -> R<std::thread::JoinHandle<()>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = ns.spawn(move || {
        let s = match UdpSocket::bind((VM_IP, PORT)) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
        let _ = ready_tx.send(Ok(()));
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf[1..]) {
                buf[0] = tag;
                let _ = s.send_to(&buf[..=n], from);
            }
        }
    })?;
    ready_rx.recv()??;
    Ok(h)
}

/// The client's request/response stream: one request every 20 ms; records who answered.
fn client_stream(
    ns: &Netns,
    answers: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
) -> R<std::thread::JoinHandle<()>> {
    Ok(ns.spawn(move || {
        let Ok(s) = UdpSocket::bind((CLIENT_IP, 0)) else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
        let mut seq = 0u32;
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let _ = s.send_to(&seq.to_be_bytes(), (VM_IP, PORT));
            while let Ok(n) = s.recv(&mut buf) {
                if n == 5 {
                    answers.lock().unwrap().push(buf[0]);
                }
            }
        }
    })?)
}

fn count(answers: &Mutex<Vec<u8>>, tag: u8) -> usize {
    answers
        .lock()
        .unwrap()
        .iter()
        .filter(|t| **t == tag)
        .count()
}

#[test]
fn secondary_takes_over_same_mac_and_ip_when_primary_shim_is_killed() -> R<()> {
    if !require_root("takeover") {
        return Ok(());
    }
    let pool = Pool::new()?;
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("primary.sock");
    let mut primary = Child(
        relay_command(&pool.host_a)
            .arg("--control")
            .arg(&sock)
            .spawn()?,
    );
    assert!(
        wait_until(Duration::from_secs(5), || sock.exists()),
        "primary's control socket"
    );
    let mut cfg = shim_config();
    cfg.mode = Mode::Standby;
    let secondary = start_shim(&pool.host_b, cfg)?;

    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let servers = [
        echo_server(&pool.vm_a, b'A', Arc::clone(&stop))?,
        echo_server(&pool.vm_b, b'B', Arc::clone(&stop))?,
    ];
    let client = client_stream(&pool.client, Arc::clone(&answers), Arc::clone(&stop))?;
    let stop_all = || {
        stop.store(true, Ordering::Relaxed);
    };

    let result = (|| -> R<()> {
        assert!(
            wait_until(Duration::from_secs(5), || count(&answers, b'A') >= 5),
            "the primary's VM answers first"
        );
        assert_eq!(count(&answers, b'B'), 0, "the standby copy stays silent");
        assert_eq!(pool.fdb_port(VM_MAC)?.as_deref(), Some("pa"));

        // The agent replicates the addresses the primary learnt from the VM's traffic.
        let learned = common::counters(&sock)?.learned_ipv4;
        assert_eq!(learned, vec![VM_IP]);
        secondary.add_addresses(&learned.iter().map(|a| (*a).into()).collect::<Vec<_>>());

        primary.0.kill()?;
        primary.0.wait()?;
        let t0 = Instant::now();
        let announced = secondary.takeover(Mode::Passthrough);
        assert!(
            announced >= 2,
            "gratuitous ARP and relearn frame: {announced}"
        );
        assert!(
            wait_until(Duration::from_secs(1), || pool
                .fdb_port(VM_MAC)
                .ok()
                .flatten()
                .as_deref()
                == Some("pb")),
            "the switch learns the secondary's port within 1 s"
        );
        let moved = t0.elapsed();
        let neigh = common::sh(&pool.client, "ip", &["neigh", "show", &VM_IP.to_string()])?;
        assert!(
            neigh.contains(&VM_MAC.to_string()),
            "client neighbour entry: {neigh}"
        );
        let before = count(&answers, b'B');
        assert!(
            wait_until(Duration::from_secs(3), || count(&answers, b'B')
                >= before + 5),
            "the stream resumes with the secondary's VM"
        );
        eprintln!("switch port moved {moved:?} after takeover");
        let c = secondary.counters();
        assert_eq!(c.mode, Mode::Passthrough);
        assert!(c.announcements_sent >= 2);
        Ok(())
    })();
    stop_all();
    let _ = client.join();
    for s in servers {
        let _ = s.join();
    }
    result
}

#[test]
fn takeover_announcements_repoint_client_arp_and_ndp_entries_to_the_vm_mac() -> R<()> {
    if !require_root("takeover announcements") {
        return Ok(());
    }
    let line = common::Line::new()?;
    // IPv6 on the client only (the Line topology starts with it off everywhere).
    common::sh(
        &line.client,
        "sysctl",
        &["-qw", "net.ipv6.conf.all.disable_ipv6=0"],
    )?;
    common::sh(
        &line.client,
        "sysctl",
        &["-qw", "net.ipv6.conf.eth0.disable_ipv6=0"],
    )?;
    line.client
        .ip(&["-6", "addr", "add", "fd00::1/64", "dev", "eth0", "nodad"])?;
    // Stale entries pointing at the old location's MAC.
    let stale = "02:00:00:00:00:99";
    line.client.ip(&[
        "neigh",
        "replace",
        &VM_IP.to_string(),
        "lladdr",
        stale,
        "dev",
        "eth0",
        "nud",
        "stale",
    ])?;
    line.client.ip(&[
        "-6", "neigh", "replace", "fd00::2", "lladdr", stale, "dev", "eth0", "nud", "stale",
    ])?;
    let mut cfg = shim_config();
    cfg.mode = Mode::Standby;
    let shim = start_shim(&line.host, cfg)?;
    shim.add_addresses(&[
        VM_IP.into(),
        "fd00::2".parse::<std::net::Ipv6Addr>()?.into(),
    ]);
    assert_eq!(
        shim.takeover(Mode::Passthrough),
        3,
        "GARP, NA, relearn frame"
    );
    let mac = VM_MAC.to_string();
    let show = |args: &[&str]| common::sh(&line.client, "ip", args).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(1), || show(&[
            "neigh",
            "show",
            &VM_IP.to_string()
        ])
        .contains(&mac)),
        "ARP entry: {}",
        show(&["neigh", "show", &VM_IP.to_string()])
    );
    assert!(
        wait_until(Duration::from_secs(1), || show(&[
            "-6", "neigh", "show", "fd00::2"
        ])
        .contains(&mac)),
        "NDP entry: {}",
        show(&["-6", "neigh", "show", "fd00::2"])
    );
    assert!(
        wait_until(Duration::from_secs(3), || shim
            .counters()
            .announcements_sent
            == 9),
        "the announcement is repeated twice: {}",
        shim.counters().announcements_sent
    );
    Ok(())
}
