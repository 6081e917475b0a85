//! The XenAPI client against the XenAPI test server (tests/src/xapi_server/): sessions,
//! records, map edits, event.from, errors, both transports and both encodings.

use std::collections::BTreeMap;
use std::time::Duration;

use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::transport::Endpoint;
use xenft_xapi::{codes, Class, ConnectOptions, Credentials, EventStream, Protocol, XenApi};

const GIB: i64 = 1 << 30;

fn client(srv: &FakeXapi, protocol: Protocol) -> XenApi {
    XenApi::new(srv.client_options(protocol)).unwrap()
}

fn pool() -> FakeXapi {
    FakeXapi::with_pool().0
}

async fn records_and_map_edits(protocol: Protocol) {
    let srv = pool();
    let api = client(&srv, protocol);
    let vms = api.vm_get_all_records().await.unwrap();
    // xapi lists each host's control domain and the default templates among the VMs.
    assert_eq!(vms.values().filter(|v| v.is_control_domain).count(), 2);
    assert_eq!(vms.values().filter(|v| v.is_a_template).count(), 2);
    let mut guests = vms.iter().filter(|(_, v)| v.is_guest());
    let (vm, rec) = guests.next().unwrap();
    assert!(guests.next().is_none(), "one guest");
    assert_eq!(rec.name_label, "web01");
    assert_eq!(
        rec.memory_static_max,
        4 * GIB,
        "64-bit int survives the wire"
    );
    assert_eq!(rec.power_state, "Running");
    assert_eq!(api.get_by_uuid(Class::Vm, &rec.uuid).await.unwrap(), *vm);
    assert_eq!(
        api.get_by_name_label(Class::Vm, "web01").await.unwrap(),
        vec![vm.clone()]
    );

    api.add_to_map(Class::Vm, vm, "other_config", "xenft.level", "2")
        .await
        .unwrap();
    let dup = api
        .add_to_map(Class::Vm, vm, "other_config", "xenft.level", "3")
        .await
        .unwrap_err();
    assert!(dup.is(codes::MAP_DUPLICATE_KEY), "{dup}");
    api.set_map_key(Class::Vm, vm, "other_config", "xenft.level", "3")
        .await
        .unwrap();
    assert_eq!(srv.map_field(vm, "other_config")["xenft.level"], "3");
    api.remove_from_map(Class::Vm, vm, "other_config", "xenft.level")
        .await
        .unwrap();
    assert!(!srv
        .map_field(vm, "other_config")
        .contains_key("xenft.level"));

    let bad = api
        .get_record_raw(Class::Vm, "OpaqueRef:nope")
        .await
        .unwrap_err();
    match bad {
        xenft_xapi::XapiError::Api { code, params } => {
            assert_eq!(code, codes::HANDLE_INVALID);
            assert_eq!(params, vec!["VM".to_string(), "OpaqueRef:nope".to_string()]);
        }
        e => panic!("{e}"),
    }
}

#[tokio::test]
async fn xmlrpc_records_and_map_edits() {
    records_and_map_edits(Protocol::XmlRpc).await;
}

#[tokio::test]
async fn jsonrpc_records_and_map_edits() {
    records_and_map_edits(Protocol::JsonRpc).await;
}

#[tokio::test]
async fn wrong_password_is_authentication_failure() {
    let srv = pool();
    let api = XenApi::new(ConnectOptions::new(
        Endpoint::parse(&srv.url()).unwrap(),
        Credentials {
            user: "root".into(),
            password: "wrong".into(),
        },
    ))
    .unwrap();
    let e = api.vm_get_all_records().await.unwrap_err();
    assert!(e.is(codes::SESSION_AUTHENTICATION_FAILED), "{e}");
}

#[tokio::test]
async fn expired_session_is_renewed_transparently() {
    let srv = pool();
    let api = client(&srv, Protocol::XmlRpc);
    api.vm_get_all_records().await.unwrap();
    let first = api.session_ref().await.unwrap();
    srv.expire_sessions();
    api.vm_get_all_records().await.unwrap();
    assert_ne!(api.session_ref().await.unwrap(), first);
    assert_eq!(srv.calls("session.login_with_password"), 2);
}

