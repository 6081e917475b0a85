//! Domains run by the agent from its host-wide command template (`"domains": {"command":
//! ...}`, xl hosts whose registry is a XenAPI server), against the XenAPI test server: a
//! take-over runs the template filled from the registry and records the VM on this host in
//! xapi (roles swapped), once however often the core retries; a restarted agent adopts the
//! VM's process; fencing signals it; destroy runs the destroy command; a hostile VM name
//! records nothing and starts nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use xenft_agent::drivers::AfterResume;
use xenft_agent::ids::{HostId, VmId};
use xenft_agent::seams::DomainStarter;
use xenft_agent::xapi::desired::Desired;
use xenft_agent::xapi::domain::XapiDomain;
use xenft_agent::xapi::domain_command::{DomainCommands, RegistryCommandDomain};
use xenft_agent::xapi::follower::{Follower, FollowerConfig};
use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::transport::{Endpoint, TlsOptions};
use xenft_xapi::{ConnectOptions, Credentials, XenApi};

mod runtime_pool;

const GIB: i64 = 1 << 30;

fn follower(srv: &FakeXapi) -> Follower {
    Follower::start(FollowerConfig {
        endpoint: Endpoint::parse(&srv.url()).unwrap(),
        tls: TlsOptions::default(),
        credentials: Credentials {
            user: srv.user().into(),
            password: srv.password().into(),
        },
        event_timeout: Duration::from_secs(5),
    })
}

async fn wait_for(f: &Follower, what: &str, ok: impl Fn(&Desired) -> bool) {
    let mut rx = f.desired();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if rx.borrow().as_deref().is_some_and(&ok) {
            return;
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

/// `/proc/<pid>/stat`'s state letter.
fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].chars().next()
}

