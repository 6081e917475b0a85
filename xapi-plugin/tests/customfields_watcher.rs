//! The XenCenter custom-field watcher against the test server: an admin sets or clears a VM's
//! `xenft-level` field (as XenCenter does, through other_config) and the VM gets protected or
//! unprotected; refusals are written back to `xenft-status`.

use std::time::Duration;

use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::customfields::{
    value_key, Action, CustomFieldWatcher, FIELD_LEVEL, FIELD_SECONDARY, FIELD_STATUS,
};
use xenft_xapi::registry::Level;
use xenft_xapi::transport::Endpoint;
use xenft_xapi::{ConnectOptions, Credentials, XenApi};

const GIB: i64 = 1 << 30;

fn api(srv: &FakeXapi) -> XenApi {
    XenApi::new(ConnectOptions::new(
        Endpoint::parse(&srv.url()).unwrap(),
        Credentials {
            user: srv.user().into(),
            password: srv.password().into(),
        },
    ))
    .unwrap()
}

/// Steps the watcher until it acts (or 10 s pass).
async fn next_actions(w: &mut CustomFieldWatcher, api: &XenApi) -> Vec<Action> {
    for _ in 0..20 {
        let a = w.step(api, Duration::from_millis(500)).await.unwrap();
        if !a.is_empty() {
            return a;
        }
    }
    Vec::new()
}

fn setup(h2_mem: i64) -> (FakeXapi, String, String) {
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, _) = srv.add_host("host1", "10.0.0.1", 16 * GIB);
    srv.add_host("host2", "10.0.0.2", h2_mem);
    let (vm, uuid) = srv.add_vm("web01", 4 * GIB, Some(&h1));
    (srv, vm, uuid)
}

#[tokio::test]
async fn setting_and_clearing_the_level_field_protects_and_unprotects() {
    let (srv, vm, uuid) = setup(16 * GIB);
    let api = api(&srv);
    let mut w = CustomFieldWatcher::new();
    assert!(
        w.step(&api, Duration::ZERO).await.unwrap().is_empty(),
        "nothing to do at start"
    );

    srv.set_map_key(
        &vm,
        "other_config",
        &value_key(FIELD_SECONDARY),
        Some("host2"),
    );
    srv.set_map_key(&vm, "other_config", &value_key(FIELD_LEVEL), Some("3"));
    let a = next_actions(&mut w, &api).await;
    assert_eq!(
        a,
        vec![Action::Protected {
            vm: uuid.clone(),
            level: Level::System
        }]
    );
    let oc = srv.map_field(&vm, "other_config");
    assert_eq!(oc["xenft.level"], "3");
    assert!(
        oc[&value_key(FIELD_STATUS)].contains("level 3 on host2"),
        "{oc:?}"
    );

    // Our own writes do not trigger more work.
    assert!(w
        .step(&api, Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());

    srv.set_map_key(&vm, "other_config", &value_key(FIELD_LEVEL), None);
    let a = next_actions(&mut w, &api).await;
    assert_eq!(a, vec![Action::Unprotected { vm: uuid }]);
    let oc = srv.map_field(&vm, "other_config");
    assert!(!oc.contains_key("xenft.level"));
    assert_eq!(oc[&value_key(FIELD_STATUS)], "unprotected");
}

#[tokio::test]
async fn refusal_is_written_back_and_not_retried_until_the_request_changes() {
    let (srv, vm, uuid) = setup(2 * GIB);
    srv.add_host("host3", "10.0.0.3", 16 * GIB);
    let api = api(&srv);
    let mut w = CustomFieldWatcher::new();
    w.step(&api, Duration::ZERO).await.unwrap();

    srv.set_map_key(
        &vm,
        "other_config",
        &value_key(FIELD_SECONDARY),
        Some("host2"),
    );
    srv.set_map_key(&vm, "other_config", &value_key(FIELD_LEVEL), Some("2"));
    let a = next_actions(&mut w, &api).await;
    assert!(
        matches!(&a[..], [Action::Failed { vm, .. }] if *vm == uuid),
        "{a:?}"
    );
    let status = &srv.map_field(&vm, "other_config")[&value_key(FIELD_STATUS)];
    assert!(
        status.starts_with("error: refused") && status.contains("2.00 GiB"),
        "{status}"
    );
    assert!(!srv
        .map_field(&vm, "other_config")
        .contains_key("xenft.level"));

    // An unrelated change of the VM does not retry the same refused request.
    srv.set_map_key(&vm, "other_config", "unrelated", Some("x"));
    assert!(w
        .step(&api, Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());

    // Pointing the field at a host with room succeeds.
    srv.set_map_key(
        &vm,
        "other_config",
        &value_key(FIELD_SECONDARY),
        Some("host3"),
    );
    let a = next_actions(&mut w, &api).await;
    assert_eq!(
        a,
        vec![Action::Protected {
            vm: uuid,
            level: Level::Component
        }]
    );
}

#[tokio::test]
async fn invalid_level_is_reported_in_the_status_field() {
    let (srv, vm, _) = setup(16 * GIB);
    let api = api(&srv);
    let mut w = CustomFieldWatcher::new();
    w.step(&api, Duration::ZERO).await.unwrap();
    srv.set_map_key(&vm, "other_config", &value_key(FIELD_LEVEL), Some("high"));
    let a = next_actions(&mut w, &api).await;
    assert!(matches!(&a[..], [Action::Failed { .. }]), "{a:?}");
    let status = &srv.map_field(&vm, "other_config")[&value_key(FIELD_STATUS)];
    assert!(status.contains("1, 2 or 3"), "{status}");
}

#[tokio::test]
async fn watcher_recovers_from_lost_events_and_still_acts() {
    let (srv, vm, uuid) = setup(16 * GIB);
    let api = api(&srv);
    let mut w = CustomFieldWatcher::new();
    w.step(&api, Duration::ZERO).await.unwrap();
    srv.set_map_key(
        &vm,
        "other_config",
        &value_key(FIELD_SECONDARY),
        Some("host2"),
    );
    srv.set_map_key(&vm, "other_config", &value_key(FIELD_LEVEL), Some("1"));
    srv.drop_event_history();
    let a = next_actions(&mut w, &api).await;
    assert_eq!(
        a,
        vec![Action::Protected {
            vm: uuid,
            level: Level::Restart
        }]
    );
}

#[tokio::test]
async fn cli_protection_is_not_undone_by_a_watcher_starting_later() {
    let (srv, vm, _) = setup(16 * GIB);
    let api = api(&srv);
    xenft_xapi::ops::protect(&api, "web01", Level::Component, "host2")
        .await
        .unwrap();
    // Old-style protection without custom fields: the watcher must leave it alone.
    srv.set_map_key(&vm, "other_config", &value_key(FIELD_LEVEL), None);
    let mut w = CustomFieldWatcher::new();
    for _ in 0..3 {
        assert!(w
            .step(&api, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty());
    }
    assert_eq!(srv.map_field(&vm, "other_config")["xenft.level"], "2");
}

#[tokio::test]
async fn run_stops_on_shutdown() {
    let (srv, _, _) = setup(16 * GIB);
    let api = api(&srv);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = async { CustomFieldWatcher::new().run(&api, rx).await };
    let stop = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(true).unwrap();
    };
    tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(task, stop) })
        .await
        .expect("watcher stops promptly");
}