#[tokio::test]
async fn unix_socket_transport_works() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("xapi");
    let srv = FakeXapi::start(FakeXapiConfig {
        unix_socket: Some(sock.clone()),
        ..Default::default()
    })
    .unwrap();
    srv.add_host("host1", "10.0.0.1", GIB);
    let api = XenApi::new(ConnectOptions::new(
        Endpoint::parse(&format!("unix:{}", sock.display())).unwrap(),
        Credentials {
            user: srv.user().into(),
            password: srv.password().into(),
        },
    ))
    .unwrap();
    let hosts = api.host_get_all_records().await.unwrap();
    assert_eq!(hosts.values().next().unwrap().name_label, "host1");
}

/// The one guest among the VM events of a full read.
fn guest_ref(b: &xenft_xapi::api::EventBatch) -> String {
    let guests: Vec<_> = b
        .events
        .iter()
        .filter(|e| {
            let rec = xenft_xapi::VmRecord::from_value(e.snapshot.as_ref().unwrap()).unwrap();
            rec.is_guest()
        })
        .collect();
    assert_eq!(guests.len(), 1, "{b:?}");
    guests[0].obj_ref.clone()
}

#[tokio::test]
async fn event_from_reports_changes_and_recovers_from_lost_events() {
    let srv = pool();
    let api = client(&srv, Protocol::XmlRpc);
    let mut stream = EventStream::new(&["vm"]);
    let first = stream.next(&api, Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        first.events.len(),
        5,
        "empty token: every VM once (web01, two control domains, two templates)"
    );
    let vm = guest_ref(&first);

    // Nothing happens: the long poll returns empty at the timeout.
    let idle = stream.next(&api, Duration::from_millis(200)).await.unwrap();
    assert!(idle.events.is_empty());

    // A change made while we wait wakes the long poll up.
    let writer = {
        let api2 = client(&srv, Protocol::XmlRpc);
        let vm = vm.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            api2.add_to_map(Class::Vm, &vm, "other_config", "k", "v")
                .await
                .unwrap();
        })
    };
    let b = stream.next(&api, Duration::from_secs(5)).await.unwrap();
    writer.await.unwrap();
    assert_eq!(b.events.len(), 1);
    assert_eq!(b.events[0].obj_ref, vm);
    assert!(!b.resynced);

    // History lost: the stream re-reads everything and says so.
    srv.drop_event_history();
    let b = stream.next(&api, Duration::from_secs(1)).await.unwrap();
    assert!(b.resynced);
    assert_eq!(b.events.len(), 5);
    let snap = b
        .events
        .iter()
        .find(|e| e.obj_ref == vm)
        .and_then(|e| e.snapshot.as_ref())
        .unwrap();
    assert_eq!(
        snap.as_struct().unwrap()["other_config"]
            .to_string_map()
            .unwrap()["k"],
        "v"
    );
}

#[tokio::test]
async fn start_on_and_migrate_check_memory_and_power_state() {
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, _) = srv.add_host("host1", "10.0.0.1", 8 * GIB);
    let (h2, _) = srv.add_host("host2", "10.0.0.2", 2 * GIB);
    let (vm, _) = srv.add_vm("db", 4 * GIB, None);
    let api = client(&srv, Protocol::XmlRpc);
    assert_eq!(api.host_compute_free_memory(&h1).await.unwrap(), 8 * GIB);
    let e = api.vm_start_on(&vm, &h2, false).await.unwrap_err();
    assert!(e.is(codes::HOST_NOT_ENOUGH_FREE_MEMORY), "{e}");
    api.vm_start_on(&vm, &h1, false).await.unwrap();
    assert_eq!(api.host_compute_free_memory(&h1).await.unwrap(), 4 * GIB);
    let e = api.vm_start_on(&vm, &h1, false).await.unwrap_err();
    assert!(e.is(codes::VM_BAD_POWER_STATE), "{e}");
    let mut opts = BTreeMap::new();
    opts.insert("live".to_string(), "true".to_string());
    let e = api.vm_pool_migrate(&vm, &h2, &opts).await.unwrap_err();
    assert!(e.is(codes::HOST_NOT_ENOUGH_FREE_MEMORY), "{e}");
}

