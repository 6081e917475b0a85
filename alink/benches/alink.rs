//! `scripts/bench alink`: throughput of 1 MiB messages over two loopback paths, against a raw
//! TCP stream on the same machine in the same run (baseline), and the latency of small
//! messages on the Heartbeat channel while a bulk Checkpoint stream saturates the link.
//! Prints a JSON object as its last line.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use xenft_alink::testing::loopback_pair;
use xenft_alink::Channel;

const MIB: usize = 1024 * 1024;
const BULK_MESSAGES: usize = 2048; // 2 GiB

async fn raw_tcp_mib_s(total: usize) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; MIB];
        let mut got = 0;
        while got < total {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got += n;
        }
    });
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let block = vec![7u8; MIB];
    let t = Instant::now();
    for _ in 0..total / MIB {
        s.write_all(&block).await.unwrap();
    }
    reader.await.unwrap();
    (total / MIB) as f64 / t.elapsed().as_secs_f64()
}

async fn link_mib_s(n: usize) -> f64 {
    let (a, b) = loopback_pair(2).await.unwrap();
    assert!(a.wait_all_paths(Duration::from_secs(5)).await);
    let mut rx = b.receiver(Channel::Checkpoint).unwrap();
    let block = Bytes::from(vec![7u8; MIB]);
    let t = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            a.send(Channel::Checkpoint, block.clone()).await.unwrap();
        }
        a
    });
    for _ in 0..n {
        let m = rx.recv().await.unwrap();
        assert_eq!(m.len(), MIB);
    }
    let secs = t.elapsed().as_secs_f64();
    drop(sender.await.unwrap());
    n as f64 / secs
}

/// The value at `per_mille`/1000 of a sorted sample.
fn percentile(sorted: &[f64], per_mille: usize) -> f64 {
    sorted[(sorted.len() - 1) * per_mille / 1000]
}

/// Ping-pong on the Heartbeat channel, optionally while 1 MiB checkpoint messages flow.
async fn heartbeat_rtts(samples: usize, under_load: bool) -> (Vec<f64>, f64) {
    let (a, b) = loopback_pair(2).await.unwrap();
    assert!(a.wait_all_paths(Duration::from_secs(5)).await);
    let mut a_hb = a.receiver(Channel::Heartbeat).unwrap();
    let mut b_hb = b.receiver(Channel::Heartbeat).unwrap();
    let echo = {
        let b = b.clone();
        tokio::spawn(async move {
            while let Some(m) = b_hb.recv().await {
                if b.send(Channel::Heartbeat, m).await.is_err() {
                    return;
                }
            }
        })
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut bulk_rx = b.receiver(Channel::Checkpoint).unwrap();
    let drain = tokio::spawn(async move {
        let mut bytes = 0usize;
        while let Some(m) = bulk_rx.recv().await {
            bytes += m.len();
        }
        bytes
    });
    let bulk = {
        let a = a.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let block = Bytes::from(vec![9u8; MIB]);
            while under_load && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if a.send(Channel::Checkpoint, block.clone()).await.is_err() {
                    return;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut rtts = Vec::with_capacity(samples);
    let t0 = Instant::now();
    for i in 0..samples {
        let t = Instant::now();
        a.send(
            Channel::Heartbeat,
            Bytes::copy_from_slice(&(i as u64).to_be_bytes()),
        )
        .await
        .unwrap();
        let m = a_hb.recv().await.unwrap();
        assert_eq!(&m[..], &(i as u64).to_be_bytes());
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    bulk.await.unwrap();
    a.shutdown();
    b.shutdown();
    echo.abort();
    let bulk_bytes = drain.await.unwrap_or(0);
    rtts.sort_by(f64::total_cmp);
    (rtts, bulk_bytes as f64 / MIB as f64 / elapsed)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let raw = raw_tcp_mib_s(BULK_MESSAGES * MIB).await;
        let ours = link_mib_s(BULK_MESSAGES).await;
        println!("1 MiB messages: alink {ours:.0} MiB/s, raw TCP {raw:.0} MiB/s");
        let (idle, _) = heartbeat_rtts(300, false).await;
        let (loaded, bulk_rate) = heartbeat_rtts(300, true).await;
        let idle_p99 = percentile(&idle, 990);
        let p50 = percentile(&loaded, 500);
        let p99 = percentile(&loaded, 990);
        let max = loaded[loaded.len() - 1];
        println!(
            "heartbeat channel round trip: idle p99 {idle_p99:.3} ms; under a {bulk_rate:.0} MiB/s \
             checkpoint stream p50 {p50:.3} ms p99 {p99:.3} ms max {max:.3} ms"
        );
        println!(
            "{{\"bench\":\"alink\",\"throughput_mib_s\":{ours:.1},\"raw_tcp_mib_s\":{raw:.1},\
             \"throughput_vs_raw_tcp\":{:.3},\"heartbeat_p99_ms_idle\":{idle_p99:.3},\
             \"heartbeat_p50_ms_under_load\":{p50:.3},\"heartbeat_p99_ms_under_load\":{p99:.3},\
             \"heartbeat_max_ms_under_load\":{max:.3},\"bulk_mib_s_during_heartbeats\":{bulk_rate:.1}}}",
            ours / raw
        );
    });
}
