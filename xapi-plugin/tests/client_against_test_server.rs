//! The XenAPI client against the XenAPI test server (tests/src/xapi_server.rs): sessions,
//! records, map edits, event.from, errors, both transports and both encodings.

use std::collections::BTreeMap;
use std::time::Duration;

use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::transport::Endpoint;
use xenft_xapi::{codes, Class, ConnectOptions, Credentials, EventStream, Protocol, XenApi};

const GIB: i64 = 1 << 30;

fn client(srv: &FakeXapi, protocol: Protocol) -> XenApi {
    let mut o = ConnectOptions::new(
        Endpoint::parse(&srv.url()).unwrap(),
        Credentials {
            user: srv.user().into(),
            password: srv.password().into(),
        },
    );
    o.protocol = protocol;
    o.timeout = Duration::from_secs(10);
    XenApi::new(o).unwrap()
}

fn pool() -> FakeXapi {
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, _) = srv.add_host("host1", "10.0.0.1", 16 * GIB);
    srv.add_host("host2", "10.0.0.2", 16 * GIB);
    srv.add_vm("web01", 4 * GIB, Some(&h1));
    srv
}

async fn records_and_map_edits(protocol: Protocol) {
    let srv = pool();
    let api = client(&srv, protocol);
    let vms = api.vm_get_all_records().await.unwrap();
    let (vm, rec) = vms.iter().next().unwrap();
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

#[tokio::test]
async fn event_from_reports_changes_and_recovers_from_lost_events() {
    let srv = pool();
    let api = client(&srv, Protocol::XmlRpc);
    let mut stream = EventStream::new(&["vm"]);
    let first = stream.next(&api, Duration::from_secs(1)).await.unwrap();
    assert_eq!(first.events.len(), 1, "empty token: every VM once");
    let vm = first.events[0].obj_ref.clone();

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
    assert_eq!(b.events.len(), 1);
    let snap = b.events[0].snapshot.as_ref().unwrap();
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