#[tokio::test]
async fn checked_write_detects_a_concurrent_change_instead_of_overwriting_it() {
    use xenft_xapi::registry::{checked_set, RegistryError};
    let srv = pool();
    let api = client(&srv, Protocol::XmlRpc);
    let pool_ref = srv.pool_ref();
    srv.set_map_key(&pool_ref, "other_config", "xenft.pool", Some("A"));
    // We read "A"; another admin writes "B" before our write.
    srv.set_map_key(&pool_ref, "other_config", "xenft.pool", Some("B"));
    let e = checked_set(
        &api,
        Class::Pool,
        &pool_ref,
        "other_config",
        "xenft.pool",
        Some("A"),
        Some("C"),
    )
    .await
    .unwrap_err();
    match e {
        RegistryError::Conflict {
            expected, found, ..
        } => {
            assert_eq!(expected.as_deref(), Some("A"));
            assert_eq!(found.as_deref(), Some("B"));
        }
        e => panic!("{e}"),
    }
    assert_eq!(
        srv.map_field(&pool_ref, "other_config")["xenft.pool"],
        "B",
        "B survives"
    );
    // Someone adds the key between our remove and our add: MAP_DUPLICATE_KEY → conflict.
    srv.fail_next(
        "pool.add_to_other_config",
        "MAP_DUPLICATE_KEY",
        &["pool", "other_config", &pool_ref, "xenft.pool"],
    );
    let e = checked_set(
        &api,
        Class::Pool,
        &pool_ref,
        "other_config",
        "xenft.pool",
        Some("B"),
        Some("C"),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RegistryError::Conflict { .. }), "{e}");
    // With the right expectation the write goes through.
    srv.set_map_key(&pool_ref, "other_config", "xenft.pool", Some("B"));
    checked_set(
        &api,
        Class::Pool,
        &pool_ref,
        "other_config",
        "xenft.pool",
        Some("B"),
        Some("C"),
    )
    .await
    .unwrap();
    assert_eq!(srv.map_field(&pool_ref, "other_config")["xenft.pool"], "C");
}

#[tokio::test]
async fn concurrent_pool_updates_both_land() {
    use xenft_xapi::registry::{update_pool_config, Policy, PoolConfig, FORMAT_VERSION};
    let srv = pool();
    let a = client(&srv, Protocol::XmlRpc);
    let b = client(&srv, Protocol::XmlRpc);
    let add = |api: &'static XenApi, q: &'static str| async move {
        update_pool_config(api, |cur| {
            let mut c = cur.unwrap_or(PoolConfig {
                format_version: FORMAT_VERSION,
                hosts: BTreeMap::new(),
                quorum_servers: vec![],
                policy: Policy::default(),
                secret_uuid: None,
            });
            c.quorum_servers.push(q.to_string());
            Ok(c)
        })
        .await
    };
    let a: &'static XenApi = Box::leak(Box::new(a));
    let b: &'static XenApi = Box::leak(Box::new(b));
    let (ra, rb) = tokio::join!(add(a, "10.0.0.8:7100"), add(b, "10.0.0.9:7100"));
    // Both writers serialise on the pool lock: both changes land, none is lost.
    ra.unwrap();
    rb.unwrap();
    let raw = &srv.map_field(&srv.pool_ref(), "other_config")["xenft.pool"];
    let c = xenft_xapi::registry::parse_pool_config(raw, "pool").unwrap();
    assert_eq!(c.quorum_servers.len(), 2, "{c:?}");
}

#[tokio::test]
async fn concurrent_protects_cannot_both_take_the_same_free_memory() {
    use xenft_xapi::registry::Level;
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, _) = srv.add_host("host1", "10.0.0.1", 32 * GIB);
    srv.add_host("host2", "10.0.0.2", 6 * GIB);
    srv.add_vm("a", 4 * GIB, Some(&h1));
    srv.add_vm("b", 4 * GIB, Some(&h1));
    let api_a = client(&srv, Protocol::XmlRpc);
    let api_b = client(&srv, Protocol::XmlRpc);
    let (ra, rb) = tokio::join!(
        xenft_xapi::ops::protect(&api_a, "a", Level::Restart, "host2"),
        xenft_xapi::ops::protect(&api_b, "b", Level::Restart, "host2"),
    );
    let refused = [&ra, &rb]
        .iter()
        .filter(|r| matches!(r, Err(xenft_xapi::ops::OpError::Refused(_))))
        .count();
    assert_eq!(refused, 1, "{ra:?} {rb:?}");
    assert!(ra.is_ok() || rb.is_ok());
    assert!(
        !srv.map_field(&srv.pool_ref(), "other_config")
            .contains_key("xenft.lock"),
        "lock released"
    );
}

