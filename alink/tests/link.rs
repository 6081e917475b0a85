//! Link behaviour over loopback: ordering, fragmentation, liveness, hostile input, path loss.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use xenft_alink::testing::{loopback_configs, loopback_pair};
use xenft_alink::{frame, Channel, Link, LinkConfig, LinkError, LinkEvent, PathConfig};

const T: Duration = Duration::from_secs(10);

fn msg(i: u64, len: usize) -> Bytes {
    let mut v = i.to_be_bytes().to_vec();
    v.resize(len.max(8), (i % 251) as u8);
    Bytes::from(v)
}

fn seq_of(b: &Bytes) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

#[tokio::test]
async fn messages_arrive_once_and_in_order_on_every_channel() {
    let (a, b) = loopback_pair(2).await.unwrap();
    assert!(a.wait_connected(T).await);
    let mut rxs: Vec<_> = Channel::ALL
        .iter()
        .map(|&c| b.receiver(c).unwrap())
        .collect();
    for i in 0..500u64 {
        for &c in &Channel::ALL {
            a.send(c, msg(i, 100)).await.unwrap();
        }
    }
    for rx in &mut rxs {
        for i in 0..500u64 {
            let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
            assert_eq!(seq_of(&m), i, "channel {:?}", rx.channel());
        }
        assert!(rx.try_recv().is_none());
    }
    assert!(a.flush(T).await, "every message is acknowledged");
}

#[tokio::test]
async fn a_large_message_is_fragmented_and_reassembled_intact() {
    let (a, b) = loopback_pair(1).await.unwrap();
    let mut rx = b.receiver(Channel::Checkpoint).unwrap();
    let big: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    a.send(Channel::Checkpoint, Bytes::from(big.clone()))
        .await
        .unwrap();
    let got = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert_eq!(got.len(), big.len());
    assert!(got[..] == big[..]);
}

#[tokio::test]
async fn two_part_messages_arrive_as_their_concatenation_whatever_the_split() {
    let (a, b) = loopback_pair(1).await.unwrap();
    let mut rx = b.receiver(Channel::Disk).unwrap();
    let whole: Vec<u8> = (0..3 * 1024 * 1024 + 777u32)
        .map(|i| (i % 251) as u8)
        .collect();
    // Heads shorter than, equal to and longer than a fragment; empty heads and bodies.
    let cuts = [
        0,
        1,
        40,
        1024 * 1024 + 4096,
        1024 * 1024 + 4097,
        2_500_000,
        whole.len(),
    ];
    for &cut in &cuts {
        let head = Bytes::copy_from_slice(&whole[..cut]);
        let body = Bytes::copy_from_slice(&whole[cut..]);
        a.send_parts(Channel::Disk, head, body).await.unwrap();
    }
    a.send_parts(Channel::Disk, Bytes::new(), Bytes::new())
        .await
        .unwrap();
    for &cut in &cuts {
        let got = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        assert!(got[..] == whole[..], "split at {cut}");
    }
    let empty = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert!(empty.is_empty());
}

#[tokio::test]
async fn send_now_queues_past_the_window_and_keeps_the_order() {
    let (mut ca, cb, listeners) = loopback_configs(1).await.unwrap();
    ca.window_bytes = 4096;
    let b = Link::start_with_listeners(cb, listeners).unwrap();
    let a = Link::start_with_listeners(ca, Vec::new()).unwrap();
    let mut rx = b.receiver(Channel::Disk).unwrap();
    // Far more than the window, queued without waiting (no receiver is reading yet).
    for i in 0..64u64 {
        a.send_parts_now(
            Channel::Disk,
            Bytes::copy_from_slice(&i.to_be_bytes()),
            Bytes::from(vec![u8::try_from(i).unwrap(); 1000]),
        )
        .unwrap();
    }
    for i in 0..64u64 {
        let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        assert_eq!(seq_of(&m), i);
        assert_eq!(m.len(), 1008);
        assert!(m[8..].iter().all(|&x| u64::from(x) == i));
    }
    a.shutdown();
    assert!(matches!(
        a.send_parts_now(Channel::Disk, Bytes::new(), Bytes::new()),
        Err(LinkError::Closed)
    ));
}

