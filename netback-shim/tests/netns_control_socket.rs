//! The binary driven through its control socket, as the agent drives it: epochs, commit,
//! early-checkpoint events, errors for bad requests. Privileged (root): builds and removes its
//! own namespaces.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{relay_command, vm_send_udp, wait_until, Capture, Child, Line, R, VM_MAC};
use xenft_netback::control::{request, Request};
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
    let mut ctl = BufReader::new(UnixStream::connect(&sock)?);
    let mut events = BufReader::new(UnixStream::connect(&sock)?);
    assert!(request(&mut events, &Request::Subscribe)?.ok);

    // Bad requests get a reason, and the connection stays usable.
    ctl.get_mut().write_all(b"{\"op\":\"explode\"}\n")?;
    let mut reply = String::new();
    ctl.read_line(&mut reply)?;
    assert!(
        reply.contains("\"ok\":false") && reply.contains("bad request"),
        "{reply}"
    );
    let r = request(&mut ctl, &Request::Commit { epoch: 5 })?;
    assert!(!r.ok && r.error.is_some_and(|e| e.contains("epoch 5")));

    assert!(request(&mut ctl, &Request::BeginEpoch { epoch: 1 })?.ok);
    vm_send_udp(&line.vm, PORT, 0..30, 1000)?;

    // 20 frames (1042 B + 10 B offload header each) fill the 21 040-byte buffer: the agent hears about it before it overflows.
    events
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut ev = String::new();
    events.read_line(&mut ev)?;
    assert_eq!(ev.trim(), r#"{"event":"early_checkpoint","epoch":1}"#);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        cap.udp_payloads(PORT).is_empty(),
        "nothing leaves before commit"
    );

    assert!(request(&mut ctl, &Request::BeginEpoch { epoch: 2 })?.ok);
    let r = request(&mut ctl, &Request::Commit { epoch: 1 })?;
    assert_eq!(r.released, Some(20));
    assert!(wait_until(Duration::from_secs(3), || {
        request(&mut ctl, &Request::Counters)
            .ok()
            .and_then(|r| r.counters)
            .is_some_and(|c| c.held_frames_now == 10)
    }));
    assert_eq!(
        request(&mut ctl, &Request::Commit { epoch: 2 })?.released,
        Some(10)
    );
    assert!(wait_until(Duration::from_secs(3), || cap
        .udp_payloads(PORT)
        .len()
        == 30));
    assert_eq!(cap.udp_seqs(PORT), (0..30).collect::<Vec<_>>());

    let c = request(&mut ctl, &Request::Counters)?
        .counters
        .ok_or("counters")?;
    assert_eq!(c.mode, Mode::Buffered);
    assert_eq!(
        (
            c.released_frames,
            c.early_checkpoint_requests,
            c.overflow_stalls
        ),
        (30, 1, 1)
    );
    assert!(
        request(
            &mut ctl,
            &Request::SetMode {
                mode: Mode::Passthrough
            }
        )?
        .ok
    );
    assert_eq!(request(&mut ctl, &Request::Discard)?.discarded, Some(0));
    Ok(())
}
