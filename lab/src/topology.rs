//! The lab's network: names, addresses, and building/removing it with `ip`.
//!
//! Five namespaces: `xftlab-host1`, `xftlab-host2`, `xftlab-client`, `xftlab-switch` (which
//! holds the production bridge `br0`) and `xftlab-quorum` (the quorum server, and the router
//! of the management network). Two veth pairs `alink1`/`alink2` join the hosts directly (the
//! A-links); each of host1, host2 and client has a `prod0` port on the bridge; each host has a
//! `mgmt0` link into the quorum namespace (management network, 10.202.0.0/16).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;

use crate::LabError;

/// Prefix of everything the lab creates.
pub const PREFIX: &str = "xftlab-";
/// Namespace of host 1.
pub const NS_HOST1: &str = "xftlab-host1";
/// Namespace of host 2.
pub const NS_HOST2: &str = "xftlab-host2";
/// Namespace of the client.
pub const NS_CLIENT: &str = "xftlab-client";
/// Namespace holding the production bridge.
pub const NS_SWITCH: &str = "xftlab-switch";
/// Namespace of the quorum server; it is also the management network's router (each host's
/// `mgmt0` is a point-to-point link into it, and it forwards between them).
pub const NS_QUORUM: &str = "xftlab-quorum";
/// The VM's namespace on host 1 (its network stack: `vm0`, the far end of the vif).
pub const NS_VM1: &str = "xftlab-host1-vm";
/// The VM's namespace on host 2.
pub const NS_VM2: &str = "xftlab-host2-vm";
/// All namespaces, in creation order.
pub const NAMESPACES: [&str; 7] = [
    NS_SWITCH, NS_QUORUM, NS_HOST1, NS_HOST2, NS_CLIENT, NS_VM1, NS_VM2,
];

/// The VM's interface in its namespace; the other end, [`VIF_IF`], is in the host namespace
/// (the VM's vif, relayed to the uplink by `xenft-netback`).
pub const VM_IF: &str = "vm0";
/// The VM's vif in each host namespace.
pub const VIF_IF: &str = "vif0";
/// The VM's MAC address (the same on both hosts: one VM).
pub const VM_MAC: &str = "02:16:3e:00:00:0a";

/// The management interface in each host namespace.
pub const MGMT_IF: &str = "mgmt0";
/// Port of the quorum server (`xenft-quorum`) in [`NS_QUORUM`].
pub const QUORUM_PORT: u16 = 7479;
/// Port of the agents' management-network heartbeats.
pub const MGMT_HB_PORT: u16 = 7480;
/// Port of each agent's status API (loopback of the host namespace).
pub const STATUS_PORT: u16 = 7481;

/// The production interface in each host/client namespace.
pub const PROD_IF: &str = "prod0";
/// The A-link interfaces (same names on both hosts).
pub const ALINK_IFS: [&str; 2] = ["alink1", "alink2"];

/// Port of the A-link on both hosts.
pub const ALINK_PORT: u16 = 7100;
/// Port of the VM's service on the service address.
pub const SERVICE_PORT: u16 = 7000;

/// The service (VM) address, owned by whichever host runs the VM.
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
/// The client's production address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 100);

/// One of the two lab hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Host {
    /// The first host (primary at `up`).
    Host1,
    /// The second host (secondary at `up`).
    Host2,
}

