//! `scripts/demo` (until the local pool lands): two hosts in network namespaces joined by two
//! veth A-links. host1 streams disk-channel messages to host2 while both print per-path
//! heartbeats; the demo cuts the active A-link, shows the stream continuing on the other path
//! with nothing lost, heals the cable and shows the path back in use.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use xenft_alink::{Channel, Link, LinkConfig, LinkStatus, PathConfig};
use xenft_tests::netns::{is_root, run, veth, Netns};

const SECRET: &[u8] = b"xenft demo pool secret (not for production)";

fn addr(ip: &str) -> SocketAddr {
    format!("{ip}:7010").parse().expect("static address")
}

fn paths(me: [&str; 2], peer: [&str; 2]) -> Vec<PathConfig> {
    (0..2)
        .map(|i| PathConfig {
            local: addr(me[i]),
            peer: addr(peer[i]),
        })
        .collect()
}

fn show(host: &str, st: &LinkStatus) -> String {
    let p: Vec<String> = st
        .paths
        .iter()
        .map(|p| {
            format!(
                "A-link {} {:>4} rtt {:>7}",
                p.index + 1,
                if p.up { "up" } else { "DOWN" },
                p.rtt_ms
                    .filter(|_| p.up)
                    .map_or("-".to_string(), |r| format!("{r:.2}ms"))
            )
        })
        .collect();
    format!("{host}: {}", p.join(" | "))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() {
    if !is_root() {
        eprintln!("alink-demo: needs root to create network namespaces and veth pairs (try sudo scripts/demo)");
        std::process::exit(2);
    }
    if let Err(e) = demo() {
        eprintln!("alink-demo: {e}");
        std::process::exit(1);
    }
}

#[allow(clippy::too_many_lines)]
fn demo() -> Result<(), Box<dyn std::error::Error>> {
    const N: u64 = 50_000;
    println!("== xenft A-link demo: two hosts, two private links, one cable cut ==");
    let h1 = Netns::new()?;
    let h2 = Netns::new()?;
    veth(&h1, "alink1", "10.77.1.1/24", &h2, "alink1", "10.77.1.2/24")?;
    veth(&h1, "alink2", "10.77.2.1/24", &h2, "alink2", "10.77.2.2/24")?;
    println!(
        "host1 = netns {}, host2 = netns {}; A-link 1 = 10.77.1.0/24, A-link 2 = 10.77.2.0/24",
        h1.name(),
        h2.name()
    );
    let c1 = LinkConfig::new(
        "host1",
        "host2",
        SECRET,
        paths(["10.77.1.1", "10.77.2.1"], ["10.77.1.2", "10.77.2.2"]),
    );
    let c2 = LinkConfig::new(
        "host2",
        "host1",
        SECRET,
        paths(["10.77.1.2", "10.77.2.2"], ["10.77.1.1", "10.77.2.1"]),
    );
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let receiver = h2.spawn(move || {
        runtime().block_on(async move {
            let link = Link::start(c2).await.map_err(|e| e.to_string())?;
            let mut rx = link.receiver(Channel::Disk).ok_or("receiver taken")?;
            let mut next = 0u64;
            while next < N {
                let m = tokio::time::timeout(Duration::from_secs(20), rx.recv())
                    .await
                    .map_err(|_| format!("message {next} did not arrive within 20 s"))?
                    .ok_or("link closed")?;
                let got = u64::from_be_bytes(m[..8].try_into().map_err(|_| "short message")?);
                if got != next {
                    return Err(format!("out of order: expected {next}, got {got}"));
                }
                next += 1;
            }
            let st = link.status();
            let _ = tokio::task::spawn_blocking(move || done_rx.recv()).await;
            Ok::<_, String>((next, st))
        })
    })?;
    let h2_name = h2.name().to_string();
    let sender = h1.spawn(move || {
        runtime().block_on(async move {
            let link = Link::start(c1).await.map_err(|e| e.to_string())?;
            if !link.wait_all_paths(Duration::from_secs(10)).await {
                return Err("A-links did not come up within 10 s".to_string());
            }
            let start = Instant::now();
            let mut events = link.subscribe();
            tokio::spawn(async move {
                while let Ok(e) = events.recv().await {
                    println!("   {:>6.2}s  event: {e:?}", start.elapsed().as_secs_f64());
                }
            });
            let mut cut_dev = None;
            let mut last_print = Instant::now() - Duration::from_secs(1);
            for i in 0..N {
                if i == N / 2 {
                    let active = link.status().active_path.unwrap_or(0);
                    let dev = format!("alink{}", active + 1);
                    println!(
                        "-- {:>6.2}s  message {i}: cutting the active cable ({dev}) --",
                        start.elapsed().as_secs_f64()
                    );
                    run("ip", &["-n", &h2_name, "link", "set", &dev, "down"])
                        .map_err(|e| e.to_string())?;
                    cut_dev = Some(dev);
                }
                let mut v = i.to_be_bytes().to_vec();
                v.resize(4096, 0xd1);
                link.send(Channel::Disk, Bytes::from(v))
                    .await
                    .map_err(|e| e.to_string())?;
                if last_print.elapsed() >= Duration::from_millis(250) {
                    last_print = Instant::now();
                    println!(
                        "   {:>6.2}s  sent {i:>6}  {}",
                        start.elapsed().as_secs_f64(),
                        show("host1", &link.status())
                    );
                }
            }
            if !link.flush(Duration::from_secs(30)).await {
                return Err("messages not acknowledged within 30 s".to_string());
            }
            println!(
                "   {:>6.2}s  all {N} messages acknowledged  {}",
                start.elapsed().as_secs_f64(),
                show("host1", &link.status())
            );
            if let Some(dev) = cut_dev {
                println!("-- healing {dev} --");
                run("ip", &["-n", &h2_name, "link", "set", &dev, "up"])
                    .map_err(|e| e.to_string())?;
                let t = Instant::now();
                let back = link.wait_all_paths(Duration::from_secs(10)).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                println!(
                    "   path back in {:.2}s: {}  {}",
                    t.elapsed().as_secs_f64(),
                    back,
                    show("host1", &link.status())
                );
            }
            let st = link.status();
            let _ = done_tx.send(());
            Ok::<_, String>(st)
        })
    })?;
    let sent = sender.join().map_err(|_| "sender thread panicked")??;
    let (received, rst) = receiver.join().map_err(|_| "receiver thread panicked")??;
    println!("== result ==");
    println!("messages sent {N}, received in order {received}, duplicates delivered 0");
    println!(
        "fragments resent after the cut {}, duplicates dropped by host2 {}, frames rejected {}",
        sent.counters.resent_frames,
        rst.counters.duplicates_dropped,
        rst.counters.rejected()
    );
    let pass = received == N && sent.paths.iter().all(|p| p.up);
    println!("{}", if pass { "PASS" } else { "FAIL" });
    if pass {
        Ok(())
    } else {
        Err("demo failed".into())
    }
}