/// Whether the process's state satisfies `ok` within 2 s (a signal lands asynchronously).
fn state_becomes(pid: u32, ok: impl Fn(Option<char>) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if ok(proc_state(pid)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn sh(script: &str) -> Vec<String> {
    ["/bin/sh", "-c", script, "vm"]
        .iter()
        .map(|s| (*s).to_string())
        .collect()
}

/// Runs a blocking seam call off the runtime, as the agent's core does.
async fn seam<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_runs_the_template_and_records_the_vm_here_once() {
    let dir = tempfile::tempdir().unwrap();
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, h1_uuid) = srv.add_host("h1", "10.0.0.1", 16 * GIB);
    let (h2, h2_uuid) = srv.add_host("h2", "10.0.0.2", 16 * GIB);
    let (vm, vm_uuid) = srv.add_vm("web01", GIB, Some(&h1));
    srv.add_vif(&vm, 0, "00:16:3e:00:99:11");
    let (bad, bad_uuid) = srv.add_vm("-rf", GIB, Some(&h1));
    for v in [&vm, &bad] {
        srv.set_map_key(v, "other_config", "xenft.level", Some("2"));
        srv.set_map_key(v, "other_config", "xenft.secondary", Some(&h2_uuid));
    }
    let admin = XenApi::new(ConnectOptions::new(
        Endpoint::parse(&srv.url()).unwrap(),
        Credentials {
            user: srv.user().into(),
            password: srv.password().into(),
        },
    ))
    .unwrap();
    runtime_pool::pool_init(&admin, &[("h1", "10.0.0.1:7500"), ("h2", "10.0.0.2:7500")]).await;
    let f = follower(&srv);
    wait_for(&f, "both VMs", |d| {
        d.vms.contains_key(&vm_uuid) && d.vms.contains_key(&bad_uuid)
    })
    .await;
    let (args_file, destroyed) = (dir.path().join("args"), dir.path().join("destroyed"));
    let commands = DomainCommands {
        start: sh(&format!(
            "echo \"$@\" > {}; exec sleep 600",
            args_file.display()
        ))
        .into_iter()
        .chain(["{name}", "{mac}", "{nbd}", "{memory_mib}"].map(String::from))
        .collect(),
        pause: None,
        resume: None,
        destroy: Some(sh(&format!("echo {{name}} >> {}", destroyed.display()))),
        after_resume: AfterResume::Nothing,
    };
    commands.check(true).unwrap();
    let state = dir.path().join("domains");
    std::fs::create_dir_all(&state).unwrap();
    let domains = |host: &str| {
        RegistryCommandDomain::new(
            commands.clone(),
            Some("/run/xenft".into()),
            f.desired(),
            XapiDomain::new(
                f.api(),
                f.desired(),
                HostId::new(host).unwrap(),
                tokio::runtime::Handle::current(),
            ),
            Some(state.clone()),
        )
    };
    let field = |name: &str| {
        srv.record(&vm)
            .and_then(|r| r.get(name).and_then(|v| v.as_str().map(str::to_string)))
            .unwrap_or_default()
    };
    let id = VmId::new(vm_uuid.as_str()).unwrap();

    // h1 is gone: h2 takes web01 over — twice, as a core retrying would.
    let d = Arc::new(domains("h2"));
    for _ in 0..2 {
        let (d2, i) = (d.clone(), id.clone());
        seam(move || d2.start(&i)).await.unwrap();
    }
    assert_eq!(
        (field("power_state"), field("resident_on")),
        ("Running".into(), h2.clone()),
        "xapi records web01 on h2"
    );
    assert_eq!(
        srv.map_field(&vm, "other_config")["xenft.secondary"],
        h1_uuid,
        "the roles swapped: the copy is on the old primary"
    );
    assert_eq!(srv.calls("VM.start_on"), 1, "recorded once");
    assert_eq!(srv.calls("VM.power_state_reset"), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !args_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::read_to_string(&args_file).unwrap().trim(),
        format!("web01 00:16:3e:00:99:11 /run/xenft/{vm_uuid}/nbd.sock 1024"),
        "the template filled from the registry, one process"
    );
    assert_eq!(d.running(), vec![id.clone()]);

    // A restarted agent adopts the VM's process.
    drop(d);
    let d = Arc::new(domains("h2"));
    assert_eq!(d.running(), vec![id.clone()], "adopted after a restart");
    let pid: u32 = std::fs::read_to_string(state.join(format!("{vm_uuid}.pid")))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // Fencing without pause/resume commands stops and continues the VM's process.
    let (d2, i) = (d.clone(), id.clone());
    seam(move || d2.pause(&i)).await.unwrap();
    assert!(
        state_becomes(pid, |s| s == Some('T')),
        "not paused: {:?}",
        proc_state(pid)
    );
    let (d2, i) = (d.clone(), id.clone());
    seam(move || d2.resume(&i)).await.unwrap();
    assert!(state_becomes(pid, |s| s != Some('T')), "not resumed");

    // Destroy runs the destroy command and ends the process.
    let (d2, i) = (d.clone(), id.clone());
    seam(move || d2.destroy(&i)).await.unwrap();
    assert_eq!(std::fs::read_to_string(&destroyed).unwrap().trim(), "web01");
    assert!(d.running().is_empty());
    assert!(
        state_becomes(pid, |s| matches!(s, None | Some('Z'))),
        "the VM's process still runs"
    );

    // A name that would read as an option: nothing recorded, nothing started, the reason.
    let bad_id = VmId::new(bad_uuid.as_str()).unwrap();
    let (d2, i) = (d.clone(), bad_id.clone());
    let e = seam(move || d2.start(&i)).await.unwrap_err();
    assert!(e.reason.contains("starts with '-'"), "{e:?}");
    assert_eq!(srv.calls("VM.start_on"), 1, "nothing recorded for -rf");
    assert!(!d.running().contains(&bad_id));

    // A start command that fails at once did not start the domain: the start fails, with why.
    let failing = DomainCommands {
        start: sh("exit 3"),
        ..commands.clone()
    };
    let d = Arc::new(RegistryCommandDomain::new(
        failing,
        None,
        f.desired(),
        XapiDomain::new(
            f.api(),
            f.desired(),
            HostId::new("h2").unwrap(),
            tokio::runtime::Handle::current(),
        ),
        None,
    ));
    let (d2, i) = (d.clone(), id.clone());
    let e = seam(move || d2.start(&i)).await.unwrap_err();
    assert!(e.reason.contains("exited with"), "{e:?}");
    assert!(d.running().is_empty());
    f.shutdown().await;
}