impl Host {
    /// `host1` / `host2`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Host1 => "host1",
            Self::Host2 => "host2",
        }
    }

    /// Its namespace.
    #[must_use]
    pub fn netns(self) -> &'static str {
        match self {
            Self::Host1 => NS_HOST1,
            Self::Host2 => NS_HOST2,
        }
    }

    /// The namespace of the VM's copy on this host.
    #[must_use]
    pub fn vm_netns(self) -> &'static str {
        match self {
            Self::Host1 => NS_VM1,
            Self::Host2 => NS_VM2,
        }
    }

    /// The other host.
    #[must_use]
    pub fn peer(self) -> Self {
        match self {
            Self::Host1 => Self::Host2,
            Self::Host2 => Self::Host1,
        }
    }

    fn octet(self) -> u8 {
        match self {
            Self::Host1 => 1,
            Self::Host2 => 2,
        }
    }

    /// Its production address.
    #[must_use]
    pub fn prod_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 0, self.octet())
    }

    /// Its address on A-link `path` (0 or 1).
    #[must_use]
    pub fn alink_ip(self, path: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, path + 1, self.octet())
    }

    /// Its management address (on `mgmt0`).
    #[must_use]
    pub fn mgmt_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 202, self.octet(), self.octet())
    }

    /// The quorum namespace's end of this host's management link: the host's gateway and
    /// the address it reaches the quorum server on.
    #[must_use]
    pub fn mgmt_gw(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 202, self.octet(), 254)
    }

    /// The quorum server, as this host reaches it.
    #[must_use]
    pub fn quorum_addr(self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.mgmt_gw(), QUORUM_PORT))
    }

    /// Its A-link socket address on `path`.
    #[must_use]
    pub fn alink_addr(self, path: u8) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.alink_ip(path), ALINK_PORT))
    }
}

impl std::str::FromStr for Host {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, LabError> {
        match s {
            "host1" => Ok(Self::Host1),
            "host2" => Ok(Self::Host2),
            _ => Err(LabError::WrongState(format!(
                "unknown host {s:?} (host1 or host2)"
            ))),
        }
    }
}

/// Runs a command and returns its stdout; a non-zero exit is an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, LabError> {
    let cmd = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// `ip -n NS ARGS...`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Namespaces of the lab that exist now.
