//! The pool's membership from the registry: with an `xapi` section and no `peers` in its
//! config file, the agent learns its peers, their A-link and management addresses, the
//! quorum servers and the A-link key from the pool's xapi — `xenft.pool` (written by `xenft
//! pool-init`), the `host` records (name, management address) and the xapi `secret` holding
//! the key — so that a host's config holds host-local facts only.
//!
//! [`derive`] is pure: this host's A-links are paired path by path with each peer's (the
//! agent's own heartbeat link uses the registry's ports; the VMs' components use per-VM
//! slots above them), the management path is the hosts' xapi `address` on
//! [`DEFAULT_MGMT_PORT`] (or the configured port). The agent reads the membership once at
//! start ([`read`]); when the registry's membership changes later, the `xenft-agent` binary
//! restarts itself to apply it (the VMs' components and domains outlive it and are adopted).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::config::{PathAddrs, PeerFile};
use crate::ids::HostId;

use super::desired::Desired;

/// Default UDP port of the management-network heartbeat path.
pub const DEFAULT_MGMT_PORT: u16 = 7480;

/// What the registry says about this host's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The other hosts and how to reach them.
    pub peers: Vec<(HostId, Vec<PathAddrs>, Option<PathAddrs>)>,
    /// Quorum servers, preferred first.
    pub quorum: Vec<SocketAddr>,
    /// uuid of the xapi secret holding the A-link key, if the pool has one.
    pub secret_uuid: Option<String>,
}

impl Membership {
    /// The peers as config sections.
    #[must_use]
    pub fn peer_files(&self) -> Vec<PeerFile> {
        self.peers
            .iter()
            .map(|(host, alink, mgmt)| PeerFile {
                host: host.clone(),
                alink: alink.clone(),
                mgmt: mgmt.clone(),
            })
            .collect()
    }
}

fn addr(what: &str, s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    // A quorum server may be named; resolve it once, here.
    s.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| format!("{what} {s:?} is not an address:port"))
}

