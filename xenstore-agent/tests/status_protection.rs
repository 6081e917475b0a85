//! Protect and unprotect through the agent's status API (what a console calls), in process:
//! without a plane the agent's core gets the inputs; with its XenAPI plane the registry in
//! the XenAPI test server is written as `xenft vm-protect` writes it, and the agent follows.
//! Bad requests answer a 4xx with the reason.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xenft_agent::core::VmSpec;
use xenft_agent::ids::VmId;
use xenft_agent::lifecycle::Level;
use xenft_agent::protection_api::ProtectionApi;
use xenft_agent::runtime::Agent;
use xenft_agent::seams::{Recorder, Seams};
use xenft_agent::status::{StatusHub, StatusServer};
use xenft_agent::xapi::follower::{Follower, FollowerConfig};
use xenft_agent::xapi::plane::Plane;
use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::transport::{Endpoint, TlsOptions};
use xenft_xapi::{ConnectOptions, Credentials, XenApi};

mod runtime_pool;
use runtime_pool::{host, pool_init, start_quorum, wait_for, Pool};

const TOKEN: &str = "console-token";
const GIB: i64 = 1 << 30;

/// One HTTP request to `addr`; the status code and the body as JSON (`Null` if not JSON).
async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut out))
        .await
        .expect("the agent answers")
        .unwrap();
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, serde_json::from_str(body).unwrap_or_default())
}

fn reason(v: &serde_json::Value) -> String {
    v["error"].as_str().unwrap_or_default().to_string()
}

