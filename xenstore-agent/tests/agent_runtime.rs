//! Two real agents (UDP heartbeats on loopback, one quorum server over TCP, storage heartbeat
//! files) with recording components: protection, take-over after a host stops, status API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xenft_agent::ids::{PathId, VmId};
use xenft_agent::lifecycle::Phase;
use xenft_agent::runtime::Agent;
use xenft_agent::seams::{Recorder, Seams};
use xenft_agent::status::{StatusHub, StatusServer};

mod runtime_pool;
use runtime_pool::{host, phase, start_quorum, wait_for, Pool};

async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_takes_over_when_the_primary_agent_stops() {
    let q = start_quorum().await;
    let pool = Pool::new(q.addr());
    let (r1, r2) = (Recorder::new(), Recorder::new());
    let a1 = Agent::start(pool.config(0).validate().unwrap(), Seams::recording(&r1))
        .await
        .unwrap();
    let a2 = Agent::start(pool.config(1).validate().unwrap(), Seams::recording(&r2))
        .await
        .unwrap();
    let (h1, h2) = (a1.hub(), a2.hub());
    wait_for("protection", Duration::from_secs(10), || {
        phase(&h1) == Some(Phase::Protected) && phase(&h2) == Some(Phase::Protected)
    })
    .await;
    assert!(
        r1.calls().contains(&"sync vm1 h2 full".to_string()),
        "{:?}",
        r1.calls()
    );
    let snap = h1.snapshot();
    assert!(snap.peers[0].paths.iter().all(|(_, up, _)| *up), "{snap:?}");

    // Status API on the primary.
    let status = StatusServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Some("tok-123".into()),
        h1.clone(),
    )
    .await
    .unwrap();
    assert!(http_get(status.addr(), "/status", None)
        .await
        .starts_with("HTTP/1.1 401"));
    let body = http_get(status.addr(), "/status", Some("tok-123")).await;
    assert!(body.contains("\"phase\": \"protected\""), "{body}");
    let metrics = http_get(status.addr(), "/metrics", Some("tok-123")).await;
    assert!(
        metrics.contains("xenft_agent_path_up{peer=\"h2\",path=\"alink0\"} 1"),
        "{metrics}"
    );
    status.shutdown().await;

    // The primary host "dies": its agent stops (no heartbeats, no lease renewals, no storage
    // heartbeat).
    let stopped = Instant::now();
    a1.shutdown().await;
    wait_for("take-over", Duration::from_secs(5), || {
        r2.calls().contains(&"resume-epoch vm1".to_string())
    })
    .await;
    let took = stopped.elapsed();
    assert!(r2.calls().contains(&"announce vm1".to_string()));
    wait_for("failed-over state", Duration::from_secs(2), || {
        phase(&h2) == Some(Phase::FailedOver)
    })
    .await;
    assert_eq!(q.holder(&VmId::new("vm1").unwrap()), Some(host("h2")));
    let (log, _) = h2.decisions();
    assert!(
        log.iter().any(|d| d.reason.contains("quorum granted")),
        "{log:?}"
    );
    println!(
        "take-over {} ms after the primary agent stopped",
        took.as_millis()
    );

    // The old primary comes back: it learns it is now the secondary and resyncs.
    let r1b = Recorder::new();
    let a1 = Agent::start(pool.config(0).validate().unwrap(), Seams::recording(&r1b))
        .await
        .unwrap();
    let h1 = a1.hub();
    wait_for("re-protection", Duration::from_secs(10), || {
        phase(&h1) == Some(Phase::Protected) && phase(&h2) == Some(Phase::Protected)
    })
    .await;
    let snap = h1.snapshot();
    assert_eq!(snap.vms[0].record.primary, host("h2"));
    assert!(
        r2.calls().contains(&"sync vm1 h1 dirty".to_string()),
        "{:?}",
        r2.calls()
    );
    a1.shutdown().await;
    a2.shutdown().await;
    q.shutdown().await;
    drop(Arc::clone(&h2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_over_the_alink_crate_protect_and_fail_over() {
    let q = start_quorum().await;
    let pool = Pool::new(q.addr());
    let (la, lb) = xenft_alink::testing::loopback_pair(2).await.unwrap();
    let (r1, r2) = (Recorder::new(), Recorder::new());
    let links1 = std::collections::BTreeMap::from([(host("h2"), la.clone())]);
    let links2 = std::collections::BTreeMap::from([(host("h1"), lb.clone())]);
    let a1 = Agent::start_with_links(
        pool.config(0).validate().unwrap(),
        Seams::recording(&r1),
        links1,
    )
    .await
    .unwrap();
    let a2 = Agent::start_with_links(
        pool.config(1).validate().unwrap(),
        Seams::recording(&r2),
        links2,
    )
    .await
    .unwrap();
    let (h1, h2) = (a1.hub(), a2.hub());
    wait_for("protection", Duration::from_secs(10), || {
        phase(&h1) == Some(Phase::Protected) && phase(&h2) == Some(Phase::Protected)
    })
    .await;
    // Both A-link paths are reported alive by the link's own per-path status.
    wait_for("alink paths up", Duration::from_secs(3), || {
        let s = h2.snapshot();
        s.peers[0]
            .paths
            .iter()
            .filter(|(p, up, _)| matches!(p, PathId::Alink(_)) && *up)
            .count()
            == 2
    })
    .await;
    // The primary host dies: its agent and its link stop.
    a1.shutdown().await;
    la.shutdown();
    wait_for("take-over", Duration::from_secs(5), || {
        r2.calls().contains(&"resume-epoch vm1".to_string())
    })
    .await;
    a2.shutdown().await;
    lb.shutdown();
    q.shutdown().await;
}

#[tokio::test]
async fn status_api_streams_decisions_and_refuses_hostile_requests() {
    use xenft_agent::decision::{Action, Decision, FaultClass};
    let hub = StatusHub::new(4);
    let server = StatusServer::start("127.0.0.1:0".parse().unwrap(), None, hub.clone())
        .await
        .unwrap();
    // Server-sent events: a decision pushed after subscribing arrives on the stream.
    let mut s = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    s.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("text/event-stream"));
    hub.push(Decision {
        at_ms: 1,
        host: host("h1"),
        peer: Some(host("h2")),
        path: None,
        vm: None,
        class: FaultClass::PeerSilent,
        action: Action::FailOver,
        reason: "test".into(),
    });
    let mut got = String::new();
    while !got.contains("fail_over") {
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stream closed");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.contains("event: decision"), "{got}");
    // Bounded log: 6 pushes, 4 kept, 6 counted.
    for _ in 0..5 {
        hub.push(hub.decisions().0[0].clone());
    }
    let log = http_get(server.addr(), "/events/log", None).await;
    assert!(log.contains("\"total\":6"), "{log}");
    // A request head larger than 8 KiB is dropped without an answer; the server keeps serving.
    let mut big = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let junk = format!("GET /status HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let _ = big.write_all(junk.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), big.read_to_end(&mut out)).await;
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
    assert!(http_get(server.addr(), "/metrics", None)
        .await
        .contains("xenft_agent_decisions_total 6"));
    assert!(http_get(server.addr(), "/nope", None)
        .await
        .starts_with("HTTP/1.1 404"));
    server.shutdown().await;
}
