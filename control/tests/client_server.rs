//! The contract's client and server over a real Unix socket: typed replies, typed errors for
//! anything a hostile or broken peer sends, events, and the bounds.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenft_control::netback::{Event, Reply, Request};
use xenft_control::{
    Client, ControlError, ErrorKind, ErrorReply, Events, Netback, Server, ServerOptions,
};

#[allow(clippy::needless_pass_by_value)] // the Handler signature takes the request
fn handler(req: Request) -> Result<Reply, ErrorReply> {
    match req {
        Request::Commit { epoch } if epoch > 100 => Err(ErrorReply::refused(format!(
            "epoch {epoch} was never begun"
        ))),
        Request::Commit { epoch } => Ok(Reply::Released {
            released: epoch * 2,
        }),
        Request::Announce => Ok(Reply::Announced { announced: 3 }),
        _ => Ok(Reply::Done),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    events: Arc<Events<Event>>,
    server: Option<Server>,
}

fn start(opts: ServerOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let events = Events::new();
    let server =
        Server::start::<Netback, _>(&path, Arc::new(handler), Arc::clone(&events), opts).unwrap();
    Fixture {
        _dir: dir,
        path,
        events,
        server: Some(server),
    }
}

fn client(p: &Path) -> Client<Netback> {
    Client::new(p, Duration::from_secs(5))
}

/// One raw line to the server, the raw reply line back.
fn raw(p: &Path, line: &[u8]) -> String {
    let mut s = UnixStream::connect(p).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(line).unwrap();
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).unwrap();
    out
}

#[test]
fn a_request_gets_its_typed_reply_and_a_refusal_its_kind() {
    let f = start(ServerOptions::default());
    let c = client(&f.path);
    assert_eq!(
        c.call(&Request::Commit { epoch: 7 }).unwrap(),
        Reply::Released { released: 14 }
    );
    let e = c.call(&Request::Commit { epoch: 101 }).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Refused), "{e}");
    assert!(e.to_string().contains("epoch 101 was never begun"), "{e}");
}

#[test]
fn undecodable_requests_get_typed_error_replies_and_the_connection_goes_on() {
    let f = start(ServerOptions::default());
    let r = raw(&f.path, b"{\"v\":1,\"req\":{\"op\":\"explode\"}}\n");
    assert!(r.contains("\"kind\":\"unknown_request\""), "{r}");
    let r = raw(&f.path, b"commit 7\n");
    assert!(r.contains("\"kind\":\"malformed\""), "{r}");
    let r = raw(&f.path, b"{\"v\":7,\"req\":{\"op\":\"announce\"}}\n");
    assert!(r.contains("\"kind\":\"unsupported_version\""), "{r}");
    let r = raw(&f.path, b"\xff\xfe\n");
    assert!(r.contains("\"kind\":\"malformed\""), "{r}");

    // On one connection: a bad line, then a good one, both answered in order.
    let mut s = UnixStream::connect(&f.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"{\"v\":1,\"req\":{\"op\":\"commit\"}}\n{\"v\":1,\"req\":{\"op\":\"announce\"}}\n",
    )
    .unwrap();
    let mut rd = BufReader::new(s);
    let (mut a, mut b) = (String::new(), String::new());
    rd.read_line(&mut a).unwrap();
    rd.read_line(&mut b).unwrap();
    assert!(
        a.contains("\"kind\":\"malformed\"") && a.contains("epoch"),
        "{a}"
    );
    assert!(b.contains("\"announced\":3"), "{b}");
}

#[test]
fn an_oversized_line_is_refused_as_too_long() {
    let f = start(ServerOptions::default());
    let mut line = vec![b'x'; xenft_control::frame::MAX_LINE + 10];
    line.push(b'\n');
    let mut s = UnixStream::connect(&f.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server answers after MAX_LINE bytes and closes: the rest may not be written.
    let _ = s.write_all(&line);
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).unwrap();
    assert!(out.contains("\"kind\":\"too_long\""), "{out}");
}

