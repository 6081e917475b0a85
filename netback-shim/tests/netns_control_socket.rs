//! The binary driven through its control socket, as the agent drives it: epochs, commit,
//! early-checkpoint events, typed errors for bad requests. Privileged (root): builds and removes its
//! own namespaces.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{counters, relay_command, vm_send_udp, wait_until, Capture, Child, Line, R, VM_MAC};
use xenft_control::netback::{Event, Reply, Request};
use xenft_control::{Client, ErrorKind, Netback};
use xenft_netback::Mode;
use xenft_tests::netns::require_root;

const PORT: u16 = 9100;

#[test]
fn agent_drives_epochs_over_the_control_socket_and_hears_early_checkpoint_requests() -> R<()> {
    if !require_root("control socket") {
        return Ok(());
    }
    let line = Line::new()?;
    line.static_neighbours()?;
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("ctl.sock");
    let _relay = Child(
        relay_command(&line.host)
            .args(["--mode", "buffered", "--buffer-bytes", "21040"])
            .arg("--control")
            .arg(&sock)
            .spawn()?,
    );
    assert!(wait_until(Duration::from_secs(5), || sock.exists()));
    let cap = Capture::start(&line.client, "eth0", VM_MAC)?;
    let ctl: Client<Netback> = Client::new(&sock, Duration::from_secs(5));
    let mut events = ctl.subscribe()?;

    // Bad requests get a typed reason, and the connection stays usable.
    let mut raw = BufReader::new(UnixStream::connect(&sock)?);
    raw.get_mut().write_all(
        b"{\"v\":1,\"req\":{\"op\":\"explode\"}}\n{\"v\":1,\"req\":{\"op\":\"discard\"}}\n",
    )?;
    let (mut reply, mut next) = (String::new(), String::new());
    raw.read_line(&mut reply)?;
    raw.read_line(&mut next)?;
    assert!(reply.contains("\"kind\":\"unknown_request\""), "{reply}");
    assert!(next.contains("\"discarded\":0"), "{next}");
    let e = ctl.call(&Request::Commit { epoch: 5 }).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Refused), "{e}");
    assert!(e.to_string().contains("epoch 5"), "{e}");

    assert_eq!(ctl.call(&Request::BeginEpoch { epoch: 1 })?, Reply::Done);
    vm_send_udp(&line.vm, PORT, 0..30, 1000)?;

    // 20 frames (1042 B + 10 B offload header each) fill the 21 040-byte buffer: the agent hears about it before it overflows.
    assert_eq!(
        events.next_within(Duration::from_secs(5))?,
        Some(Event::EarlyCheckpoint { epoch: 1 })
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        cap.udp_payloads(PORT).is_empty(),
        "nothing leaves before commit"
    );

    assert_eq!(ctl.call(&Request::BeginEpoch { epoch: 2 })?, Reply::Done);
    assert_eq!(
        ctl.call(&Request::Commit { epoch: 1 })?,
        Reply::Released { released: 20 }
    );
    assert!(wait_until(Duration::from_secs(3), || {
        counters(&sock).is_ok_and(|c| c.held_frames_now == 10)
    }));
    assert_eq!(
        ctl.call(&Request::Commit { epoch: 2 })?,
        Reply::Released { released: 10 }
    );
    assert!(wait_until(Duration::from_secs(3), || cap
        .udp_payloads(PORT)
        .len()
        == 30));
    assert_eq!(cap.udp_seqs(PORT), (0..30).collect::<Vec<_>>());

    let c = counters(&sock)?;
    assert_eq!(c.mode, Mode::Buffered);
    assert_eq!(
        (
            c.released_frames,
            c.early_checkpoint_requests,
            c.overflow_stalls
        ),
        (30, 1, 1)
    );
    assert_eq!(
        ctl.call(&Request::SetMode {
            mode: Mode::Passthrough
        })?,
        Reply::Done
    );
    assert_eq!(
        ctl.call(&Request::Discard)?,
        Reply::Discarded { discarded: 0 }
    );
    Ok(())
}
