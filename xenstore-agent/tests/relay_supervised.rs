//! The relay and the disk of a protected VM as the agent plans them from xapi's device
//! records: the XenAPI test server holds a VM with a 24 MiB disk and a network interface;
//! `vm-protect level=2` alone, read by the registry follower, gives each host a
//! `xenft-blkback` sized from the VDI and a real `xenft-netback` on the VM's vif
//! (`vif<domid>.0`, pass-through where it runs, standby on the secondary). A killed relay is
//! restarted; when the VM restarts with a new domain id the relay follows its new vif name;
//! unprotect stops everything. Runs in a network namespace of its own (root).

use std::time::{Duration, Instant};

use xenft_agent::xapi::components::{plan, Change, HostFacts, ProcSpec, Supervisor, BACKOFF};
use xenft_agent::xapi::desired::Desired;
use xenft_agent::xapi::follower::{Follower, FollowerConfig};
use xenft_agent::xapi::relay_plan::{RelayFacts, DEFAULT_VIF_NAME};
use xenft_control::netback::{Counters, Mode, Reply, Request};
use xenft_control::{Client, Netback};
use xenft_tests::netns::Netns;
use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::registry::Level;
use xenft_xapi::transport::{Endpoint, TlsOptions};
use xenft_xapi::{ConnectOptions, Credentials, XenApi};

mod runtime_pool;
use runtime_pool::{blkback_binary, component_binary, host_facts, pool_init, wait_until};

const MIB: i64 = 1 << 20;

fn counters(sock: &std::path::Path) -> Option<Counters> {
    match Client::<Netback>::new(sock, Duration::from_secs(2)).call(&Request::Counters) {
        Ok(Reply::Counters { counters }) => Some(*counters),
        _ => None,
    }
}

/// Kills every process whose command line names `dir` (the components of a failed run).
struct KillUnder(std::path::PathBuf);

impl Drop for KillUnder {
    fn drop(&mut self) {
        let needle = self.0.as_os_str().as_encoded_bytes();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            if cmd.windows(needle.len()).any(|w| w == needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn arg<'a>(p: &'a [ProcSpec], name: &str, flag: &str) -> &'a str {
    let s = p
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} in the plan: {p:?}"));
    let i = s.args.iter().position(|a| a == flag).unwrap();
    &s.args[i + 1]
}

