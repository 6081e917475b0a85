//! The agent's XenAPI follower against the XenAPI test server: protection asked for through
//! XenAPI (the `xenft` CLI's own operations) reaches the follower's desired state through
//! `event.from`, without polling; unprotect removes it; an expired session and a restart of
//! the connection are survived; while xapi is away the last state stays.

use std::sync::Arc;
use std::time::{Duration, Instant};

use xenft_agent::xapi::desired::{Desired, Role};
use xenft_agent::xapi::follower::{Follower, FollowerConfig};
use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::ops;

mod runtime_pool;
use runtime_pool::pool_init;
use xenft_xapi::registry::Level;
use xenft_xapi::transport::{Endpoint, TlsOptions};
use xenft_xapi::{ConnectOptions, Credentials, XenApi};

const GIB: i64 = 1 << 30;

fn creds(srv: &FakeXapi) -> Credentials {
    Credentials {
        user: srv.user().into(),
        password: srv.password().into(),
    }
}

fn admin(srv: &FakeXapi) -> XenApi {
    XenApi::new(ConnectOptions::new(
        Endpoint::parse(&srv.url()).unwrap(),
        creds(srv),
    ))
    .unwrap()
}

fn follower(srv: &FakeXapi) -> Follower {
    Follower::start(FollowerConfig {
        endpoint: Endpoint::parse(&srv.url()).unwrap(),
        tls: TlsOptions::default(),
        credentials: creds(srv),
        event_timeout: Duration::from_secs(5),
    })
}