#[tokio::test]
async fn a_message_above_the_maximum_is_refused() {
    let (mut ca, cb, listeners) = loopback_configs(1).await.unwrap();
    ca.max_message = 1024;
    let _b = Link::start_with_listeners(cb, listeners).unwrap();
    let a = Link::start_with_listeners(ca, Vec::new()).unwrap();
    let err = a
        .send(Channel::Control, Bytes::from(vec![0u8; 1025]))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        LinkError::TooLarge {
            len: 1025,
            max: 1024
        }
    ));
}

#[tokio::test]
async fn every_path_reports_heartbeat_rtt() {
    let (a, b) = loopback_pair(2).await.unwrap();
    assert!(a.wait_all_paths(T).await);
    tokio::time::sleep(Duration::from_millis(350)).await;
    for link in [&a, &b] {
        let st = link.status();
        assert!(st.connected);
        assert_eq!(st.paths.len(), 2);
        for p in &st.paths {
            assert!(p.up, "path {} up", p.index);
            let rtt = p.rtt_ms.expect("heartbeats answered");
            assert!((0.0..1000.0).contains(&rtt), "rtt {rtt}");
            assert!(p.last_seen_ms_ago.unwrap() < 500);
        }
    }
}

#[tokio::test]
async fn a_wrong_secret_never_connects_and_is_counted() {
    let (ca, mut cb, listeners) = loopback_configs(1).await.unwrap();
    cb.secret = b"a different pool secret entirely".to_vec();
    let b = Link::start_with_listeners(cb, listeners).unwrap();
    let a = Link::start_with_listeners(ca, Vec::new()).unwrap();
    assert!(!a.wait_connected(Duration::from_millis(800)).await);
    assert!(!b.is_connected());
    assert!(b.status().counters.rejected_bad_mac >= 1);
}

#[tokio::test]
async fn config_errors_name_the_problem() {
    let p = vec![PathConfig {
        local: "127.0.0.1:1".parse().unwrap(),
        peer: "127.0.0.1:2".parse().unwrap(),
    }];
    let short = LinkConfig::new("h1", "h2", b"short".to_vec(), p.clone());
    assert!(short.validate().unwrap_err().to_string().contains("16"));
    let same = LinkConfig::new("h1", "h1", vec![7u8; 32], p);
    assert!(same
        .validate()
        .unwrap_err()
        .to_string()
        .contains("both 'h1'"));
    let none = LinkConfig::new("h1", "h2", vec![7u8; 32], Vec::new());
    assert!(none.validate().is_err());
}

/// Raw bytes at the accepting port: garbage, an impossible length, a truncated frame.
#[tokio::test]
async fn hostile_bytes_are_rejected_and_the_link_keeps_working() {
    let (ca, cb, listeners) = loopback_configs(1).await.unwrap();
    let port = listeners[0].local_addr().unwrap();
    let b = Link::start_with_listeners(cb, listeners).unwrap();
    let a = Link::start_with_listeners(ca, Vec::new()).unwrap();
    assert!(a.wait_connected(T).await);

    // Garbage.
    let mut s = TcpStream::connect(port).await.unwrap();
    s.write_all(&[0xAB; 64]).await.unwrap();
    // An authenticated-looking header declaring 4 GiB: refused from the header alone.
    let mut s2 = TcpStream::connect(port).await.unwrap();
    let mut h = frame::encode_header(frame::Kind::Hello, Channel::Control, 0, 0, 0);
    h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    s2.write_all(&h).await.unwrap();
    // A frame cut short, then EOF.
    let mut s3 = TcpStream::connect(port).await.unwrap();
    let h3 = frame::encode_header(frame::Kind::Hello, Channel::Control, 0, 0, 100);
    s3.write_all(&h3).await.unwrap();
    s3.write_all(&[1u8; 10]).await.unwrap();
    s3.shutdown().await.unwrap();
    // Before authentication even a legal data-sized frame is refused from its header.
    let mut s4 = TcpStream::connect(port).await.unwrap();
    let h4 = frame::encode_header(frame::Kind::Data, Channel::Disk, 0, 0, 512 * 1024);
    s4.write_all(&h4).await.unwrap();
    // Each hostile connection is closed by the link.
    for s in [&mut s, &mut s2, &mut s3, &mut s4] {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(T, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "connection closed");
    }
    let c = b.status().counters;
    assert!(c.rejected_bad_magic >= 1, "{c:?}");
    assert!(c.rejected_too_long >= 2, "{c:?}");
    assert!(c.rejected_truncated >= 1, "{c:?}");

    let mut rx = b.receiver(Channel::Control).unwrap();
    a.send(Channel::Control, Bytes::from_static(b"still here"))
        .await
        .unwrap();
    let m = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert_eq!(&m[..], b"still here");
}