#[test]
fn subscribers_get_events_and_a_gone_subscriber_frees_its_slot() {
    let f = start(ServerOptions {
        max_connections: 2,
        ..ServerOptions::default()
    });
    let c = client(&f.path);
    let mut sub = c.subscribe().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.events.subscriber_count() < 1 {
        assert!(Instant::now() < deadline, "subscription never registered");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(sub.next_within(Duration::from_millis(50)).unwrap(), None);
    f.events.publish(&Event::UplinkLost {
        uplink: "eth0".into(),
    });
    f.events.publish(&Event::EarlyCheckpoint { epoch: 9 });
    assert_eq!(
        sub.next_within(Duration::from_secs(5)).unwrap(),
        Some(Event::UplinkLost {
            uplink: "eth0".into()
        })
    );
    assert_eq!(
        sub.next_within(Duration::from_secs(5)).unwrap(),
        Some(Event::EarlyCheckpoint { epoch: 9 })
    );
    // Requests still work beside the subscription (one slot of two in use).
    assert_eq!(
        c.call(&Request::Announce).unwrap(),
        Reply::Announced { announced: 3 }
    );
    // Closed subscribers are noticed while no event comes, and their slots freed.
    drop(sub);
    let mut again = Vec::new();
    for _ in 0..3 {
        // A closed subscriber is noticed within the stream's 200 ms wait.
        std::thread::sleep(Duration::from_millis(400));
        again.push(c.subscribe().unwrap());
        drop(again.pop());
    }
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        c.call(&Request::Announce).unwrap(),
        Reply::Announced { announced: 3 }
    );
}

#[test]
fn a_stopped_server_ends_its_event_streams() {
    let mut f = start(ServerOptions::default());
    let mut sub = client(&f.path).subscribe().unwrap();
    drop(f.server.take());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match sub.next_within(Duration::from_millis(100)) {
            Err(ControlError::NoReply(_)) => break,
            Ok(None) => assert!(Instant::now() < deadline, "stream never ended"),
            other => panic!("{other:?}"),
        }
    }
    assert!(!f.path.exists(), "the socket file is removed");
    assert!(client(&f.path)
        .call(&Request::Announce)
        .unwrap_err()
        .is_absent());
}

/// A fake component that answers every line with `reply`.
fn bad_server(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.sock");
    let l = UnixListener::bind(&p).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut line = String::new();
            let _ = BufReader::new(&s).read_line(&mut line);
            let _ = s.write_all(reply);
        }
    });
    (d, p)
}

#[test]
fn a_broken_component_is_a_typed_client_error() {
    let (_d, p) = bad_server(b"not json\n");
    let e = client(&p).call(&Request::Announce).unwrap_err();
    assert!(matches!(e, ControlError::Malformed { .. }), "{e}");
    let (_d, p) = bad_server(b"");
    let e = client(&p).call(&Request::Announce).unwrap_err();
    assert!(matches!(e, ControlError::NoReply(_)), "{e}");
    let (_d, p) = bad_server(b"{\"v\":1,\"ok\":{\"reply\":\"teleported\"}}\n");
    let e = client(&p).call(&Request::Announce).unwrap_err();
    assert!(matches!(e, ControlError::Malformed { .. }), "{e}");
    let (_d, p) = bad_server(b"{\"v\":2,\"ok\":{\"reply\":\"done\"}}\n");
    let e = client(&p).call(&Request::Announce).unwrap_err();
    assert!(e.to_string().contains("framing version 2"), "{e}");
    let (_d, p) = bad_server(b"{\"v\":1,\"subscribed\":true}\n");
    let e = client(&p).call(&Request::Announce).unwrap_err();
    assert!(matches!(e, ControlError::Malformed { .. }), "{e}");
}

#[test]
fn a_component_that_never_answers_times_out() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("mute.sock");
    let _l = UnixListener::bind(&p).unwrap();
    let t = Instant::now();
    let e = Client::<Netback>::new(&p, Duration::from_millis(200))
        .call(&Request::Announce)
        .unwrap_err();
    assert!(matches!(e, ControlError::Io { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn an_endless_reply_line_is_cut_at_the_bound() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("flood.sock");
    let l = UnixListener::bind(&p).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let chunk = vec![b'a'; 64 * 1024];
            while s.write_all(&chunk).is_ok() {}
        }
    });
    let e = Client::<Netback>::new(&p, Duration::from_secs(10))
        .call(&Request::Announce)
        .unwrap_err();
    assert!(matches!(e, ControlError::TooLong(_)), "{e}");
}
