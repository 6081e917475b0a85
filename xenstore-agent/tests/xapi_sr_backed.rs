//! A VM whose disk is on the xenft SR gets no second mirror: two agents following the XenAPI
//! test server, whose VM web01 has its disk on an SR of type `xenft`. The SR's own mirrored
//! pair of `xenft-blkback`s for that volume runs where the SR runs them
//! (`<SR run_dir>/<sr uuid>/<VDI location>/ctl.sock`, started here as the SR's
//! `Datapath.activate` / `Peer.standby` start them); `xenft vm-protect level=2` is all the
//! rest. The agents start no blkback of their own, drive the SR's through the disk seam
//! (`xenft.state` becomes `protected` once that pair is in sync); when h1 dies, h2's agent
//! promotes the SR's copy through its seam; unprotecting drops the seam's link and leaves the
//! SR's blkback running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use xenft_agent::drivers::{supervised_disks, Convention};
use xenft_agent::runtime::Agent;
use xenft_agent::seams::{Recorder, Seams};
use xenft_agent::xapi::components::{HostFacts, Supervisor};
use xenft_agent::xapi::follower::{Follower, FollowerConfig};
use xenft_agent::xapi::plane::{Components, Plane};
use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::ops;
use xenft_xapi::registry::Level;
use xenft_xapi::transport::{Endpoint, TlsOptions};
use xenft_xapi::{ConnectOptions, Credentials, XenApi};

mod runtime_pool;
use runtime_pool::{host, pool_init, shutdown_all, start_quorum, wait_for, Pool};

const GIB: i64 = 1 << 30;
const DISK: i64 = 16 << 20;

/// The SR's blkback of the volume on one host, killed when dropped.
struct SrBlkback(Child);