fn record(hub: &StatusHub, vm: &str) -> Option<xenft_agent::lifecycle::VmRecord> {
    hub.snapshot()
        .vms
        .into_iter()
        .map(|v| v.record)
        .find(|r| r.vm.as_str() == vm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_plane_protect_and_unprotect_feed_the_core_and_bad_requests_get_their_reason() {
    // Arrange: h1's agent protecting vm1 (level 2, secondary h2), its status API with a token.
    let q = start_quorum().await;
    let pool = Pool::new(q.addr());
    let spec = VmSpec {
        vm: VmId::new("vm1").unwrap(),
        level: Level::L2,
        primary: host("h1"),
        secondary: host("h2"),
        memory_mb: 256,
    };
    let cfg = pool.config_with(0, vec![spec.clone()]).validate().unwrap();
    let hosts = cfg.core.peers.clone();
    let agent = Agent::start(cfg, Seams::recording(&Recorder::new()))
        .await
        .unwrap();
    let hub = agent.hub();
    wait_for("vm1 protected at start", Duration::from_secs(5), || {
        record(&hub, "vm1").is_some()
    })
    .await;
    let api = ProtectionApi::core(agent.inputs(), hub.clone(), host("h1"), hosts, &[spec]);
    let srv = StatusServer::start_with_protection(
        "127.0.0.1:0".parse().unwrap(),
        Some(TOKEN.into()),
        hub.clone(),
        Some(api.clone()),
    )
    .await
    .unwrap();
    let a = srv.addr();
    let post = |path: &'static str, token: Option<&'static str>, body: &'static str| {
        request(a, "POST", path, token, body)
    };

    // No token, or a wrong one: nothing happens.
    assert_eq!(post("/vm/vm1/unprotect", None, "").await.0, 401);
    assert_eq!(post("/vm/vm1/unprotect", Some("guess"), "").await.0, 401);
    assert!(record(&hub, "vm1").is_some());

    // Act: unprotect.
    let (code, body) = post("/vm/vm1/unprotect", Some(TOKEN), "").await;
    assert_eq!(
        (code, &body["was_protected"]),
        (200, &true.into()),
        "{body}"
    );
    wait_for("vm1 unprotected", Duration::from_secs(5), || {
        record(&hub, "vm1").is_none()
    })
    .await;

    // Bad requests: each refused with its reason, nothing protected.
    let bad = [
        (
            "/vm/vm9/protect",
            r#"{"level": 2, "secondary": "h2"}"#,
            404,
            "vm9",
        ),
        (
            "/vm/vm1/protect",
            r#"{"level": 7, "secondary": "h2"}"#,
            400,
            "level 7",
        ),
        (
            "/vm/vm1/protect",
            r#"{"level": 2, "secondary": "h9"}"#,
            400,
            "not a host of this pool",
        ),
        (
            "/vm/vm1/protect",
            r#"{"level": 2, "secondary": "h1"}"#,
            400,
            "another host",
        ),
        ("/vm/vm1/protect", "level=2", 400, "the body must be"),
        ("/vm/vm1/protect", "", 400, "the body must be"),
    ];
    for (path, body, want, why) in bad {
        let (code, b) = post(path, Some(TOKEN), body).await;
        assert_eq!(code, want, "{path} {body}: {b}");
        assert!(reason(&b).contains(why), "{path} {body}: {b}");
    }
    let huge = format!(r#"{{"level": 2, "secondary": "{}"}}"#, "h".repeat(5000));
    let (code, b) = request(a, "POST", "/vm/vm1/protect", Some(TOKEN), &huge).await;
    assert_eq!(code, 413, "{b}");
    let (code, _) = request(a, "GET", "/vm/vm1/protect", Some(TOKEN), "").await;
    assert_eq!(code, 405);
    assert!(record(&hub, "vm1").is_none());

    // Act: protect again, at level 3.
    let (code, b) = post(
        "/vm/vm1/protect",
        Some(TOKEN),
        r#"{"level": 3, "secondary": "h2"}"#,
    )
    .await;
    assert_eq!(code, 200, "{b}");

    // Assert: the core protects it as asked; a different protection on top is refused.
    wait_for("vm1 protected at level 3", Duration::from_secs(5), || {
        record(&hub, "vm1").is_some_and(|r| {
            (r.level, r.primary.as_str(), r.secondary.as_str()) == (Level::L3, "h1", "h2")
        })
    })
    .await;
    let (code, b) = post(
        "/vm/vm1/protect",
        Some(TOKEN),
        r#"{"level": 2, "secondary": "h2"}"#,
    )
    .await;
    assert_eq!(code, 409, "{b}");
    assert!(reason(&b).contains("already protected at level 3"), "{b}");
    let (code, b) = post(
        "/vm/vm1/protect",
        Some(TOKEN),
        r#"{"level": 3, "secondary": "h2"}"#,
    )
    .await;
    assert_eq!((code, &b["already_protected"]), (200, &true.into()), "{b}");

    // A status API without a token does not change protections at all.
    let open = StatusServer::start_with_protection(
        "127.0.0.1:0".parse().unwrap(),
        None,
        hub.clone(),
        Some(api),
    )
    .await
    .unwrap();
    let (code, b) = request(open.addr(), "POST", "/vm/vm1/unprotect", None, "").await;
    assert_eq!(code, 403, "{b}");
    assert!(record(&hub, "vm1").is_some());
    open.shutdown().await;
    srv.shutdown().await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_xapi_plane_protect_and_unprotect_write_the_registry_and_the_agent_follows() {
    // Arrange: the pool's xapi (h1, h2, web01 on h1), h1's agent following it.
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1_ref, _) = srv.add_host("h1", "10.0.0.1", 16 * GIB);
    let (_, h2_uuid) = srv.add_host("h2", "10.0.0.2", 16 * GIB);
    let (vm_ref, vm_uuid) = srv.add_vm("web01", 2 * GIB, Some(&h1_ref));
    let creds = Credentials {
        user: srv.user().into(),
        password: srv.password().into(),
    };
    let endpoint = Endpoint::parse(&srv.url()).unwrap();
    let admin = XenApi::new(ConnectOptions::new(endpoint.clone(), creds.clone())).unwrap();
    pool_init(&admin, &[("h1", "10.0.0.1:7500"), ("h2", "10.0.0.2:7500")]).await;
    let q = start_quorum().await;
    let pool = Pool::new(q.addr());
    let agent = Agent::start(
        pool.config_with(0, vec![]).validate().unwrap(),
        Seams::recording(&Recorder::new()),
    )
    .await
    .unwrap();
    let follower = Follower::start(FollowerConfig {
        endpoint,
        tls: TlsOptions::default(),
        credentials: creds,
        event_timeout: Duration::from_secs(5),
    });
    let session = follower.api();
    let api = ProtectionApi::xapi(follower.api());
    let plane = Plane::with_follower(follower, host("h1"), agent.inputs(), agent.hub(), None);
    wait_for("the plane's session", Duration::from_secs(10), || {
        session.borrow().is_some()
    })
    .await;
    let status = StatusServer::start_with_protection(
        "127.0.0.1:0".parse().unwrap(),
        Some(TOKEN.into()),
        agent.hub(),
        Some(api),
    )
    .await
    .unwrap();
    let a = status.addr();
    let other_config = || srv.map_field(&vm_ref, "other_config");

    // Bad requests: refused with the reason xapi's registry gives, nothing written.
    let bad = [
        (
            "/vm/nope/protect",
            r#"{"level": 2, "secondary": "h2"}"#,
            404,
            "nope",
        ),
        (
            "/vm/web01/protect",
            r#"{"level": 0, "secondary": "h2"}"#,
            400,
            "level 0",
        ),
        (
            "/vm/web01/protect",
            r#"{"level": 2, "secondary": "h9"}"#,
            400,
            "h9",
        ),
        (
            "/vm/web01/protect",
            r#"{"level": 2, "secondary": "h1"}"#,
            409,
            "another host",
        ),
    ];
    for (path, body, want, why) in bad {
        let (code, b) = request(a, "POST", path, Some(TOKEN), body).await;
        assert_eq!(code, want, "{path} {body}: {b}");
        assert!(reason(&b).contains(why), "{path} {body}: {b}");
    }
    assert!(!other_config().contains_key("xenft.level"));

    // Act: protect web01 at level 2 with h2 as the secondary.
    let (code, b) = request(
        a,
        "POST",
        "/vm/web01/protect",
        Some(TOKEN),
        r#"{"level": 2, "secondary": "h2"}"#,
    )
    .await;
    assert_eq!(code, 200, "{b}");

    // Assert: the registry holds the protection as vm-protect writes it; the agent follows.
    let oc = other_config();
    assert_eq!(oc.get("xenft.level").map(String::as_str), Some("2"));
    assert_eq!(oc.get("xenft.secondary"), Some(&h2_uuid));
    let hub = agent.hub();
    wait_for("the agent protects web01", Duration::from_secs(15), || {
        record(&hub, &vm_uuid).is_some_and(|r| r.level == Level::L2 && r.secondary.as_str() == "h2")
    })
    .await;

    // Act: unprotect.
    let (code, b) = request(a, "POST", "/vm/web01/unprotect", Some(TOKEN), "").await;
    assert_eq!((code, &b["was_protected"]), (200, &true.into()), "{b}");

    // Assert: the registry no longer protects it, and the agent lets go.
    let oc = other_config();
    assert!(!oc.contains_key("xenft.level"), "{oc:?}");
    assert!(!oc.contains_key("xenft.secondary"), "{oc:?}");
    wait_for(
        "the agent lets go of web01",
        Duration::from_secs(15),
        || record(&hub, &vm_uuid).is_none(),
    )
    .await;
    status.shutdown().await;
    plane.shutdown().await;
    agent.shutdown().await;
}
