//! The control plane end to end, in process: two real agents (UDP heartbeats on loopback, a
//! quorum server, recording components) configured with no VM at all, each following the
//! pool's registry in the XenAPI test server. `xenft vm-protect` (the CLI's operation) is all
//! it takes: both agents protect the VM, and its state goes back into xapi, where `xenft
//! vm-status` reads it; `vm-unprotect` ends it.

use std::sync::Arc;
use std::time::Duration;

use xenft_agent::lifecycle::Phase;
use xenft_agent::runtime::Agent;
use xenft_agent::seams::{Recorder, Seams};
use xenft_agent::xapi::follower::FollowerConfig;
use xenft_agent::xapi::plane::Plane;
use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::ops;
use xenft_xapi::registry::Level;
use xenft_xapi::transport::{Endpoint, TlsOptions};
use xenft_xapi::{ConnectOptions, Credentials, XenApi};

mod runtime_pool;
use runtime_pool::{host, pool_init, shutdown_all, start_quorum, wait_for, Pool};

const GIB: i64 = 1 << 30;

/// The pool's xapi: hosts named as the agents are (h1, h2), web01 running on h1, and an
/// administrator's client.
struct Xapi {
    srv: FakeXapi,
    vm_ref: String,
    vm_uuid: String,
    creds: Credentials,
    endpoint: Endpoint,
    api: XenApi,
}

fn xapi() -> Xapi {
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1_ref, _) = srv.add_host("h1", "10.0.0.1", 16 * GIB);
    srv.add_host("h2", "10.0.0.2", 16 * GIB);
    let (vm_ref, vm_uuid) = srv.add_vm("web01", 2 * GIB, Some(&h1_ref));
    let creds = Credentials {
        user: srv.user().into(),
        password: srv.password().into(),
    };
    let endpoint = Endpoint::parse(&srv.url()).unwrap();
    let api = XenApi::new(ConnectOptions::new(endpoint.clone(), creds.clone())).unwrap();
    Xapi {
        srv,
        vm_ref,
        vm_uuid,
        creds,
        endpoint,
        api,
    }
}

/// How the agents' followers reach the test server.
fn follower_config(endpoint: &Endpoint, creds: &Credentials) -> FollowerConfig {
    FollowerConfig {
        endpoint: endpoint.clone(),
        tls: TlsOptions::default(),
        credentials: creds.clone(),
        event_timeout: Duration::from_secs(5),
    }
}

