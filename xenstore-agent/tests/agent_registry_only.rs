//! The `xenft-agent` program with host-local configuration only: no peers, no quorum servers,
//! no key, no VM in its file — just who it is, where xapi is, its credential file and its
//! directories. Two of them on loopback (h1 on 127.0.0.1, h2 on 127.0.0.2) against the XenAPI
//! test server: they learn the pool from `xenft pool-init`'s registry (A-links, management
//! addresses, the A-link key from the xapi secret), protect the VM `xenft vm-protect` names,
//! write its state back, and when h1's agent dies, h2's restarts the VM through XenAPI. A
//! change of the pool's membership in the registry makes the agent exit to be restarted with it.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::ops::{self, PoolInit};
use xenft_xapi::registry::Level;
use xenft_xapi::transport::Endpoint;
use xenft_xapi::{ConnectOptions, Credentials, XenApi};

const GIB: i64 = 1 << 30;
const KEY: &str = "a pool secret of enough length";

/// Agent processes, killed when the test ends however it ends.
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_udp(ip: &str) -> u16 {
    std::net::UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `xenft-agent` as host `name` with nothing but host-local facts in its config.
fn start_agent(dir: &Path, name: &str, url: &str, creds: &Path, mgmt_port: u16) -> Child {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).unwrap();
    let cfg = serde_json::json!({
        "host": name,
        "secret_file": home.join("pool-secret"),
        "state_file": home.join("state.json"),
        "status": {"listen": "127.0.0.1:0"},
        "xapi": {
            "url": url,
            "credential_file": creds,
            "event_timeout_ms": 2000,
            "mgmt_port": mgmt_port
        }
    });
    let path = home.join("agent.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let log = std::fs::File::create(home.join("agent.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xenft-agent"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    // It prints its status address once running: the registry has been read by then.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("status "),
        "{name} did not start: {line:?}; log:\n{}",
        std::fs::read_to_string(home.join("agent.log")).unwrap_or_default()
    );
    child
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pool_init(alink_port: u16, force: bool) -> PoolInit {
    PoolInit {
        alinks: [
            ("h1".to_string(), vec![format!("127.0.0.1:{alink_port}")]),
            ("h2".to_string(), vec![format!("127.0.0.2:{alink_port}")]),
        ]
        .into(),
        quorum_servers: vec![],
        secret_uuid: None,
        secret_value: Some(KEY.into()),
        policy: None,
        force,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_with_host_local_config_only_learn_the_pool_protect_and_restart_through_xapi() {
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1_ref, _) = srv.add_host("h1", "127.0.0.1", 16 * GIB);
    let (h2_ref, _) = srv.add_host("h2", "127.0.0.2", 16 * GIB);
    let (vm_ref, _) = srv.add_vm("web01", 2 * GIB, Some(&h1_ref));
    let api = XenApi::new(ConnectOptions::new(
        Endpoint::parse(&srv.url()).unwrap(),
        Credentials {
            user: srv.user().into(),
            password: srv.password().into(),
        },
    ))
    .unwrap();
    let alink_port = free_udp("127.0.0.1");
    ops::pool_init(&api, &pool_init(alink_port, false))
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let creds: PathBuf = dir.path().join("xapi-credentials");
    std::fs::write(&creds, format!("{}\n{}\n", srv.user(), srv.password())).unwrap();
    let mgmt = free_udp("127.0.0.1");
    let mut agents = Agents(vec![
        start_agent(dir.path(), "h1", &srv.url(), &creds, mgmt),
        start_agent(dir.path(), "h2", &srv.url(), &creds, mgmt),
    ]);
    // The A-link key came from the xapi secret, kept private.
    for h in ["h1", "h2"] {
        let f = dir.path().join(h).join("pool-secret");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), KEY);
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // `xenft vm-protect vm=web01 level=1 secondary=h2`: protected, as xapi shows.
    ops::protect(&api, "web01", Level::Restart, "h2")
        .await
        .unwrap();
    let state = || {
        srv.map_field(&vm_ref, "other_config")
            .get("xenft.state")
            .cloned()
            .unwrap_or_default()
    };
    wait_for("xenft.state = protected", 30, || state() == "protected").await;

    // h1's agent dies (its host with it, as far as h2 can tell): h2 restarts web01 on
    // itself through XenAPI.
    let _ = agents.0[0].kill();
    let _ = agents.0[0].wait();
    let resident = || {
        srv.record(&vm_ref).and_then(|r| {
            r.get("resident_on")
                .and_then(|v| v.as_str().map(str::to_string))
        })
    };
    wait_for("web01 restarted on h2", 30, || {
        resident().as_deref() == Some(h2_ref.as_str())
    })
    .await;

    // The roles swapped in the registry: the copy is on h1 now, and the VM stays protected
    // (not refused as "running on its own secondary", not unprotected mid take-over).
    let h1_uuid = srv
        .record(&h1_ref)
        .and_then(|r| r.get("uuid").and_then(|v| v.as_str().map(str::to_string)))
        .unwrap();
    wait_for("xenft.secondary = h1", 10, || {
        srv.map_field(&vm_ref, "other_config")
            .get("xenft.secondary")
            .is_some_and(|s| *s == h1_uuid)
    })
    .await;
    let reported = Instant::now() + Duration::from_secs(10);
    while !state().contains("failed over to h2") {
        assert!(
            Instant::now() < reported,
            "h2 does not report the take-over: xenft.state = {:?}; h2's log:\n{}",
            state(),
            std::fs::read_to_string(dir.path().join("h2/agent.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log2 = std::fs::read_to_string(dir.path().join("h2/agent.log")).unwrap();
    // (The registry may show the VM refused for the instant `xenft.secondary` is rewritten,
    // a remove then an add: the agent holds its protection through it.)
    assert!(!log2.contains("input=Unprotect"), "{log2}");

    // The pool's membership changes (h2's A-link moves): h2's agent exits with 75 for its
    // service manager to start it again with the new membership.
    ops::pool_init(&api, &pool_init(free_udp("127.0.0.1"), true))
        .await
        .unwrap();
    let h2 = &mut agents.0[1];
    wait_for("h2's agent to exit for a restart", 20, || {
        matches!(h2.try_wait(), Ok(Some(_)))
    })
    .await;
    let st = h2.wait().unwrap();
    assert_eq!(st.code(), Some(75), "{st:?}");
    let log = std::fs::read_to_string(dir.path().join("h2/agent.log")).unwrap();
    assert!(log.contains("membership changed"), "{log}");
}