impl Drop for SrBlkback {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the SR's blkback of volume `key` on `me` as `role`, in `sr_run/<sr>/<key>/` as the
/// SR lays it out, mirrored to `peer` over `alink` (`MY_IP:PORT=PEER_IP:PORT`).
#[allow(clippy::too_many_arguments)]
fn sr_blkback(
    bin: &Path,
    dir: &Path,
    sr_run: &Path,
    sr: &str,
    key: &str,
    (me, peer, role, alink): (&str, &str, &str, &str),
) -> (SrBlkback, PathBuf) {
    let ctl = xenft_sr::blkback::control_socket_of(sr_run, sr, key).unwrap();
    let vol = ctl.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&vol).unwrap();
    let secret = dir.join("sr-secret");
    std::fs::write(&secret, "the SR pair's secret, long enough").unwrap();
    let child = Command::new(bin)
        .args(["--role", role, "--disk"])
        .arg(dir.join(format!("{me}-{key}.img")))
        .args(["--size", &DISK.to_string(), "--nbd-unix"])
        .arg(vol.join("nbd.sock"))
        .arg("--control")
        .arg(&ctl)
        .args(["--host", me, "--peer-host", peer, "--secret-file"])
        .arg(&secret)
        .args(["--alink-path", alink])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(vol.join("blkback.log")).unwrap())
        .spawn()
        .unwrap();
    (SrBlkback(child), ctl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_drive_the_xenft_srs_blkbacks_start_no_mirror_of_their_own_and_promote_its_copy_on_take_over(
) {
    let blkback = runtime_pool::blkback_binary();
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1_ref, _) = srv.add_host("h1", "10.0.0.1", 16 * GIB);
    srv.add_host("h2", "10.0.0.2", 16 * GIB);
    let (vm_ref, vm_uuid) = srv.add_vm("web01", 2 * GIB, Some(&h1_ref));
    let (xsr, sr_uuid) = srv.add_sr("mirrored", "xenft", &["VDI_CREATE", "VDI_DELETE"]);
    let vdi = srv.add_disk_on(&vm_ref, 0, DISK, &xsr);
    let key = srv.record(&vdi).unwrap()["location"]
        .as_str()
        .unwrap()
        .to_string();
    let creds = Credentials {
        user: srv.user().into(),
        password: srv.password().into(),
    };
    let endpoint = Endpoint::parse(&srv.url()).unwrap();
    let api = XenApi::new(ConnectOptions::new(endpoint.clone(), creds.clone())).unwrap();
    let port = 22_000 + u16::try_from(std::process::id() % 20_000).unwrap();
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
    let dir = pool.dir.path().to_path_buf();
    // Short: the volume's sockets are `<run>/<sr uuid>/<key>/nbd.sock` (the SR's own default
    // `/run/xenft/sr` leaves room; a deep temporary directory would not).
    let short = tempfile::Builder::new()
        .prefix("sr")
        .tempdir_in("/tmp")
        .unwrap();
    let sr_run = |i: usize| short.path().join(i.to_string());
    // The SR's pair for the volume: primary on h1 where the VM runs, the copy on h2.
    let sr_port = port + 7;
    let (sr2, _) = sr_blkback(
        &blkback,
        &dir,
        &sr_run(2),
        &sr_uuid,
        &key,
        (
            "h2",
            "h1",
            "secondary",
            &format!("127.0.0.2:{sr_port}=127.0.0.1:{sr_port}"),
        ),
    );
    let (sr1, _) = sr_blkback(
        &blkback,
        &dir,
        &sr_run(1),
        &sr_uuid,
        &key,
        (
            "h1",
            "h2",
            "primary",
            &format!("127.0.0.1:{sr_port}=127.0.0.2:{sr_port}"),
        ),
    );

    let secret = dir.join("secret");
    let (mut agents, mut planes) = (Vec::new(), Vec::new());
    for i in 0..2 {
        let run_dir = dir.join(format!("run-h{}", i + 1));
        let disk_dir = dir.join(format!("disks-h{}", i + 1));
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
        let follower = Follower::start(FollowerConfig {
            endpoint: endpoint.clone(),
            tls: TlsOptions::default(),
            credentials: creds.clone(),
            event_timeout: Duration::from_secs(5),
        });
        let components = Components {
            facts: HostFacts {
                me: String::new(),
                run_dir: run_dir.clone(),
                disk_dir,
                sr_run_dir: sr_run(i + 1),
                blkback: blkback.clone(),
                secret_file: secret.clone(),
                disk_size: Some(DISK as u64),
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

    // The pool has a xenft SR and the VM's disk is on it: the CLI's check passes.
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
            let seen: Vec<String> = (1..=2)
                .map(|i| {
                    let log = sr_run(i).join(&sr_uuid).join(&key).join("blkback.log");
                    let link = dir.join(format!("run-h{i}/{vm_uuid}/blkback.sock"));
                    format!(
                        "h{i}: seam {:?}; SR blkback log: {}",
                        std::fs::read_link(&link),
                        std::fs::read_to_string(log).unwrap_or_default()
                    )
                })
                .collect();
            panic!(
                "xenft.state never became protected: {:?}\nagents: {:?}\n{}",
                srv.map_field(&vm_ref, "other_config").get("xenft.state"),
                agents
                    .iter()
                    .map(|a| a.hub().snapshot().vms)
                    .collect::<Vec<_>>(),
                seen.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No mirror of the agents' own on either host; each seam leads to its SR volume.
    for i in 1..=2 {
        let vm_dir = dir.join(format!("run-h{i}/{vm_uuid}"));
        assert!(
            !vm_dir.join("blkback.pid").exists(),
            "h{i} started a blkback of its own"
        );
        assert!(
            !dir.join(format!("disks-h{i}/{vm_uuid}.img")).exists(),
            "h{i} made a disk copy of its own"
        );
        let target = xenft_sr::blkback::control_socket_of(&sr_run(i), &sr_uuid, &key).unwrap();
        assert_eq!(
            std::fs::read_link(vm_dir.join("blkback.sock")).unwrap(),
            target
        );
    }
    // What the seam reads on h1 is the SR's primary, in sync with h2's copy.
    let seam = dir.join(format!("run-h1/{vm_uuid}/blkback.sock"));
    let st = tokio::task::spawn_blocking(move || xenft_tests::components::blkback_status(&seam))
        .await
        .unwrap()
        .expect("the SR's blkback answers through the seam");
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["primary"]["peer"], "in_sync", "{st}");

    // h1 dies (its agent and the SR's blkback there stop): h2's agent takes the VM over and
    // promotes the SR's copy on h2 through its seam — the volume xapi then activates on h2
    // when it restarts the VM there (the SR's side of that: sr/tests/pool.rs).
    let h1_plane = planes.remove(0);
    let h1_agent = agents.remove(0);
    h1_plane.shutdown().await;
    h1_agent.shutdown().await;
    drop(sr1);
    let ctl2 = xenft_sr::blkback::control_socket_of(&sr_run(2), &sr_uuid, &key).unwrap();
    let ctl = ctl2.clone();
    wait_for("h2's SR copy promoted", Duration::from_secs(20), || {
        xenft_tests::components::blkback_status(&ctl).is_some_and(|st| st["role"] == "primary")
    })
    .await;
    let hub2 = agents[0].hub();
    wait_for("h2 took the VM over", Duration::from_secs(10), || {
        hub2.snapshot()
            .vms
            .first()
            .is_some_and(|v| v.record.phase == xenft_agent::lifecycle::Phase::FailedOver)
    })
    .await;

    // Unprotected: the seam's link goes; the SR's blkback is the SR's, left running.
    ops::unprotect(&api, "web01").await.unwrap();
    let link = dir.join(format!("run-h2/{vm_uuid}/blkback.sock"));
    wait_for("the seam link removed", Duration::from_secs(20), || {
        std::fs::symlink_metadata(&link).is_err()
    })
    .await;
    let st = tokio::task::spawn_blocking(move || xenft_tests::components::blkback_status(&ctl2))
        .await
        .unwrap()
        .expect("the SR's blkback runs on");
    assert_eq!(st["role"], "primary", "{st}");
    drop(sr2);
    shutdown_all(planes, agents).await;
}
