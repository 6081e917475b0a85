//! The binary driven through its control socket, as the agent drives it: epochs, commit,
//! early-checkpoint events, errors for bad requests. Privileged (root): builds and removes its
//! own namespaces.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{wait_until, Capture, Line, CLIENT_IP, R, VM_IP, VM_MAC};
use xenft_netback::control::{request, Request};
use xenft_netback::Mode;
use xenft_tests::netns::require_root;

const PORT: u16 = 9100;

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
        line.host
            .command(env!("CARGO_BIN_EXE_xenft-netback"))
            .args([
                "--vif",
                "vif0",
                "--uplink",
                "up0",
                "--mac",
                &VM_MAC.to_string(),
            ])
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
    line.vm
        .spawn(|| -> std::io::Result<()> {
            let s = UdpSocket::bind((VM_IP, 0))?;
            for seq in 0u32..30 {
                let mut p = seq.to_be_bytes().to_vec();
                p.resize(1000, 0);
                s.send_to(&p, (CLIENT_IP, PORT))?;
            }
            Ok(())
        })?
        .join()
        .map_err(|_| "sender panicked")??;

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
    let seqs: Vec<u32> = cap
        .udp_payloads(PORT)
        .iter()
        .map(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
        .collect();
    assert_eq!(seqs, (0..30).collect::<Vec<_>>());

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