pub fn existing_namespaces() -> Result<Vec<String>, LabError> {
    let out = run("ip", &["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect())
}

/// Creates the namespaces, the A-links and the production bridge. Fails if any lab
/// namespace already exists.
pub fn create() -> Result<(), LabError> {
    let existing = existing_namespaces()?;
    if !existing.is_empty() {
        return Err(LabError::WrongState(format!(
            "lab namespaces already exist ({}); run `xenft-lab down` first",
            existing.join(", ")
        )));
    }
    for ns in NAMESPACES {
        run("ip", &["netns", "add", ns])?;
        ip_in(ns, &["link", "set", "lo", "up"])?;
    }
    // The A-links: veth pairs straight between the hosts.
    for (i, name) in ALINK_IFS.iter().enumerate() {
        let path = u8::try_from(i).unwrap_or(0);
        veth(name, NS_HOST1, name, NS_HOST2)?;
        for h in [Host::Host1, Host::Host2] {
            let addr = format!("{}/24", h.alink_ip(path));
            ip_in(h.netns(), &["addr", "add", &addr, "dev", name])?;
            ip_in(h.netns(), &["link", "set", name, "up"])?;
        }
    }
    // The management network: one point-to-point link per host into the quorum namespace,
    // which routes between them (cutting that forwarding cuts the hosts' direct management
    // path while each still reaches the quorum server).
    run(
        "ip",
        &[
            "netns",
            "exec",
            NS_QUORUM,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    )?;
    for h in [Host::Host1, Host::Host2] {
        let port = format!("m-{}", h.name());
        veth(MGMT_IF, h.netns(), &port, NS_QUORUM)?;
        ip_in(
            h.netns(),
            &[
                "addr",
                "add",
                &format!("{}/24", h.mgmt_ip()),
                "dev",
                MGMT_IF,
            ],
        )?;
        ip_in(h.netns(), &["link", "set", MGMT_IF, "up"])?;
        ip_in(
            NS_QUORUM,
            &["addr", "add", &format!("{}/24", h.mgmt_gw()), "dev", &port],
        )?;
        ip_in(NS_QUORUM, &["link", "set", &port, "up"])?;
        ip_in(
            h.netns(),
            &[
                "route",
                "add",
                "10.202.0.0/16",
                "via",
                &h.mgmt_gw().to_string(),
            ],
        )?;
    }
    // The VM's vif on each host: a veth pair into the VM's namespace, with the VM's MAC.
    for h in [Host::Host1, Host::Host2] {
        veth(VIF_IF, h.netns(), VM_IF, h.vm_netns())?;
        ip_in(h.vm_netns(), &["link", "set", VM_IF, "address", VM_MAC])?;
        ip_in(h.vm_netns(), &["link", "set", VM_IF, "up"])?;
        ip_in(h.netns(), &["link", "set", VIF_IF, "up"])?;
    }
    // The production network: a bridge in its own namespace.
    ip_in(NS_SWITCH, &["link", "add", "br0", "type", "bridge"])?;
    ip_in(NS_SWITCH, &["link", "set", "br0", "up"])?;
    let ports = [
        (NS_HOST1, "p-host1", Host::Host1.prod_ip()),
        (NS_HOST2, "p-host2", Host::Host2.prod_ip()),
        (NS_CLIENT, "p-client", CLIENT_IP),
    ];
    for (ns, port, ip) in ports {
        veth(PROD_IF, ns, port, NS_SWITCH)?;
        ip_in(NS_SWITCH, &["link", "set", port, "master", "br0"])?;
        ip_in(NS_SWITCH, &["link", "set", port, "up"])?;
        ip_in(ns, &["addr", "add", &format!("{ip}/24"), "dev", PROD_IF])?;
        ip_in(ns, &["link", "set", PROD_IF, "up"])?;
    }
    Ok(())
}

/// A veth pair: `a` in namespace `a_ns`, its peer `b` in `b_ns`.
fn veth(a: &str, a_ns: &str, b: &str, b_ns: &str) -> Result<(), LabError> {
    run(
        "ip",
        &[
            "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns", b_ns,
        ],
    )
    .map(|_| ())
}

/// Deletes every lab namespace (their interfaces go with them). Idempotent.
pub fn destroy() -> Result<(), LabError> {
    for ns in existing_namespaces()? {
        run("ip", &["netns", "del", &ns])?;
    }
    Ok(())
}

/// PIDs of every process inside lab namespaces.
pub fn pids_in_namespaces() -> Result<Vec<i32>, LabError> {
    let mut pids = Vec::new();
    for ns in existing_namespaces()? {
        pids.extend(pids_in(&ns)?);
    }
    Ok(pids)
}

/// PIDs of every process inside namespace `ns`.
pub fn pids_in(ns: &str) -> Result<Vec<i32>, LabError> {
    let out = run("ip", &["netns", "pids", ns])?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .collect())
}

/// Brings every link of host `h` (production, A-links, management) down or up; on the way
/// up, the management route that the kernel dropped with the link comes back too.
pub fn set_host_links(h: Host, up: bool) -> Result<(), LabError> {
    for ifname in [PROD_IF, ALINK_IFS[0], ALINK_IFS[1], MGMT_IF] {
        set_link(h.netns(), ifname, up)?;
    }
    if up {
        let gw = h.mgmt_gw().to_string();
        match ip_in(h.netns(), &["route", "add", "10.202.0.0/16", "via", &gw]) {
            Ok(_) => {}
            Err(LabError::Command { stderr, .. }) if stderr.contains("exists") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Lets the quorum namespace forward between the hosts' management links (or not).
pub fn set_mgmt_forwarding(on: bool) -> Result<(), LabError> {
    let v = format!("net.ipv4.ip_forward={}", u8::from(on));
    run("ip", &["netns", "exec", NS_QUORUM, "sysctl", "-qw", &v]).map(|_| ())
}

/// Sets an interface of a namespace up or down.
pub fn set_link(ns: &str, ifname: &str, up: bool) -> Result<(), LabError> {
    ip_in(ns, &["link", "set", ifname, if up { "up" } else { "down" }]).map(|_| ())
}
