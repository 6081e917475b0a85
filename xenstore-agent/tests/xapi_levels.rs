//! A running VM's level changed through the registry, end to end in process: two real agents
//! (UDP heartbeats on loopback, a quorum server) with recording components, each following
//! the pool's registry in the XenAPI test server. `xenft vm-protect` is run on web01 with level
//! 1, then 2, then 3, then 1 again: each raise goes `syncing` (the disk copied in full from
//! level 1, then dirty regions and the memory stream toward level 3) and `protected` once that
//! sync finished; the lowering to level 1 is `protected` at once and stops the disk mirror;
//! the VM itself is never paused, destroyed or started.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use xenft_agent::ids::{HostId, VmId};
use xenft_agent::lifecycle::{Level as CoreLevel, Phase, VmRecord};
use xenft_agent::runtime::Agent;
use xenft_agent::seams::{Checkpointer, DiskMirror, Recorder, SeamError, Seams};
use xenft_agent::status::StatusHub;
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

/// The disk mirror and checkpoint engine of the primary: every sync waits until the test lets
/// it finish (so that `syncing` can be seen), then is recorded by the recorder; `protect`
/// (the memory stream toward the peer) is recorded here.
struct Gated {
    rec: Arc<Recorder>,
    permits: Mutex<u32>,
    cv: Condvar,
    memory: Mutex<Vec<String>>,
}

impl Gated {
    fn new(rec: &Arc<Recorder>) -> Arc<Self> {
        Arc::new(Self {
            rec: Arc::clone(rec),
            permits: Mutex::new(0),
            cv: Condvar::new(),
            memory: Mutex::new(Vec::new()),
        })
    }

    /// Lets one sync finish.
    fn release_one(&self) {
        *self.permits.lock().unwrap() += 1;
        self.cv.notify_all();
    }

    fn memory_calls(&self) -> Vec<String> {
        self.memory.lock().unwrap().clone()
    }
}

impl DiskMirror for Gated {
    fn sync(&self, vm: &VmId, peer: &HostId, full: bool) -> Result<(), SeamError> {
        let fail = |reason: &str| SeamError {
            component: "gated",
            operation: "sync",
            vm: vm.clone(),
            reason: reason.into(),
        };
        let held = self.permits.lock().map_err(|_| fail("poisoned"))?;
        let (mut held, timeout) = self
            .cv
            .wait_timeout_while(held, Duration::from_secs(30), |p| *p == 0)
            .map_err(|_| fail("poisoned"))?;
        if timeout.timed_out() {
            return Err(fail("the test never let it finish"));
        }
        *held -= 1;
        drop(held);
        self.rec.sync(vm, peer, full)
    }
    fn suspend(&self, vm: &VmId) -> Result<(), SeamError> {
        DiskMirror::suspend(&*self.rec, vm)
    }
    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        DiskMirror::redirect(&*self.rec, vm, on)
    }
    fn promote(&self, vm: &VmId, commit_epoch: Option<u64>) -> Result<(), SeamError> {
        self.rec.promote(vm, commit_epoch)
    }
}

impl Checkpointer for Gated {
    fn committed_epoch(&self, vm: &VmId) -> Result<Option<u64>, SeamError> {
        self.rec.committed_epoch(vm)
    }
    fn resume_last_epoch(&self, vm: &VmId) -> Result<(), SeamError> {
        self.rec.resume_last_epoch(vm)
    }
    fn protect(&self, vm: &VmId, peer: &HostId) -> Result<(), SeamError> {
        if let Ok(mut m) = self.memory.lock() {
            m.push(format!("protect {vm} {peer}"));
        }
        Ok(())
    }
}