#[tokio::test]
async fn an_abandoned_registry_lock_is_broken() {
    use xenft_xapi::registry::Level;
    let srv = pool();
    srv.set_map_key(
        &srv.pool_ref(),
        "other_config",
        "xenft.lock",
        Some("dead@1000"),
    );
    let api = client(&srv, Protocol::XmlRpc);
    xenft_xapi::ops::protect(&api, "web01", Level::Restart, "host2")
        .await
        .unwrap();
    assert!(!srv
        .map_field(&srv.pool_ref(), "other_config")
        .contains_key("xenft.lock"));
}

#[tokio::test]
async fn agent_helpers_list_protected_vms_and_report_state() {
    use xenft_xapi::registry::{protected_vms, set_vm_state, Level};
    let srv = pool();
    let h1 = srv.record(&srv.pool_ref()).unwrap()["master"]
        .as_str()
        .unwrap()
        .to_string();
    let (bad, _) = srv.add_vm("bad", GIB, Some(&h1));
    srv.set_map_key(&bad, "other_config", "xenft.level", Some("9"));
    let api = client(&srv, Protocol::XmlRpc);
    assert_eq!(
        protected_vms(&api).await.unwrap().len(),
        1,
        "only the malformed one so far"
    );
    xenft_xapi::ops::protect(&api, "web01", Level::Component, "host2")
        .await
        .unwrap();
    let list = protected_vms(&api).await.unwrap();
    assert_eq!(list.len(), 2);
    let (web, _, p) = list
        .iter()
        .find(|(_, v, _)| v.name_label == "web01")
        .unwrap();
    assert_eq!(p.as_ref().unwrap().level, Some(Level::Component));
    assert!(list
        .iter()
        .any(|(_, v, p)| v.name_label == "bad" && p.is_err()));
    set_vm_state(&api, web, "protected").await.unwrap();
    assert_eq!(
        srv.map_field(web, "other_config")["xenft.state"],
        "protected"
    );
}

#[tokio::test]
async fn deleted_objects_come_as_del_events_without_snapshot() {
    let srv = pool();
    let api = client(&srv, Protocol::XmlRpc);
    let mut stream = EventStream::new(&["vm"]);
    let first = stream.next(&api, Duration::ZERO).await.unwrap();
    let vm = guest_ref(&first);
    srv.destroy(&vm);
    let b = stream.next(&api, Duration::from_secs(2)).await.unwrap();
    assert_eq!(b.events.len(), 1);
    assert_eq!(b.events[0].operation, xenft_xapi::api::EventOp::Del);
    assert_eq!(b.events[0].obj_ref, vm);
    assert!(b.events[0].snapshot.is_none());
    let e = api.get_record_raw(Class::Vm, &vm).await.unwrap_err();
    assert!(e.is(codes::HANDLE_INVALID));
}

#[tokio::test]
async fn protecting_dom0_a_template_or_a_snapshot_is_refused_saying_why() {
    use xenft_xapi::ops::{self, OpError};
    use xenft_xapi::registry::Level;
    let srv = pool();
    let (web, _) = srv.add_vm("web02", GIB, None);
    srv.add_snapshot(&web, "web02 before upgrade");
    let api = client(&srv, Protocol::JsonRpc);
    for (name, why) in [
        ("Control domain on host: host1", "control domain"),
        (xenft_tests::xapi_server::DEFAULT_TEMPLATES[0], "template"),
        ("web02 before upgrade", "snapshot"),
    ] {
        match ops::protect(&api, name, Level::Restart, "host2").await {
            Err(OpError::Refused(m)) => assert!(m.contains(why), "{name}: {m}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    let listed: Vec<String> = ops::list(&api)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(listed, vec!["web01", "web02"], "vm-list shows guests only");
    assert!(xenft_xapi::registry::protected_vms(&api)
        .await
        .unwrap()
        .is_empty());
}
