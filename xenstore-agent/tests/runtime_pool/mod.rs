//! The pieces the agent's in-process pool tests share (agent_runtime.rs, xapi_plane.rs): two
//! agents' configs on loopback, waits.
#![allow(dead_code, missing_docs)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use xenft_agent::config::{AlinkTransport, ConfigFile, PathAddrs, PeerFile, StatusFile};
use xenft_agent::core::VmSpec;
use xenft_agent::ids::{HostId, VmId};
use xenft_agent::lifecycle::{Level, Phase};
use xenft_agent::status::StatusHub;
use xenft_agent::timing::Timing;

pub fn free_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn host(s: &str) -> HostId {
    HostId::new(s).unwrap()
}

pub struct Pool {
    pub dir: tempfile::TempDir,
    pub addrs: Vec<[SocketAddr; 3]>, // per host: alink0, alink1, mgmt
    pub quorum: SocketAddr,
}

impl Pool {
    /// Host `me`'s config, protecting vm1 (h1 primary, h2 secondary) at level 3.
    pub fn config(&self, me: usize) -> ConfigFile {
        self.config_with(
            me,
            vec![VmSpec {
                vm: VmId::new("vm1").unwrap(),
                level: Level::L3,
                primary: host("h1"),
                secondary: host("h2"),
                memory_mb: 256,
            }],
        )
    }

    /// Host `me`'s config with these VMs.
    pub fn config_with(&self, me: usize, vms: Vec<VmSpec>) -> ConfigFile {
        let other = 1 - me;
        let path = |i: usize| PathAddrs {
            local: self.addrs[me][i],
            peer: self.addrs[other][i],
        };
        let secret = self.dir.path().join("secret");
        std::fs::write(&secret, "a-pool-secret-of-enough-length").unwrap();
        let hb = self.dir.path().join("hb");
        std::fs::create_dir_all(&hb).unwrap();
        ConfigFile {
            host: host(&format!("h{}", me + 1)),
            secret_file: secret,
            state_file: self.dir.path().join(format!("state-h{}.json", me + 1)),
            peers: vec![PeerFile {
                host: host(&format!("h{}", other + 1)),
                alink: vec![path(0), path(1)],
                mgmt: Some(path(2)),
            }],
            storage_heartbeat_dir: Some(hb),
            quorum: vec![self.quorum],
            timing: Timing::default(),
            status: StatusFile {
                listen: "127.0.0.1:0".parse().unwrap(),
                token_file: None,
            },
            vms,
            free_memory_mb: Some(4096),
            event_log: 100,
            alink_transport: AlinkTransport::Udp,
            xenstore: false,
        }
    }
}

pub async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn phase(hub: &StatusHub) -> Option<Phase> {
    hub.snapshot().vms.first().map(|v| v.record.phase)
}

/// A quorum server on loopback with the pool's secret and a 600 ms lease.
pub async fn start_quorum() -> xenft_agent::quorum::server::QuorumServer {
    xenft_agent::quorum::server::QuorumServer::start(xenft_agent::quorum::server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        secret: b"a-pool-secret-of-enough-length".to_vec(),
        lease_ms: 600,
        max_vms: 16,
        max_connections: 8,
        idle_timeout: Duration::from_secs(5),
    })
    .await
    .unwrap()
}

impl Pool {
    /// Two hosts' addresses on loopback, with the quorum server at `quorum`.
    pub fn new(quorum: SocketAddr) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            addrs: (0..2)
                .map(|_| [free_port(), free_port(), free_port()])
                .collect(),
            quorum,
        }
    }
}

/// `xenft pool-init` for `hosts` (one A-link each) against `api`.
pub async fn pool_init(api: &xenft_xapi::XenApi, hosts: &[(&str, &str)]) {
    xenft_xapi::ops::pool_init(
        api,
        &xenft_xapi::ops::PoolInit {
            alinks: hosts
                .iter()
                .map(|(h, a)| ((*h).to_string(), vec![(*a).to_string()]))
                .collect(),
            quorum_servers: vec![],
            secret_uuid: None,
            secret_value: Some("a pool secret of enough length".into()),
            policy: None,
            force: false,
        },
    )
    .await
    .unwrap();
}