fn record(hub: &StatusHub, vm: &str) -> Option<VmRecord> {
    hub.snapshot()
        .vms
        .into_iter()
        .find(|v| v.record.vm.as_str() == vm)
        .map(|v| v.record)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn level_1_then_2_then_3_then_1_on_the_running_vm() {
    // Arrange: the pool's xapi (web01 running on h1), two agents following it.
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1_ref, _) = srv.add_host("h1", "10.0.0.1", 16 * GIB);
    srv.add_host("h2", "10.0.0.2", 16 * GIB);
    let (vm_ref, uuid) = srv.add_vm("web01", 2 * GIB, Some(&h1_ref));
    let creds = Credentials {
        user: srv.user().into(),
        password: srv.password().into(),
    };
    let endpoint = Endpoint::parse(&srv.url()).unwrap();
    let api = XenApi::new(ConnectOptions::new(endpoint.clone(), creds.clone())).unwrap();
    pool_init(&api, &[("h1", "10.0.0.1:7500"), ("h2", "10.0.0.2:7500")]).await;
    let q = start_quorum().await;
    let pool = Pool::new(q.addr());
    let (mut recorders, mut agents, mut planes, mut gates) = (vec![], vec![], vec![], vec![]);
    for i in 0..2 {
        let r = Recorder::new();
        let gate = Gated::new(&r);
        let mut seams = Seams::recording(&r);
        seams.disk = gate.clone();
        seams.checkpoint = gate.clone();
        let a = Agent::start(pool.config_with(i, vec![]).validate().unwrap(), seams)
            .await
            .unwrap();
        planes.push(Plane::start(
            FollowerConfig {
                endpoint: endpoint.clone(),
                tls: TlsOptions::default(),
                credentials: creds.clone(),
                event_timeout: Duration::from_secs(5),
            },
            host(&format!("h{}", i + 1)),
            a.inputs(),
            a.hub(),
        ));
        recorders.push(r);
        agents.push(a);
        gates.push(gate);
    }
    let (h1, h2) = (agents[0].hub(), agents[1].hub());
    let (r1, gate) = (&recorders[0], &gates[0]);
    let state = || {
        srv.map_field(&vm_ref, "other_config")
            .get("xenft.state")
            .cloned()
            .unwrap_or_default()
    };
    let at = |hub: &StatusHub, level: CoreLevel| {
        record(hub, &uuid).is_some_and(|r| {
            r.level == level && r.raising_to.is_none() && r.phase == Phase::Protected
        })
    };
    let syncs = || {
        r1.calls()
            .into_iter()
            .filter(|c| c.starts_with("sync "))
            .collect::<Vec<_>>()
    };

    // Level 1: protected as soon as h2 is heard, nothing to sync.
    ops::protect(&api, "web01", Level::Restart, "h2")
        .await
        .unwrap();
    wait_for("protected at level 1", Duration::from_secs(15), || {
        at(&h1, CoreLevel::L1) && at(&h2, CoreLevel::L1) && state() == "protected"
    })
    .await;
    assert!(syncs().is_empty(), "{:?}", r1.calls());

    // 1 → 2: syncing (the whole disk toward h2), protected at level 1 meanwhile.
    ops::protect(&api, "web01", Level::Component, "h2")
        .await
        .unwrap();
    wait_for("syncing toward level 2", Duration::from_secs(15), || {
        state().starts_with("syncing")
            && record(&h2, &uuid).is_some_and(|r| r.raising_to == Some(CoreLevel::L2))
    })
    .await;
    let r = record(&h1, &uuid).unwrap();
    assert_eq!(
        (r.level, r.raising_to, r.phase),
        (CoreLevel::L1, Some(CoreLevel::L2), Phase::Syncing)
    );
    gate.release_one();
    wait_for("protected at level 2", Duration::from_secs(15), || {
        at(&h1, CoreLevel::L2) && at(&h2, CoreLevel::L2) && state() == "protected"
    })
    .await;
    assert_eq!(syncs(), vec![format!("sync {uuid} h2 full")]);

    // 2 → 3: syncing (dirty regions, then memory), protected at level 2 meanwhile.
    ops::protect(&api, "web01", Level::System, "h2")
        .await
        .unwrap();
    wait_for("syncing toward level 3", Duration::from_secs(15), || {
        state().starts_with("syncing")
            && record(&h2, &uuid).is_some_and(|r| r.raising_to == Some(CoreLevel::L3))
    })
    .await;
    let r = record(&h1, &uuid).unwrap();
    assert_eq!((r.level, r.phase), (CoreLevel::L2, Phase::Syncing));
    // The secondary's mirrored disk still counts: a take-over now would be a level-2 one.
    assert!(record(&h2, &uuid).unwrap().consistent);
    gate.release_one();
    wait_for("protected at level 3", Duration::from_secs(15), || {
        at(&h1, CoreLevel::L3) && at(&h2, CoreLevel::L3) && state() == "protected"
    })
    .await;
    assert_eq!(
        syncs(),
        vec![
            format!("sync {uuid} h2 full"),
            format!("sync {uuid} h2 dirty")
        ]
    );
    assert!(gate.memory_calls().contains(&format!("protect {uuid} h2")));

    // 3 → 1: protected at level 1 at once, the disk mirror stops, no sync.
    let suspends = || {
        r1.calls()
            .iter()
            .filter(|c| **c == format!("suspend {uuid}"))
            .count()
    };
    let suspended_before = suspends();
    ops::protect(&api, "web01", Level::Restart, "h2")
        .await
        .unwrap();
    wait_for(
        "protected at level 1 again",
        Duration::from_secs(15),
        || at(&h1, CoreLevel::L1) && at(&h2, CoreLevel::L1),
    )
    .await;
    assert_eq!(suspends(), suspended_before + 1, "{:?}", r1.calls());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(state(), "protected");
    assert_eq!(syncs().len(), 2, "{:?}", r1.calls());

    // The running VM was never touched, on either host.
    for (i, r) in recorders.iter().enumerate() {
        for c in r.calls() {
            assert!(
                !(c.starts_with("pause ")
                    || c.starts_with("destroy ")
                    || c.starts_with("start ")
                    || c.starts_with("resume-epoch ")
                    || c.starts_with("promote ")),
                "h{} touched the VM: {c}",
                i + 1
            );
        }
    }
    shutdown_all(planes, agents).await;
}
