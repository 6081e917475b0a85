//! Two simulated hosts joined by two A-link cables: the topology every A-link-carried test
//! starts from.

use std::net::SocketAddr;

use xenft_alink::testing::TEST_SECRET;
use xenft_alink::{LinkConfig, PathConfig};

use crate::netns::{veth, Netns, NetnsError};

/// host1 and host2 as namespaces, joined by veth cables `<dev>1` (10.`net`.1.0/24) and
/// `<dev>2` (10.`net`.2.0/24), with the link configuration each host uses on `port`.
#[derive(Debug)]
pub struct TwoHosts {
    /// host1's namespace (it dials: "host1" sorts first).
    pub h1: Netns,
    /// host2's namespace.
    pub h2: Netns,
    /// host1's link configuration.
    pub c1: LinkConfig,
    /// host2's link configuration.
    pub c2: LinkConfig,
    /// The cable interface names, the same on both sides: `[<dev>1, <dev>2]`.
    pub devs: [String; 2],
}

/// Builds the two hosts and their cables.
///
/// # Errors
/// When a namespace or veth pair cannot be created.
pub fn two_hosts(net: u8, dev: &str, port: u16) -> Result<TwoHosts, NetnsError> {
    let h1 = Netns::new()?;
    let h2 = Netns::new()?;
    let devs = [format!("{dev}1"), format!("{dev}2")];
    let ip = |cable: usize, host: usize| format!("10.{net}.{cable}.{host}");
    for (i, d) in devs.iter().enumerate() {
        let c = i + 1;
        veth(
            &h1,
            d,
            &format!("{}/24", ip(c, 1)),
            &h2,
            d,
            &format!("{}/24", ip(c, 2)),
        )?;
    }
    let addr = |cable: usize, host: usize| -> SocketAddr {
        format!("{}:{port}", ip(cable, host))
            .parse()
            .expect("a well-formed IPv4 socket address")
    };
    let paths = |me: usize, peer: usize| {
        (1..=2)
            .map(|c| PathConfig {
                local: addr(c, me),
                peer: addr(c, peer),
            })
            .collect()
    };
    Ok(TwoHosts {
        c1: LinkConfig::new("host1", "host2", TEST_SECRET, paths(1, 2)),
        c2: LinkConfig::new("host2", "host1", TEST_SECRET, paths(2, 1)),
        h1,
        h2,
        devs,
    })
}