/// `xenft-blkback`, built if needed (a no-op after a workspace build).
pub fn blkback_binary() -> std::path::PathBuf {
    component_binary("xenft-blkback", "xenft-blkback")
}

/// Binary `bin` of workspace package `package`, built if needed.
pub fn component_binary(package: &str, bin: &str) -> std::path::PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let st = std::process::Command::new(cargo)
        .args(["build", "-q", "-p", package, "--bins", "--manifest-path"])
        .arg(manifest)
        .status()
        .expect("cargo build");
    assert!(st.success(), "building {package} failed");
    xenft_tests::lab::target_dir().join(bin)
}

/// The registry of two hosts on loopback (h1 = uuid `u1` on 127.0.0.1, h2 = `u2` on 127.0.0.2,
/// one A-link each on `base_port`) with VM `uuid` (named `name`) at `level`, running on h1
/// with its copy on h2.
pub fn loopback_desired(
    base_port: u16,
    uuid: &str,
    name: &str,
    level: u8,
) -> xenft_agent::xapi::desired::Desired {
    use xenft_agent::xapi::desired::{Desired, HostInfo, VmDesired};
    use xenft_xapi::registry::{HostLinks, Policy, PoolConfig};
    let mut d = Desired::default();
    let mut hosts = std::collections::BTreeMap::new();
    for (u, n, ip) in [("u1", "h1", "127.0.0.1"), ("u2", "h2", "127.0.0.2")] {
        d.hosts.insert(
            u.into(),
            HostInfo {
                name: n.into(),
                address: ip.into(),
            },
        );
        hosts.insert(
            u.to_string(),
            HostLinks {
                name: n.into(),
                alinks: vec![format!("{ip}:{base_port}")],
            },
        );
    }
    d.pool = Some(PoolConfig {
        format_version: 1,
        hosts,
        quorum_servers: vec![],
        policy: Policy::default(),
        secret_uuid: None,
    });
    d.vms.insert(
        uuid.into(),
        VmDesired {
            uuid: uuid.into(),
            vm_ref: "OpaqueRef:v".into(),
            name: name.into(),
            level,
            secondary: "u2".into(),
            resident_on: Some("u1".into()),
            power_state: "Running".into(),
            memory_bytes: 1 << 30,
            devices: xenft_agent::xapi::devices::VmDevices::default(),
        },
    );
    d
}

/// Waits (blocking) until `f` holds, at most `secs` seconds.
pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Host `me`'s facts for supervisor tests under `dir`: runtime and disk directories of its
/// own (the disk directory created), the pool secret in `dir/secret`, 16 MiB disks, no relay
/// and no engine (set them with struct update syntax).
pub fn host_facts(
    dir: &std::path::Path,
    me: &str,
    blkback: &std::path::Path,
) -> xenft_agent::xapi::components::HostFacts {
    let secret = dir.join("secret");
    if !secret.exists() {
        std::fs::write(&secret, "a pool secret of enough length").unwrap();
    }
    let disk_dir = dir.join(format!("disks-{me}"));
    std::fs::create_dir_all(&disk_dir).unwrap();
    xenft_agent::xapi::components::HostFacts {
        me: me.into(),
        run_dir: dir.join(format!("run-{me}")),
        disk_dir,
        sr_run_dir: dir.join(format!("sr-run-{me}")),
        blkback: blkback.to_path_buf(),
        secret_file: secret,
        disk_size: Some(16 << 20),
        relay: None,
        engine: None,
        alink_path_timeout_ms: None,
    }
}

/// Stops the control planes, then their agents.
pub async fn shutdown_all(
    planes: Vec<xenft_agent::xapi::plane::Plane>,
    agents: Vec<xenft_agent::runtime::Agent>,
) {
    for p in planes {
        p.shutdown().await;
    }
    for a in agents {
        a.shutdown().await;
    }
}
