//! Level-3 re-protection after a take-over, with real processes: a `secondary --control`
//! resumes its guest when the primary is SIGKILLed; `protect <socket>` then protects that same
//! running guest toward a fresh secondary (the returning host), whose committed epochs grow;
//! bad or failing `protect` requests are refused without touching the guest, and `unprotect`
//! ends protection with the guest still running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use xenft_control::checkpoint::Request;
use xenft_control::{netback, Checkpoint, ErrorReply, Events, Netback, Server, ServerOptions};

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn guest_binary() -> &'static str {
    env!("CARGO_BIN_EXE_xenft-synthetic-guest")
}

fn spawn(dir: &Path, args: &[&str], log: &str) -> KillOnDrop {
    let c = Command::new(env!("CARGO_BIN_EXE_xenft-checkpoint"))
        .args(args)
        .args(["--guest-binary", guest_binary(), "--memory-mib", "16"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).unwrap())
        .spawn()
        .unwrap();
    KillOnDrop(c)
}

fn secondary(dir: &Path, name: &str, extra: &[&str]) -> (KillOnDrop, PathBuf, PathBuf) {
    let listen = dir.join(format!("{name}.sock"));
    let ctl = dir.join(format!("{name}.ctl"));
    let mut args = vec![
        "secondary",
        "--listen",
        listen.to_str().unwrap(),
        "--control",
        ctl.to_str().unwrap(),
        "--protect-epoch-ms",
        "20",
    ];
    args.extend_from_slice(extra);
    let c = spawn(dir, &args, &format!("{name}.log"));
    (c, listen, ctl)
}

/// A stand-in relay (`xenft-netback --control`) on the contract's own server: records each
/// request as its JSON, says done, and reports epoch 50 as its own.
fn fake_relay(path: &Path) -> (Server, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let handler = move |req: netback::Request| -> Result<netback::Reply, ErrorReply> {
        s2.lock()
            .unwrap()
            .push(serde_json::to_string(&req).unwrap());
        Ok(match req {
            netback::Request::Counters => netback::Reply::Counters {
                counters: Box::new(netback::Counters {
                    epoch: 50,
                    committed_epoch: 49,
                    ..netback::Counters::default()
                }),
            },
            _ => netback::Reply::Done,
        })
    };
    let server = Server::start::<Netback, _>(
        path,
        Arc::new(handler),
        Events::new(),
        ServerOptions::default(),
    )
    .unwrap();
    (server, seen)
}