/// This host's (`me`, its xapi name) membership in the registry `d`.
///
/// # Errors
/// Why the registry does not say how to reach the pool (no `xenft.pool`, this host not in
/// it, an address that is not one, a host name the agent cannot use, no peer).
pub fn derive(d: &Desired, me: &str, mgmt_port: u16) -> Result<Membership, String> {
    let Some(pool) = &d.pool else {
        return Err(d
            .pool_problem
            .clone()
            .unwrap_or_else(|| "no xenft.pool in the registry".into()));
    };
    let Some(me_uuid) = d.host_uuid(me) else {
        return Err(format!("no host named {me:?} in the pool"));
    };
    let Some(mine) = pool.hosts.get(me_uuid) else {
        return Err(format!(
            "host {me} is not in xenft.pool: run `xenft pool-init` with its A-links"
        ));
    };
    let mgmt_ip = |uuid: &str| -> Option<IpAddr> { d.hosts.get(uuid)?.address.parse().ok() };
    let my_ip = mgmt_ip(me_uuid);
    let mut peers = Vec::new();
    for (uuid, theirs) in &pool.hosts {
        if uuid == me_uuid {
            continue;
        }
        let Some(info) = d.hosts.get(uuid) else {
            return Err(format!(
                "xenft.pool names host {uuid}, which is not a host of this pool"
            ));
        };
        let host = HostId::new(info.name.clone())
            .map_err(|e| format!("host {uuid}'s name {:?}: {e}", info.name))?;
        if theirs.alinks.len() != mine.alinks.len() {
            return Err(format!(
                "{me} has {} A-link(s) and {} has {}: pair them in xenft.pool",
                mine.alinks.len(),
                info.name,
                theirs.alinks.len()
            ));
        }
        let alink = mine
            .alinks
            .iter()
            .zip(&theirs.alinks)
            .map(|(a, b)| {
                Ok(PathAddrs {
                    local: addr("A-link", a)?,
                    peer: addr("A-link", b)?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mgmt = match (my_ip, mgmt_ip(uuid)) {
            (Some(l), Some(p)) => Some(PathAddrs {
                local: SocketAddr::new(l, mgmt_port),
                peer: SocketAddr::new(p, mgmt_port),
            }),
            _ => None,
        };
        if alink.is_empty() && mgmt.is_none() {
            return Err(format!(
                "no path to {}: no A-link and no management address",
                info.name
            ));
        }
        peers.push((host, alink, mgmt));
    }
    if peers.is_empty() {
        return Err("xenft.pool has no other host".into());
    }
    let quorum = pool
        .quorum_servers
        .iter()
        .map(|q| addr("quorum server", q))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Membership {
        peers,
        quorum,
        secret_uuid: pool.secret_uuid.clone(),
    })
}

/// Waits for the follower's first registry with this host's membership, logging why it is
/// not there yet every `say_every`; then reads the A-link key from xapi's secret.
///
/// # Errors
/// The follower stopped, or the secret cannot be read.
pub async fn read(
    follower: &super::follower::Follower,
    me: &str,
    mgmt_port: u16,
    say_every: Duration,
) -> Result<(Membership, Option<Vec<u8>>), String> {
    let mut rx = follower.desired();
    let mut last_said = None::<String>;
    let m = loop {
        if let Some(d) = rx.borrow_and_update().clone() {
            match derive(&d, me, mgmt_port) {
                Ok(m) => break m,
                Err(why) => {
                    if last_said.as_deref() != Some(&why) {
                        tracing::warn!(reason = %why, "waiting for the pool's membership in the registry");
                        last_said = Some(why);
                    }
                }
            }
        }
        match tokio::time::timeout(say_every, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("the registry follower stopped".into()),
            Err(_) => {
                last_said = None;
            }
        }
    };
    let Some(uuid) = &m.secret_uuid else {
        return Ok((m, None));
    };
    let mut api_rx = follower.api();
    let api = loop {
        if let Some(api) = api_rx.borrow_and_update().clone() {
            break api;
        }
        api_rx
            .changed()
            .await
            .map_err(|_| "the registry follower stopped".to_string())?;
    };
    let key = api
        .secret_value(uuid)
        .await
        .map_err(|e| format!("reading the A-link key (xapi secret {uuid}): {e}"))?;
    Ok((m, Some(key.into_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xapi::desired::HostInfo;
    use std::collections::BTreeMap;
    use xenft_xapi::registry::{HostLinks, Policy, PoolConfig};

    fn desired(alinks: &[(&str, &str, &[&str])], quorum: &[&str]) -> Desired {
        let mut d = Desired::default();
        let mut hosts = BTreeMap::new();
        for (uuid, name, links) in alinks {
            d.hosts.insert(
                (*uuid).into(),
                HostInfo {
                    name: (*name).into(),
                    address: format!("192.168.1.{}", uuid.len()),
                },
            );
            hosts.insert(
                (*uuid).to_string(),
                HostLinks {
                    name: (*name).into(),
                    alinks: links.iter().map(|s| (*s).to_string()).collect(),
                },
            );
        }
        d.pool = Some(PoolConfig {
            format_version: 1,
            hosts,
            quorum_servers: quorum.iter().map(|s| (*s).to_string()).collect(),
            policy: Policy::default(),
            secret_uuid: Some("sec".into()),
        });
        d
    }

    #[test]
    fn a_hosts_peers_paths_and_quorum_come_from_the_registry() {
        let mut d = desired(
            &[
                ("u1", "h1", &["10.0.0.1:7500", "10.1.0.1:7500"]),
                ("uu2", "h2", &["10.0.0.2:7500", "10.1.0.2:7500"]),
            ],
            &["192.168.9.9:7479"],
        );
        d.hosts.get_mut("uu2").unwrap().address = "192.168.1.12".into();
        d.hosts.get_mut("u1").unwrap().address = "192.168.1.11".into();
        let m = derive(&d, "h1", DEFAULT_MGMT_PORT).unwrap();
        assert_eq!(m.peers.len(), 1);
        let (host, alink, mgmt) = &m.peers[0];
        assert_eq!(host.as_str(), "h2");
        assert_eq!(alink[1].local, "10.1.0.1:7500".parse().unwrap());
        assert_eq!(alink[1].peer, "10.1.0.2:7500".parse().unwrap());
        let mgmt = mgmt.as_ref().unwrap();
        assert_eq!(mgmt.local, "192.168.1.11:7480".parse().unwrap());
        assert_eq!(mgmt.peer, "192.168.1.12:7480".parse().unwrap());
        assert_eq!(m.quorum, vec!["192.168.9.9:7479".parse().unwrap()]);
        assert_eq!(m.secret_uuid.as_deref(), Some("sec"));
        // And from h2's side, mirrored.
        let m2 = derive(&d, "h2", 7000).unwrap();
        assert_eq!(m2.peers[0].1[0].local, "10.0.0.2:7500".parse().unwrap());
        assert_eq!(m2.peers[0].2.as_ref().unwrap().local.port(), 7000);
    }

    #[test]
    fn a_registry_that_cannot_say_how_to_reach_the_pool_is_explained() {
        let two = |a: &'static [&'static str], b: &'static [&'static str]| {
            desired(&[("u1", "h1", a), ("u2", "h2", b)], &[])
        };
        for (d, me, want) in [
            (Desired::default(), "h1", "no xenft.pool"),
            (
                two(&["10.0.0.1:7500"], &["10.0.0.2:7500"]),
                "h9",
                "no host named",
            ),
            (
                two(&["10.0.0.1:7500"], &["nonsense"]),
                "h1",
                "not an address",
            ),
            (
                two(&["10.0.0.1:7500"], &["10.0.0.2:7500", "10.1.0.2:7500"]),
                "h1",
                "pair them",
            ),
            (
                desired(&[("u1", "h1", &["10.0.0.1:7500"])], &[]),
                "h1",
                "no other host",
            ),
            (
                desired(
                    &[
                        ("u1", "h1", &["10.0.0.1:7500"]),
                        ("u2", "bad name!", &["10.0.0.2:7500"]),
                    ],
                    &[],
                ),
                "h1",
                "bad name!",
            ),
        ] {
            let e = derive(&d, me, DEFAULT_MGMT_PORT).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        let mut d = two(&["10.0.0.1:7500"], &["10.0.0.2:7500"]);
        d.pool.as_mut().unwrap().hosts.remove("u1");
        assert!(derive(&d, "h1", 1).unwrap_err().contains("pool-init"));
    }
}
