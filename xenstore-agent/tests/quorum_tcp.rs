//! The quorum server over real TCP on loopback: grants, denials, authentication.

use std::time::Duration;

use xenft_agent::ids::{HostId, VmId};
use xenft_agent::quorum::client::{ClientError, QuorumClient};
use xenft_agent::quorum::server::{QuorumServer, ServerConfig};
use xenft_agent::quorum::table::{Claim, ClaimResult, QuorumRequest};

fn cfg(lease_ms: u64) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        secret: b"pool-secret".to_vec(),
        lease_ms,
        max_vms: 64,
        max_connections: 8,
        idle_timeout: Duration::from_secs(5),
    }
}

fn req(host: &str, id: u64) -> QuorumRequest {
    QuorumRequest {
        host: HostId::new(host).unwrap(),
        incarnation: 1,
        req_id: id,
        claims: vec![Claim {
            vm: VmId::new("vm1").unwrap(),
            epoch_hint: None,
        }],
    }
}

#[tokio::test]
async fn only_one_host_wins_a_vm_over_tcp() {
    let server = QuorumServer::start(cfg(200)).await.unwrap();
    let mut a = QuorumClient::new(
        server.addr(),
        b"pool-secret".to_vec(),
        Duration::from_secs(2),
    );
    let mut b = QuorumClient::new(
        server.addr(),
        b"pool-secret".to_vec(),
        Duration::from_secs(2),
    );
    // Grace period after start: nobody wins.
    let r = a.request(&req("a", 1)).await.unwrap();
    assert!(matches!(
        r.results[0],
        ClaimResult::Denied { holder: None, .. }
    ));
    tokio::time::sleep(Duration::from_millis(250)).await;
    let r = a.request(&req("a", 2)).await.unwrap();
    assert!(matches!(r.results[0], ClaimResult::Granted { .. }), "{r:?}");
    let r = b.request(&req("b", 1)).await.unwrap();
    assert!(matches!(r.results[0], ClaimResult::Denied { .. }), "{r:?}");
    assert_eq!(
        server.holder(&VmId::new("vm1").unwrap()),
        Some(HostId::new("a").unwrap())
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_with_the_wrong_secret_gets_nothing() {
    let server = QuorumServer::start(cfg(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut bad = QuorumClient::new(server.addr(), b"guess".to_vec(), Duration::from_millis(500));
    let e = bad.request(&req("a", 1)).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Wire { .. } | ClientError::Timeout(_)),
        "{e}"
    );
    assert_eq!(server.holder(&VmId::new("vm1").unwrap()), None);
    server.shutdown().await;
}