#[tokio::test]
async fn watcher_survives_session_expiry() {
    let (srv, vm, uuid) = setup(16 * GIB);
    let api = api(&srv);
    let mut w = CustomFieldWatcher::new();
    w.step(&api, Duration::ZERO).await.unwrap();
    srv.expire_sessions();
    srv.set_map_key(
        &vm,
        "other_config",
        &value_key(FIELD_SECONDARY),
        Some("host2"),
    );
    srv.set_map_key(&vm, "other_config", &value_key(FIELD_LEVEL), Some("2"));
    let a = next_actions(&mut w, &api).await;
    assert_eq!(
        a,
        vec![Action::Protected {
            vm: uuid,
            level: Level::Component
        }]
    );
    assert_eq!(srv.calls("session.login_with_password"), 2);
}

/// Found by the agent's level-change test: `xenft vm-protect` on a VM protected through the
/// fields writes the registry first and mirrors the new level into the field after; the
/// watcher, seeing the field still at the old level, protected the VM at it again.
#[tokio::test]
async fn a_level_changed_with_the_cli_is_not_undone_by_the_watcher() {
    let (srv, vm, _) = setup(16 * GIB);
    let api = api(&srv);
    let mut w = CustomFieldWatcher::new();
    w.step(&api, Duration::ZERO).await.unwrap();
    srv.set_map_key(
        &vm,
        "other_config",
        &value_key(FIELD_SECONDARY),
        Some("host2"),
    );
    srv.set_map_key(&vm, "other_config", &value_key(FIELD_LEVEL), Some("2"));
    assert_eq!(next_actions(&mut w, &api).await.len(), 1);

    // As the CLI's writes land one by one: the registry first, the field after.
    srv.set_map_key(&vm, "other_config", "xenft.level", Some("3"));
    let a = w.step(&api, Duration::from_millis(300)).await.unwrap();
    assert!(
        a.is_empty(),
        "acted on the CLI's half-written change: {a:?}"
    );
    xenft_xapi::ops::protect(&api, "web01", Level::System, "host2")
        .await
        .unwrap();
    for _ in 0..3 {
        let a = w.step(&api, Duration::from_millis(200)).await.unwrap();
        assert!(a.is_empty(), "{a:?}");
    }
    let oc = srv.map_field(&vm, "other_config");
    assert_eq!(oc["xenft.level"], "3");
    assert_eq!(oc[&value_key(FIELD_LEVEL)], "3");

    // A writer holding the pool's lock rewrites the field (a remove, then an add): the watcher
    // sees it absent for a moment, which is not an administrator clearing it.
    let writer = xenft_xapi::registry::with_pool_lock(&api, async || {
        srv.set_map_key(&vm, "other_config", &value_key(FIELD_LEVEL), None);
        tokio::time::sleep(Duration::from_millis(600)).await;
        srv.set_map_key(&vm, "other_config", &value_key(FIELD_LEVEL), Some("3"));
        Ok::<_, xenft_xapi::ops::OpError>(())
    });
    let watch = async {
        let mut acted = Vec::new();
        for _ in 0..4 {
            acted.extend(w.step(&api, Duration::from_millis(300)).await.unwrap());
        }
        acted
    };
    let (written, acted) = tokio::join!(writer, watch);
    written.unwrap();
    assert!(acted.is_empty(), "{acted:?}");
    assert_eq!(srv.map_field(&vm, "other_config")["xenft.level"], "3");

    // A level typed into the field afterwards still protects at it, on the same secondary.
    srv.set_map_key(&vm, "other_config", &value_key(FIELD_LEVEL), Some("1"));
    let a = next_actions(&mut w, &api).await;
    assert!(
        matches!(
            &a[..],
            [Action::Protected {
                level: Level::Restart,
                ..
            }]
        ),
        "{a:?}"
    );
    assert_eq!(srv.map_field(&vm, "other_config")["xenft.level"], "1");
}