/// Two agents h1 and h2 with host-local configuration only (no VM in their config files) and
/// recording components, each with its control plane on the test server.
async fn recording_pair(
    pool: &Pool,
    endpoint: &Endpoint,
    creds: &Credentials,
) -> (Vec<Arc<Recorder>>, Vec<Agent>, Vec<Plane>) {
    let (mut recorders, mut agents, mut planes) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..2 {
        let r = Recorder::new();
        let a = Agent::start(
            pool.config_with(i, vec![]).validate().unwrap(),
            Seams::recording(&r),
        )
        .await
        .unwrap();
        planes.push(Plane::start(
            follower_config(endpoint, creds),
            host(&format!("h{}", i + 1)),
            a.inputs(),
            a.hub(),
        ));
        recorders.push(r);
        agents.push(a);
    }
    (recorders, agents, planes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_protect_through_xenapi_is_all_it_takes_and_the_state_comes_back() {
    let Xapi {
        srv,
        vm_ref,
        vm_uuid,
        creds,
        endpoint,
        api,
    } = xapi();
    pool_init(&api, &[("h1", "10.0.0.1:7500"), ("h2", "10.0.0.2:7500")]).await;

    let q = start_quorum().await;
    let pool = Pool::new(q.addr());
    let (recorders, agents, planes) = recording_pair(&pool, &endpoint, &creds).await;
    let r1 = &recorders[0];

    // Act: `xenft vm-protect vm=web01 level=2 secondary=h2`.
    ops::protect(&api, "web01", Level::Component, "h2")
        .await
        .unwrap();

    // Both agents protect it; the primary synced the disk toward h2.
    let (h1, h2) = (agents[0].hub(), agents[1].hub());
    let phase_of = |hub: &Arc<xenft_agent::status::StatusHub>| {
        hub.snapshot()
            .vms
            .iter()
            .find(|v| v.record.vm.as_str() == vm_uuid)
            .map(|v| v.record.phase)
    };
    wait_for(
        "protection from the registry",
        Duration::from_secs(15),
        || phase_of(&h1) == Some(Phase::Protected) && phase_of(&h2) == Some(Phase::Protected),
    )
    .await;
    assert!(
        r1.calls()
            .iter()
            .any(|c| c.starts_with(&format!("sync {vm_uuid} h2"))),
        "{:?}",
        r1.calls()
    );

    // The state is back in xapi, as `xenft vm-status` shows it.
    wait_for("xenft.state = protected", Duration::from_secs(10), || {
        srv.map_field(&vm_ref, "other_config")
            .get("xenft.state")
            .is_some_and(|s| s == "protected")
    })
    .await;
    let st = ops::status(&api, "web01").await.unwrap();
    assert_eq!(st.state.as_deref(), Some("protected"));

    // `xenft vm-unprotect`: both agents let go of it; the VM keeps running. (What happened
    // before it — a fence and its end, on a machine loaded enough to delay a lease — is not
    // the unprotect's doing: only the calls from here on count.)
    let before = r1.calls().len();
    ops::unprotect(&api, "web01").await.unwrap();
    wait_for("unprotection", Duration::from_secs(10), || {
        phase_of(&h1).is_none() && phase_of(&h2).is_none()
    })
    .await;
    for c in r1.calls().iter().skip(before) {
        assert!(
            !(c.starts_with("destroy ") || c.starts_with("pause ")),
            "unprotect must not stop the VM: {c}"
        );
    }
    shutdown_all(planes, agents).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_start_the_vms_mirrored_disk_themselves_from_the_registry() {
    use xenft_agent::drivers::{supervised_disks, Convention};
    use xenft_agent::xapi::components::{HostFacts, Supervisor};
    use xenft_agent::xapi::follower::Follower;
    use xenft_agent::xapi::plane::Components;

    let blkback = runtime_pool::blkback_binary();
    let Xapi {
        srv,
        vm_ref,
        vm_uuid,
        creds,
        endpoint,
        api,
    } = xapi();
    let port = 21_000 + u16::try_from(std::process::id() % 20_000).unwrap();
    pool_init(
        &api,
        &[
            ("h1", &format!("127.0.0.1:{port}")),
            ("h2", &format!("127.0.0.2:{port}")),
        ],
    )
    .await;

    let q = start_quorum().await;
    let pool = Pool::new(q.addr());
    let secret = pool.dir.path().join("secret");
    let mut agents = Vec::new();
    let mut planes = Vec::new();
    for i in 0..2 {
        let run_dir = pool.dir.path().join(format!("run-h{}", i + 1));
        let disk_dir = pool.dir.path().join(format!("disks-h{}", i + 1));
        std::fs::create_dir_all(&disk_dir).unwrap();
        let mut seams = Seams::recording(&Recorder::new());
        seams.disk = supervised_disks(Convention {
            run_dir: run_dir.clone(),
            request_timeout: Duration::from_secs(5),
            sync_timeout: Duration::from_secs(60),
        });
        let a = Agent::start(pool.config_with(i, vec![]).validate().unwrap(), seams)
            .await
            .unwrap();
        let follower = Follower::start(follower_config(&endpoint, &creds));
        let components = Components {
            facts: HostFacts {
                me: String::new(),
                run_dir: run_dir.clone(),
                disk_dir,
                sr_run_dir: pool.dir.path().join(format!("sr-run-h{}", i + 1)),
                blkback: blkback.clone(),
                secret_file: secret.clone(),
                disk_size: Some(16 << 20),
                relay: None,
                engine: None,
                alink_path_timeout_ms: None,
            },
            supervisor: Supervisor::new(run_dir),
        };
        planes.push(Plane::with_follower(
            follower,
            host(&format!("h{}", i + 1)),
            a.inputs(),
            a.hub(),
            Some(components),
        ));
        agents.push(a);
    }

    // `xenft vm-protect vm=web01 level=2 secondary=h2`: nothing else.
    ops::protect(&api, "web01", Level::Component, "h2")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while srv
        .map_field(&vm_ref, "other_config")
        .get("xenft.state")
        .is_none_or(|s| s != "protected")
    {
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = ["h1", "h2"]
                .iter()
                .map(|h| {
                    let p = pool
                        .dir
                        .path()
                        .join(format!("run-{h}/{vm_uuid}/blkback.log"));
                    format!("{h}: {}", std::fs::read_to_string(p).unwrap_or_default())
                })
                .collect();
            panic!(
                "xenft.state never became protected: {:?}\nagents: {:?}\n{}",
                srv.map_field(&vm_ref, "other_config").get("xenft.state"),
                agents
                    .iter()
                    .map(|a| a.hub().snapshot().vms)
                    .collect::<Vec<_>>(),
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The primary's blkback (started by h1's agent) reports its copy in sync with h2's.
    let ctl = pool
        .dir
        .path()
        .join(format!("run-h1/{vm_uuid}/blkback.sock"));
    let st = tokio::task::spawn_blocking(move || xenft_tests::components::blkback_status(&ctl))
        .await
        .unwrap()
        .expect("h1's blkback answers");
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["primary"]["peer"], "in_sync", "{st}");

    // A take-over's window: xapi shows the VM halted between `VM.power_state_reset` and
    // `VM.start_on` (slow on a loaded host). The mirror the VM is being started on stays:
    // no component is stopped or restarted meanwhile, nor when the VM runs again.
    let pids = || {
        ["h1", "h2"].map(|h| {
            std::fs::read_to_string(
                pool.dir
                    .path()
                    .join(format!("run-{h}/{vm_uuid}/blkback.pid")),
            )
            .unwrap_or_default()
        })
    };
    let before = pids();
    assert!(before.iter().all(|p| !p.is_empty()), "{before:?}");
    let h1_ref = srv.record(&vm_ref).unwrap()["resident_on"]
        .as_str()
        .unwrap()
        .to_string();
    api.call(
        "VM.power_state_reset",
        vec![xenft_xapi::xmlrpc::Value::str(&vm_ref)],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        pids(),
        before,
        "a component stopped while the VM was halted"
    );
    api.vm_start_on(&vm_ref, &h1_ref, false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        pids(),
        before,
        "a component restarted when the VM ran again"
    );

    // Unprotect: the components go, the VM stays.
    ops::unprotect(&api, "web01").await.unwrap();
    let pidfile = pool
        .dir
        .path()
        .join(format!("run-h2/{vm_uuid}/blkback.pid"));
    wait_for(
        "the secondary's blkback stopped",
        Duration::from_secs(20),
        || !pidfile.exists(),
    )
    .await;
    shutdown_all(planes, agents).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_level_typed_into_the_xencenter_field_alone_protects_the_vm() {
    use xenft_xapi::customfields::{value_key, FIELD_LEVEL, FIELD_SECONDARY};
    let Xapi {
        srv,
        vm_ref,
        vm_uuid,
        creds,
        endpoint,
        api,
    } = xapi();
    pool_init(&api, &[("h1", "10.0.0.1:7500"), ("h2", "10.0.0.2:7500")]).await;
    let q = start_quorum().await;
    let pool = Pool::new(q.addr());
    let (_recorders, agents, planes) = recording_pair(&pool, &endpoint, &creds).await;
    // As XenCenter does: the secondary field, then the level.
    srv.set_map_key(
        &vm_ref,
        "other_config",
        &value_key(FIELD_SECONDARY),
        Some("h2"),
    );
    srv.set_map_key(&vm_ref, "other_config", &value_key(FIELD_LEVEL), Some("2"));
    wait_for(
        "protection from the custom field",
        Duration::from_secs(20),
        || {
            agents.iter().all(|a| {
                a.hub()
                    .snapshot()
                    .vms
                    .iter()
                    .any(|v| v.record.vm.as_str() == vm_uuid && v.record.phase == Phase::Protected)
            })
        },
    )
    .await;
    assert_eq!(
        srv.map_field(&vm_ref, "other_config")
            .get("xenft.level")
            .map(String::as_str),
        Some("2")
    );
    // Clearing the field unprotects.
    srv.set_map_key(&vm_ref, "other_config", &value_key(FIELD_LEVEL), Some(""));
    wait_for(
        "unprotection from the custom field",
        Duration::from_secs(20),
        || agents.iter().all(|a| a.hub().snapshot().vms.is_empty()),
    )
    .await;
    shutdown_all(planes, agents).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_started_on_the_secondary_is_reported_as_eating_the_reserved_capacity() {
    let Xapi {
        srv,
        vm_ref,
        creds,
        endpoint,
        api,
        ..
    } = xapi();
    pool_init(&api, &[("h1", "10.0.0.1:7500"), ("h2", "10.0.0.2:7500")]).await;
    let q = start_quorum().await;
    let pool = Pool::new(q.addr());
    let (_recorders, agents, planes) = recording_pair(&pool, &endpoint, &creds).await;
    let state = || {
        srv.map_field(&vm_ref, "other_config")
            .get("xenft.state")
            .cloned()
            .unwrap_or_default()
    };

    // web01 (2 GiB) restarts on h2 (16 GiB) if h1 fails: protected.
    ops::protect(&api, "web01", Level::Restart, "h2")
        .await
        .unwrap();
    wait_for("xenft.state = protected", Duration::from_secs(15), || {
        state() == "protected"
    })
    .await;

    // Another VM starts on h2 and leaves 1 GiB: web01 could no longer restart there.
    let h2_ref = api
        .call(
            "host.get_by_name_label",
            vec![xenft_xapi::xmlrpc::Value::str("h2")],
        )
        .await
        .unwrap()
        .as_array()
        .and_then(|a| a.first().and_then(|v| v.as_str().map(str::to_string)))
        .unwrap();
    let (big, _) = srv.add_vm("big", 15 * GIB, Some(&h2_ref));
    wait_for(
        "xenft.state = degraded (reservation)",
        Duration::from_secs(10),
        || state().starts_with("degraded: reservation short: h2 has 1.0 GiB free"),
    )
    .await;
    assert!(state().contains("needs 2.0 GiB"), "{}", state());

    // It stops: the reservation holds again.
    srv.destroy(&big);
    wait_for(
        "xenft.state = protected again",
        Duration::from_secs(10),
        || state() == "protected",
    )
    .await;
    shutdown_all(planes, agents).await;
}