fn passthrough_requests(relay: &Mutex<Vec<String>>) -> usize {
    relay
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(r#""mode":"passthrough""#))
        .count()
}

fn control(path: &Path, req: &Request) -> Option<Value> {
    xenft_tests::components::outcome_json::<Checkpoint>(path, req)
}

/// `protect` toward the secondary listening at `sock`.
fn protect_to(sock: impl AsRef<Path>) -> Request {
    Request::Protect {
        peer: Some(sock.as_ref().display().to_string()),
    }
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

fn alive(pid: u64) -> bool {
    let pid = i32::try_from(pid).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn committed(ctl: &Path) -> u64 {
    control(ctl, &Request::Status)
        .and_then(|v| v["committed_epoch"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_resumed_guest_is_protected_again_toward_a_returning_host_and_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Arrange: A protects its guest toward B; A dies; B's agent fails over.
    let relay_sock = d.join("relay.ctl");
    let (_relay_server, relay) = fake_relay(&relay_sock);
    let (_b, b_sock, b_ctl) =
        secondary(d, "b", &["--netback-control", relay_sock.to_str().unwrap()]);
    assert!(wait_until(Duration::from_secs(10), || b_sock.exists()));
    let mut a = spawn(
        d,
        &[
            "primary",
            "--connect",
            b_sock.to_str().unwrap(),
            "--epoch-ms",
            "20",
        ],
        "a.log",
    );
    assert!(
        wait_until(Duration::from_secs(20), || committed(&b_ctl) > 2),
        "B holds no checkpoint"
    );
    let _ = a.0.kill();
    let _ = a.0.wait();
    // Before the take-over there is nothing to protect.
    let early = control(&b_ctl, &protect_to("/tmp/nowhere.sock")).unwrap();
    assert_eq!(early["ok"], false, "{early}");
    assert_eq!(control(&b_ctl, &Request::Stop).unwrap()["ok"], true);
    let f = control(&b_ctl, &Request::Failover).unwrap();
    assert_eq!(f["ok"], true, "{f}");
    let st = control(&b_ctl, &Request::Status).unwrap();
    assert_eq!(st["state"], "running", "{st}");
    let pid = st["guest_pid"].as_u64().expect("guest pid");

    // Refused requests leave the guest running.
    for bad in [
        Request::Protect { peer: None },
        protect_to("relative.sock"),
        protect_to(format!("/{}", "x".repeat(200))),
        protect_to("/tmp/xenft-no-such-secondary.sock"),
    ] {
        let bad = &bad;
        let r = control(&b_ctl, bad).unwrap();
        assert_eq!(r["ok"], false, "{bad:?}: {r}");
        let st = control(&b_ctl, &Request::Status).unwrap();
        assert_eq!(st["state"], "running", "{bad:?}: {st}");
        assert_eq!(st["guest_pid"].as_u64(), Some(pid));
        assert!(alive(pid), "{bad:?} killed the guest");
    }
    // Without a socket, `protect` means the engine's own A-link, which this one has not.
    let r = control(&b_ctl, &Request::Protect { peer: None }).unwrap();
    assert!(r["error"].as_str().unwrap().contains("no A-link"), "{r}");

    // Act: C (the returning host) listens; B protects its running guest toward it.
    let (mut c, c_sock, c_ctl) = secondary(d, "c", &[]);
    assert!(wait_until(Duration::from_secs(10), || c_sock.exists()));
    let p = control(&b_ctl, &protect_to(&c_sock)).unwrap();
    assert_eq!(p["ok"], true, "{p}");
    let again = control(&b_ctl, &protect_to(&c_sock)).unwrap();
    assert_eq!(again["ok"], true, "protect is idempotent: {again}");

    // Assert: C commits growing epochs; B reports the primary's progress; same guest.
    assert!(
        wait_until(Duration::from_secs(20), || committed(&c_ctl) > 3),
        "C receives no checkpoint: {:?}",
        control(&c_ctl, &Request::Status)
    );
    let first = committed(&c_ctl);
    assert!(
        wait_until(Duration::from_secs(10), || committed(&c_ctl) > first + 2),
        "C's committed epoch does not grow"
    );
    let st = control(&b_ctl, &Request::Status).unwrap();
    assert_eq!(st["state"], "protecting", "{st}");
    assert_eq!(st["primary"]["phase"], "protected", "{st}");
    assert!(
        st["primary"]["committed_epoch"].as_u64().unwrap() > 3,
        "{st}"
    );
    assert_eq!(st["guest_pid"].as_u64(), Some(pid), "{st}");
    assert!(alive(pid));
    // The guest keeps running while protected: its workload counter grows.
    let counter = |v: &Value| v["primary"]["guest_counter"].as_u64().unwrap_or(0);
    let c0 = counter(&st);
    assert!(
        wait_until(Duration::from_secs(10), || control(
            &b_ctl,
            &Request::Status
        )
        .is_some_and(|v| counter(&v) > c0)),
        "the protected guest makes no progress: {st}"
    );

    // The relay buffers the guest's output again, numbered after its own epochs (50).
    {
        let seen = relay.lock().unwrap();
        assert!(
            seen.iter()
                .any(|l| l.contains(r#""op":"set_mode","mode":"buffered""#)),
            "{seen:?}"
        );
        let first_begin = seen.iter().find(|l| l.contains("begin_epoch")).unwrap();
        let n: u64 = first_begin
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('}')
            .parse()
            .unwrap();
        assert!(n > 50, "relay epochs must keep increasing: {first_begin}");
        assert!(
            seen.iter().any(|l| l.contains(r#""op":"commit""#)),
            "{seen:?}"
        );
    }

    // `unprotect` ends protection; the guest keeps running.
    let u = control(&b_ctl, &Request::Unprotect).unwrap();
    assert_eq!(u["ok"], true, "{u}");
    let st = control(&b_ctl, &Request::Status).unwrap();
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["guest_pid"].as_u64(), Some(pid));
    assert!(alive(pid));

    // Protected again, then the secondary dies: B reports it and keeps the guest.
    let _ = c.0.kill();
    let _ = c.0.wait();
    let (c2, c2_sock, c2_ctl) = secondary(d, "c2", &[]);
    assert!(wait_until(Duration::from_secs(10), || c2_sock.exists()));
    let p = control(&b_ctl, &protect_to(&c2_sock)).unwrap();
    assert_eq!(p["ok"], true, "{p}");
    assert!(wait_until(Duration::from_secs(20), || committed(&c2_ctl) > 1));
    let held = passthrough_requests(&relay);
    drop(c2);
    // Noticed without any request: the relay is put back in pass-through (releasing what it
    // held), so the unprotected guest's output is not held until someone asks.
    assert!(
        wait_until(Duration::from_secs(10), || passthrough_requests(&relay)
            > held),
        "the relay still holds output after the secondary died: {:?}",
        relay.lock().unwrap()
    );
    assert!(
        wait_until(Duration::from_secs(10), || control(
            &b_ctl,
            &Request::Status
        )
        .is_some_and(|v| v["state"] == "running" && !v["last_error"].is_null())),
        "the lost secondary is not reported: {:?}",
        control(&b_ctl, &Request::Status)
    );
    assert!(alive(pid), "losing the secondary killed the guest");
}