/// The follower's desired state once `ok` holds for it.
async fn desired_when(
    f: &Follower,
    what: &str,
    ok: impl Fn(&Desired) -> bool,
) -> std::sync::Arc<Desired> {
    let mut rx = f.desired();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(d) = rx.borrow_and_update().clone() {
            if ok(&d) {
                return d;
            }
        }
        let left = end.saturating_duration_since(Instant::now());
        assert!(
            tokio::time::timeout(left, rx.changed()).await.is_ok(),
            "timed out waiting for the registry to show {what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_and_the_disk_come_from_xapis_device_records() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it creates a network namespace with the relay's uplink"
    );
    let (blkback, netback) = (
        blkback_binary(),
        component_binary("xenft-netback", "xenft-netback"),
    );
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1_ref, h1) = srv.add_host("h1", "127.0.0.1", 16 << 30);
    let (_, h2) = srv.add_host("h2", "127.0.0.2", 16 << 30);
    let (vm_ref, vm_uuid) = srv.add_vm("web01", 1 << 30, Some(&h1_ref));
    srv.add_disk(&vm_ref, 0, 24 * MIB);
    srv.add_vif(&vm_ref, 0, "00:16:3E:12:34:56");
    let creds = Credentials {
        user: srv.user().into(),
        password: srv.password().into(),
    };
    let endpoint = Endpoint::parse(&srv.url()).unwrap();
    let api = XenApi::new(ConnectOptions::new(endpoint.clone(), creds.clone())).unwrap();
    let base = 20_000 + u16::try_from(std::process::id() % 20_000).unwrap();
    pool_init(
        &api,
        &[
            ("h1", &format!("127.0.0.1:{base}")),
            ("h2", &format!("127.0.0.2:{base}")),
        ],
    )
    .await;
    xenft_xapi::ops::protect(&api, "web01", Level::Component, "h2")
        .await
        .unwrap();
    let follower = Follower::start(FollowerConfig {
        endpoint,
        tls: TlsOptions::default(),
        credentials: creds,
        event_timeout: Duration::from_secs(5),
    });
    let d = desired_when(&follower, "web01 with its devices", |d| {
        d.vms
            .get(&vm_uuid)
            .is_some_and(|v| v.devices.disk.is_some() && !v.devices.vifs.is_empty())
    })
    .await;
    let domid = d.vms[&vm_uuid]
        .devices
        .domid
        .expect("a running VM has a domid");

    let dir = tempfile::tempdir().unwrap();
    let _kill = KillUnder(dir.path().to_path_buf());
    let facts = |me: &str| HostFacts {
        disk_size: None,
        relay: Some(RelayFacts {
            netback: netback.clone(),
            uplink: "up0".into(),
            vif_name: DEFAULT_VIF_NAME.into(),
        }),
        ..host_facts(dir.path(), me, &blkback)
    };
    let (p1, pr1) = plan(&d, &facts(&h1));
    let (p2, pr2) = plan(&d, &facts(&h2));
    assert!(pr1.is_empty() && pr2.is_empty(), "{pr1:?} {pr2:?}");
    // The mirror has the VDI's size; the relay the running domain's vif and the VIF's MAC.
    assert_eq!(arg(&p1, "blkback", "--size"), (24 * MIB).to_string());
    assert_eq!(arg(&p1, "netback", "--vif"), format!("vif{domid}.0"));
    assert_eq!(arg(&p1, "netback", "--mac"), "00:16:3e:12:34:56");
    assert_eq!(arg(&p2, "netback", "--mode"), "standby");

    // The components run in a namespace of the test's own, where the uplink exists.
    let ns = Netns::new().unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up0p"])
        .unwrap();
    ns.ip(&["link", "set", "up0p", "up"]).unwrap();
    ns.ip(&["link", "set", "up0", "up"]).unwrap();
    let sock1 = facts(&h1).run_dir.join(&vm_uuid).join("netback.sock");
    let sock2 = facts(&h2).run_dir.join(&vm_uuid).join("netback.sock");
    let (f1, f2) = (facts(&h1), facts(&h2));
    let sock1_again = sock1.clone();
    let (s1, s2, p1, p2) = ns
        .spawn(move || {
            let (mut s1, mut s2) = (Supervisor::new(f1.run_dir), Supervisor::new(f2.run_dir));
            let now = Instant::now();
            assert_eq!(s2.reconcile(&p2, now).len(), 2, "blkback and netback on h2");
            assert_eq!(s1.reconcile(&p1, now).len(), 2, "blkback and netback on h1");
            wait_until("both relays to answer", 20, || {
                counters(&sock1).is_some() && counters(&sock2).is_some()
            });
            assert_eq!(counters(&sock1).unwrap().mode, Mode::Passthrough);
            assert_eq!(counters(&sock2).unwrap().mode, Mode::Standby);

            // h1's relay is killed: restarted after the backoff, answering again.
            let pid = s1.pid(&p1[0].vm, "netback").unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            wait_until("the relay's exit to be seen", 5, || {
                s1.reconcile(&p1, Instant::now())
                    .iter()
                    .any(|c| matches!(c, Change::Exited { name, .. } if *name == "netback"))
            });
            std::thread::sleep(BACKOFF);
            let again = s1.reconcile(&p1, Instant::now());
            assert!(
                matches!(
                    &again[..],
                    [Change::Started {
                        name: "netback",
                        ..
                    }]
                ),
                "{again:?}"
            );
            wait_until("the restarted relay to answer", 20, || {
                counters(&sock1).is_some()
            });
            (s1, s2, p1, p2)
        })
        .unwrap()
        .join()
        .unwrap();

    // The VM restarts on h1 with a new domain: the relay follows its new vif name.
    api.call(
        "VM.hard_shutdown",
        vec![xenft_xapi::xmlrpc::Value::str(&vm_ref)],
    )
    .await
    .unwrap();
    api.vm_start_on(&vm_ref, &h1_ref, false).await.unwrap();
    let d = desired_when(&follower, "web01 with a new domain", |d| {
        d.vms[&vm_uuid].devices.domid.is_some_and(|id| id != domid)
    })
    .await;
    let new_domid = d.vms[&vm_uuid].devices.domid.unwrap();
    let (q1, _) = plan(&d, &facts(&h1));
    assert_eq!(arg(&q1, "netback", "--vif"), format!("vif{new_domid}.0"));
    assert_eq!(
        arg(&q1, "blkback", "--size"),
        arg(&p1, "blkback", "--size"),
        "the disk is unchanged"
    );
    ns.spawn(move || {
        let (mut s1, mut s2) = (s1, s2);
        let ch = s1.reconcile(&q1, Instant::now());
        assert!(
            ch.iter().any(|c| matches!(
                c,
                Change::Stopped {
                    name: "netback",
                    ..
                }
            )) && ch.iter().any(|c| matches!(
                c,
                Change::Started {
                    name: "netback",
                    ..
                }
            )) && !ch.iter().any(|c| matches!(
                c,
                Change::Stopped {
                    name: "blkback",
                    ..
                }
            )),
            "only the relay is replaced: {ch:?}"
        );
        wait_until("the new relay to answer", 20, || {
            counters(&sock1_again).is_some()
        });
        let _ = p2;
        // Unprotected: everything stops.
        assert_eq!(s1.reconcile(&[], Instant::now()).len(), 2);
        assert_eq!(s2.reconcile(&[], Instant::now()).len(), 2);
    })
    .unwrap()
    .join()
    .unwrap();
    follower.shutdown().await;
}