#[tokio::test]
async fn a_restarted_peer_is_reported() {
    let (ca, cb, listeners) = loopback_configs(1).await.unwrap();
    let addr = listeners[0].local_addr().unwrap();
    let b = Link::start_with_listeners(cb.clone(), listeners).unwrap();
    let a = Link::start_with_listeners(ca, Vec::new()).unwrap();
    let mut ev = a.subscribe();
    assert!(a.wait_connected(T).await);
    b.shutdown();
    drop(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let l = TcpListener::bind(addr).await.unwrap();
    let b2 = Link::start_with_listeners(cb, vec![l]).unwrap();
    let restarted = tokio::time::timeout(T, async {
        loop {
            if let Ok(LinkEvent::PeerRestarted { session }) = ev.recv().await {
                return session;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(restarted, b2.session());
    let mut rx = b2.receiver(Channel::Control).unwrap();
    a.send(Channel::Control, Bytes::from_static(b"after restart"))
        .await
        .unwrap();
    assert_eq!(
        &tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap()[..],
        b"after restart"
    );
}

/// Copies bytes one way until EOF; while `cut` is set, swallows them (like a cut cable).
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            continue;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP relay for one path that can be cut without closing anything.
async fn blackhole_relay(target: SocketAddr, cut: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = l.accept().await {
            if cut.load(Ordering::SeqCst) {
                continue; // a cut cable accepts nothing either
            }
            let Ok(outbound) = TcpStream::connect(target).await else {
                continue;
            };
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            tokio::spawn(pump(ir, ow, cut.clone()));
            tokio::spawn(pump(or, iw, cut.clone()));
        }
    });
    addr
}

#[tokio::test]
async fn cutting_the_active_path_mid_stream_loses_and_duplicates_nothing() {
    let (mut ca, mut cb, listeners) = loopback_configs(2).await.unwrap();
    for c in [&mut ca, &mut cb] {
        c.path_timeout = Duration::from_millis(300);
        c.window_bytes = 256 * 1024;
    }
    let cut = Arc::new(AtomicBool::new(false));
    let target = listeners[0].local_addr().unwrap();
    ca.paths[0].peer = blackhole_relay(target, cut.clone()).await;
    let b = Link::start_with_listeners(cb, listeners).unwrap();
    let a = Link::start_with_listeners(ca, Vec::new()).unwrap();
    assert!(a.wait_all_paths(T).await);
    assert_eq!(a.status().active_path, Some(0));
    let mut rx = b.receiver(Channel::Disk).unwrap();
    const N: u64 = 20_000;
    let sender = {
        let a = a.clone();
        let cut = cut.clone();
        tokio::spawn(async move {
            for i in 0..N {
                if i == N / 2 {
                    cut.store(true, Ordering::SeqCst);
                }
                a.send(Channel::Disk, msg(i, 512)).await.unwrap();
            }
        })
    };
    for i in 0..N {
        let m = tokio::time::timeout(T, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("message {i} never arrived"))
            .unwrap();
        assert_eq!(seq_of(&m), i);
    }
    sender.await.unwrap();
    assert!(a.flush(T).await);
    assert!(
        rx.try_recv().is_none(),
        "no duplicate after the last message"
    );
    let st = a.status();
    assert!(!st.paths[0].up, "the cut path is down");
    assert_eq!(st.active_path, Some(1));

    // Heal: the path comes back without anyone asking, and data returns to it.
    cut.store(false, Ordering::SeqCst);
    assert!(a.wait_all_paths(T).await, "path 0 reconnects");
    a.send(Channel::Disk, msg(N, 512)).await.unwrap();
    assert_eq!(seq_of(&rx.recv().await.unwrap()), N);
    assert!(a.flush(T).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let st = a.status();
    assert_eq!(st.active_path, Some(0), "preferred path used again: {st:?}");
}