async fn wait_for(f: &Follower, what: &str, ok: impl Fn(&Desired) -> bool) -> Arc<Desired> {
    let mut rx = f.desired();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(d) = rx.borrow().clone() {
            if ok(&d) {
                return d;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out waiting for {what}: {:?}",
            rx.borrow()
        );
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protection_asked_through_xenapi_reaches_the_agent_by_events_and_survives_session_loss() {
    // Arrange: a pool of two hosts with one running VM, the registry initialised as
    // `xenft pool-init` does.
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, h1_uuid) = srv.add_host("host1", "10.0.0.1", 16 * GIB);
    let (_, h2_uuid) = srv.add_host("host2", "10.0.0.2", 16 * GIB);
    let (_, vm_uuid) = srv.add_vm("web01", 2 * GIB, Some(&h1));
    let api = admin(&srv);
    pool_init(
        &api,
        &[("host1", "10.0.0.1:7500"), ("host2", "10.0.0.2:7500")],
    )
    .await;

    let f = follower(&srv);
    let d = wait_for(&f, "the first read", |d| d.pool.is_some()).await;
    assert!(d.vms.is_empty(), "{d:?}");

    // Act: `xenft vm-protect vm=web01 level=2 secondary=host2`.
    ops::protect(&api, "web01", Level::Component, "host2")
        .await
        .unwrap();

    // Assert: the follower sees it, with this VM's roles on both hosts.
    let d = wait_for(&f, "web01 protected", |d| d.vms.contains_key(&vm_uuid)).await;
    assert_eq!(d.vms[&vm_uuid].level, 2);
    assert_eq!(
        d.role(&vm_uuid, &h1_uuid),
        Some(Role::Primary {
            secondary: h2_uuid.clone()
        })
    );
    assert!(matches!(
        d.role(&vm_uuid, &h2_uuid),
        Some(Role::Secondary { .. })
    ));
    // Followed by events, not by polling: one read of everything (the first event.from).
    assert_eq!(
        srv.calls("VM.get_all_records"),
        1,
        "only the CLI's own read"
    );
    assert!(srv.calls("event.from") >= 2);

    // An expired session: the follower logs in again and goes on.
    srv.expire_sessions();
    ops::unprotect(&api, "web01").await.unwrap();
    let d = wait_for(&f, "web01 unprotected", |d| !d.vms.contains_key(&vm_uuid)).await;
    assert!(d.refused.is_empty(), "{:?}", d.refused);

    // A protection the pool cannot carry out is reported, not dropped.
    let (vm2, vm2_uuid) = srv.add_vm("db01", GIB, Some(&h1));
    srv.set_map_key(&vm2, "other_config", "xenft.level", Some("3"));
    srv.set_map_key(
        &vm2,
        "other_config",
        "xenft.secondary",
        Some("no-such-host"),
    );
    let d = wait_for(&f, "db01 refused", |d| d.refused.contains_key(&vm2_uuid)).await;
    assert!(
        d.refused[&vm2_uuid].contains("not a host of this pool"),
        "{:?}",
        d.refused
    );
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_xapi_is_away_the_last_registry_read_stays_and_it_is_read_again_on_return() {
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, _) = srv.add_host("host1", "10.0.0.1", 16 * GIB);
    srv.add_host("host2", "10.0.0.2", 16 * GIB);
    let (vm, vm_uuid) = srv.add_vm("web01", GIB, Some(&h1));
    let h2_uuid = {
        let api = admin(&srv);
        let hosts = api.host_get_all_records().await.unwrap();
        hosts
            .values()
            .find(|h| h.name_label == "host2")
            .unwrap()
            .uuid
            .clone()
    };
    srv.set_map_key(&vm, "other_config", "xenft.level", Some("1"));
    srv.set_map_key(&vm, "other_config", "xenft.secondary", Some(&h2_uuid));
    let f = follower(&srv);
    wait_for(&f, "web01 at level 1", |d| d.vms.contains_key(&vm_uuid)).await;

    // Everything the follower publishes from now on.
    let seen: Arc<std::sync::Mutex<Vec<Option<Arc<Desired>>>>> = Arc::default();
    let collector = {
        let (mut rx, seen) = (f.desired(), seen.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let v = rx.borrow().clone();
                seen.lock().unwrap().push(v);
            }
        })
    };
    let logins = srv.calls("session.login_with_password");

    // xapi fails the next event.from calls (as during a restart); an unrelated change ends
    // the follower's current long poll so that it meets them now.
    for _ in 0..3 {
        srv.fail_next("event.from", "INTERNAL_ERROR", &["xapi is restarting"]);
    }
    srv.set_map_key(&vm, "other_config", "note", Some("touched"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.calls("session.login_with_password") < logins + 3 {
        assert!(
            Instant::now() < deadline,
            "the follower never logged in again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        f.desired().borrow().as_ref().map(|d| d.vms[&vm_uuid].level),
        Some(1),
        "the last read stays in force while xapi fails"
    );

    // Back: a change made meanwhile is read.
    srv.set_map_key(&vm, "other_config", "xenft.level", Some("2"));
    // Level 2 needs the pool's A-links, which were never configured: refused, with why.
    let d = wait_for(&f, "the change after xapi's return", |d| {
        d.refused.contains_key(&vm_uuid)
    })
    .await;
    assert!(d.refused[&vm_uuid].contains("pool-init"), "{:?}", d.refused);
    collector.abort();
    assert!(
        seen.lock().unwrap().iter().all(|d| d
            .as_ref()
            .is_some_and(|d| d.vms.contains_key(&vm_uuid) || d.refused.contains_key(&vm_uuid))),
        "the desired state was never dropped: {:?}",
        seen.lock().unwrap()
    );
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_goes_back_into_xapi_and_a_newer_format_is_left_alone() {
    use xenft_agent::xapi::state::{write_state, StateError, VmState};
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, _) = srv.add_host("host1", "10.0.0.1", 16 * GIB);
    let (vm, _) = srv.add_vm("web01", GIB, Some(&h1));
    let api = admin(&srv);
    let state = VmState::Degraded {
        cause: "peer host2 silent on every path".into(),
    }
    .to_string();
    write_state(&api, &vm, &state).await.unwrap();
    let oc = srv.map_field(&vm, "other_config");
    assert_eq!(oc["xenft.state"], state);
    assert_eq!(oc["XenCenter.CustomFields.xenft-status"], state);
    // The same state again writes nothing.
    let adds = srv.calls("VM.add_to_other_config");
    write_state(&api, &vm, &state).await.unwrap();
    assert_eq!(srv.calls("VM.add_to_other_config"), adds);
    // A newer agent's value stays.
    srv.set_map_key(
        &vm,
        "other_config",
        "xenft.state",
        Some("v2:{\"s\":\"protected\"}"),
    );
    let e = write_state(&api, &vm, "protected").await.unwrap_err();
    assert!(matches!(e, StateError::NewerFormat { .. }), "{e}");
    assert_eq!(
        srv.map_field(&vm, "other_config")["xenft.state"],
        "v2:{\"s\":\"protected\"}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pointed_at_a_pool_member_follows_the_master() {
    let master = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, _) = master.add_host("host1", "10.0.0.1", 16 * GIB);
    let (vm, vm_uuid) = master.add_vm("web01", GIB, Some(&h1));
    let (_, h2_uuid) = master.add_host("host2", "10.0.0.2", 16 * GIB);
    master.set_map_key(&vm, "other_config", "xenft.level", Some("1"));
    master.set_map_key(&vm, "other_config", "xenft.secondary", Some(&h2_uuid));
    // The member listens on another loopback address with the master's port.
    let member = FakeXapi::start(FakeXapiConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 2], master.addr().port())),
        slave_of: Some("127.0.0.1".into()),
        ..FakeXapiConfig::default()
    })
    .unwrap();
    let f = Follower::start(FollowerConfig {
        endpoint: Endpoint::parse(&member.url()).unwrap(),
        tls: TlsOptions::default(),
        credentials: creds(&master),
        event_timeout: Duration::from_secs(5),
    });
    let d = wait_for(&f, "the master's registry", |d| {
        d.vms.contains_key(&vm_uuid)
    })
    .await;
    assert_eq!(d.vms[&vm_uuid].level, 1);
    assert_eq!(member.calls("session.login_with_password"), 1);
    assert!(master.calls("event.from") >= 1);
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_on_an_xapi_host_starts_the_vm_through_start_on() {
    use xenft_agent::ids::{HostId, VmId};
    use xenft_agent::seams::DomainStarter;
    use xenft_agent::xapi::domain::XapiDomain;
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, _) = srv.add_host("h1", "10.0.0.1", 16 * GIB);
    let (h2, h2_uuid) = srv.add_host("h2", "10.0.0.2", 16 * GIB);
    let (vm, vm_uuid) = srv.add_vm("web01", GIB, Some(&h1));
    srv.set_map_key(&vm, "other_config", "xenft.level", Some("1"));
    srv.set_map_key(&vm, "other_config", "xenft.secondary", Some(&h2_uuid));
    let f = follower(&srv);
    wait_for(&f, "web01", |d| d.vms.contains_key(&vm_uuid)).await;
    let domains = XapiDomain::new(
        f.api(),
        f.desired(),
        HostId::new("h2").unwrap(),
        tokio::runtime::Handle::current(),
    );
    let on_h1 = XapiDomain::new(
        f.api(),
        f.desired(),
        HostId::new("h1").unwrap(),
        tokio::runtime::Handle::current(),
    );
    assert_eq!(on_h1.running(), vec![VmId::new(vm_uuid.as_str()).unwrap()]);
    assert!(domains.running().is_empty());
    let id = VmId::new(vm_uuid.as_str()).unwrap();
    let field = |name: &str| {
        srv.record(&vm)
            .and_then(|r| r.get(name).and_then(|v| v.as_str().map(str::to_string)))
            .unwrap_or_default()
    };
    // h1 is gone (the quorum said so): h2 starts the VM, though xapi still records it on h1.
    let (d, i) = (std::sync::Arc::new(domains), id.clone());
    let d2 = d.clone();
    tokio::task::spawn_blocking(move || d2.start(&i))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (field("power_state"), field("resident_on")),
        ("Running".into(), h2.clone())
    );
    assert_eq!(srv.calls("VM.power_state_reset"), 1);
    // The old primary, back, drops its copy because h2 owns the VM — at once, before its
    // registry shows the take-over: xapi, read afresh, records the VM on h2, so h1's destroy
    // (and a late fence) must not stop it there.
    let (old, i) = (std::sync::Arc::new(on_h1), id.clone());
    tokio::task::spawn_blocking(move || {
        old.pause(&i).unwrap();
        old.destroy(&i)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        (field("power_state"), field("resident_on")),
        ("Running".into(), h2.clone()),
        "the old primary's destroy stopped the VM on its new host"
    );
    assert_eq!(srv.calls("VM.hard_shutdown"), 0);
    assert_eq!(srv.calls("VM.pause"), 0);
    // Fencing and its end, then the copy dropped.
    for (op, state) in [
        ("pause", "Paused"),
        ("resume", "Running"),
        ("destroy", "Halted"),
    ] {
        let (d2, i) = (d.clone(), id.clone());
        tokio::task::spawn_blocking(move || match op {
            "pause" => d2.pause(&i),
            "resume" => d2.resume(&i),
            _ => d2.destroy(&i),
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(field("power_state"), state, "after {op}");
    }
    // A VM the registry does not know is refused with the reason.
    let (d2, ghost) = (d.clone(), VmId::new("no-such-vm").unwrap());
    let e = tokio::task::spawn_blocking(move || d2.start(&ghost))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.reason.contains("registry"), "{e}");
    f.shutdown().await;
}
