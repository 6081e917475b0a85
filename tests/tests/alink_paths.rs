//! Two hosts in two network namespaces joined by two veth pairs. Privileged: needs root to
//! create namespaces (skips with a message otherwise). Cleans up through `Netns`'s Drop.

use std::time::Duration;

use bytes::Bytes;
use xenft_alink::{Channel, Link};
use xenft_tests::alink_hosts::two_hosts;
use xenft_tests::netns::require_root;

const N: u64 = 100_000;
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn cutting_one_veth_mid_stream_delivers_every_message_once_in_order() {
    if !require_root("cutting_one_veth_mid_stream_delivers_every_message_once_in_order") {
        return;
    }
    let hosts = two_hosts(91, "al", 7010).unwrap();
    let (h1, h2, c1, c2) = (hosts.h1, hosts.h2, hosts.c1, hosts.c2);
    let cables = hosts.devs;

    // host2 receives and checks, then keeps its link up until host1 is done.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let receiver = h2
        .spawn(move || {
            runtime().block_on(async move {
                let link = Link::start(c2).await.unwrap();
                let mut rx = link.receiver(Channel::Disk).unwrap();
                for i in 0..N {
                    let m = tokio::time::timeout(Duration::from_secs(20), rx.recv())
                        .await
                        .map_err(|_| format!("message {i} did not arrive within 20 s"))?
                        .ok_or("link closed")?;
                    let got = u64::from_be_bytes(m[..8].try_into().unwrap());
                    if got != i {
                        return Err(format!("expected message {i}, got {got}"));
                    }
                }
                // Nothing extra may follow: no duplicate of the last message.
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Some(m) = rx.try_recv() {
                    return Err(format!("unexpected extra message of {} bytes", m.len()));
                }
                let status = link.status();
                let _ = tokio::task::spawn_blocking(move || done_rx.recv()).await;
                Ok::<_, String>(status)
            })
        })
        .unwrap();

    let h2_name = h2.name().to_string();
    let sender = h1
        .spawn(move || {
            runtime().block_on(async move {
                let link = Link::start(c1).await.unwrap();
                assert!(
                    link.wait_all_paths(Duration::from_secs(10)).await,
                    "both paths up"
                );
                let active = link.status().active_path.unwrap();
                let cut_dev = cables[active].as_str();
                for i in 0..N {
                    if i == N / 2 {
                        // Cut the cable that carries the stream, from the peer's side.
                        xenft_tests::netns::run(
                            "ip",
                            &["-n", &h2_name, "link", "set", cut_dev, "down"],
                        )
                        .unwrap();
                    }
                    let mut v = i.to_be_bytes().to_vec();
                    v.resize(64, 0x5a);
                    link.send(Channel::Disk, Bytes::from(v)).await.unwrap();
                }
                let t = std::time::Instant::now();
                let flushed = link.flush(Duration::from_secs(20)).await;
                eprintln!("flush took {:?}", t.elapsed());
                let st = link.status();
                // Heal and check that the path is used again without any action.
                xenft_tests::netns::run("ip", &["-n", &h2_name, "link", "set", cut_dev, "up"])
                    .unwrap();
                let t = std::time::Instant::now();
                let back = link.wait_all_paths(Duration::from_secs(10)).await;
                eprintln!("heal took {:?}", t.elapsed());
                let _ = done_tx.send(());
                (flushed, st, back, active)
            })
        })
        .unwrap();

    let (flushed, st, back, active) = sender.join().unwrap();
    let rx_status = receiver.join().unwrap().unwrap();
    assert!(flushed, "every message acknowledged");
    assert!(!st.paths[active].up, "the cut path was declared down");
    assert_ne!(st.active_path, Some(active), "data moved to the other path");
    assert!(back, "the healed path came back by itself");
    assert_eq!(rx_status.counters.messages_received, N);
    eprintln!(
        "sender resent {} fragments after the cut; receiver dropped {} duplicates",
        st.counters.resent_frames, rx_status.counters.duplicates_dropped
    );
}
