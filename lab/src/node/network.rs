//! The service address on the production network: claiming and announcing it, and the
//! uplink redirect through the peer (relay over the A-link's control channel).

use std::time::Duration;

use tokio::net::TcpListener;
use xenft_agent::core::Input;
use xenft_agent::decision::Component;
use xenft_alink::Channel;

use crate::topology::{ALINK_IFS, PROD_IF, SERVICE_IP, SERVICE_PORT};
use crate::LabError;

use super::vm::Vm;
use super::{lock, vm_id, Node};

impl Node {
    /// Uplink redirect (`on`) or restore, on the host running the VM: its replies to the
    /// production network go over `alink1` to the peer, and the peer relays the client's
    /// traffic for the service address back (proxy ARP + a host route), asked over the
    /// A-link's control channel.
    pub(super) fn uplink_redirect(&self, on: bool) -> Result<(), LabError> {
        let via = self.me().peer().alink_ip(0).to_string();
        let prod_net = "10.200.0.0/24";
        let route = |op: &'static str| {
            [
                "route",
                op,
                prod_net,
                "via",
                &via,
                "dev",
                ALINK_IFS[0],
                "metric",
                "50",
            ]
        };
        if on {
            match crate::topology::run("ip", &route("add")) {
                Ok(_) => {}
                Err(LabError::Command { stderr, .. }) if stderr.contains("exists") => {}
                Err(e) => return Err(e),
            }
            self.control(RELAY_ON)?;
            self.event(
                "uplink redirected through the peer",
                "replies leave over alink1; the peer relays the client's traffic (proxy ARP)",
            );
        } else {
            announce()?;
            self.control(RELAY_OFF)?;
            let _ = crate::topology::run("ip", &route("del"));
            self.event(
                "uplink restored",
                "service address announced from this host's own uplink again",
            );
        }
        Ok(())
    }

    pub(super) fn control(&self, msg: &'static [u8]) -> Result<(), LabError> {
        self.handle
            .block_on(
                self.agent_link
                    .send(Channel::Control, bytes::Bytes::from_static(msg)),
            )
            .map_err(|e| LabError::component("A-link control channel", e))
    }

    /// On the peer of a host whose uplink failed: relay the service address to it.
    pub(super) fn relay(&self, on: bool) {
        let target = self.me().peer().alink_ip(0).to_string();
        let vip = SERVICE_IP.to_string();
        let run = |args: &[&str]| crate::topology::run(args[0], &args[1..]);
        let r = if on {
            run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
                .and_then(|_| {
                    run(&[
                        "ip",
                        "route",
                        "replace",
                        &vip,
                        "via",
                        &target,
                        "dev",
                        ALINK_IFS[0],
                    ])
                })
                .and_then(
                    |_| match run(&["ip", "neigh", "add", "proxy", &vip, "dev", PROD_IF]) {
                        Err(LabError::Command { stderr, .. }) if stderr.contains("exists") => {
                            Ok(String::new())
                        }
                        other => other,
                    },
                )
                .and_then(|_| announce().map(|()| String::new()))
        } else {
            let _ = run(&["ip", "neigh", "del", "proxy", &vip, "dev", PROD_IF]);
            let _ = run(&["ip", "route", "del", &vip, "via", &target]);
            run(&["sysctl", "-qw", "net.ipv4.ip_forward=0"])
        };
        match r {
            Ok(_) => self.event(
                if on {
                    "relaying the service address for the peer"
                } else {
                    "relay of the service address stopped"
                },
                if on {
                    "the peer's uplink failed: proxy ARP on prod0, routed over alink1"
                } else {
                    "the peer's uplink works again"
                },
            ),
            Err(e) => self.event("relay failed", &e.to_string()),
        }
    }

    /// Reports the production port's state changes to the agent while the VM runs here.
    pub(super) fn watch_uplink(&self, last: &mut Option<bool>) {
        let up = std::fs::read_to_string(format!("/sys/class/net/{PROD_IF}/operstate"))
            .map(|s| s.trim() != "down")
            .unwrap_or(false);
        let runs_here = matches!(&*lock(&self.vm), Vm::Running(r) if !r.paused);
        if !runs_here {
            *last = None;
            return;
        }
        if *last == Some(up) {
            return;
        }
        let first = last.is_none();
        *last = Some(up);
        if first && up {
            return;
        }
        if let Some(tx) = self.inputs.get() {
            let _ = tx.try_send(Input::Component {
                vm: Some(vm_id()),
                component: Component::Uplink,
                ok: up,
                detail: format!("{PROD_IF} is {}", if up { "up" } else { "down" }),
            });
        }
    }
}

pub(super) async fn bind_service() -> std::io::Result<TcpListener> {
    // The address was just added; a restarted service may find the old socket lingering.
    let mut last = None;
    for _ in 0..20 {
        match TcpListener::bind((SERVICE_IP, SERVICE_PORT)).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("bind failed")))
}

/// Adds the service address to this host's production port (no error if it is there).
pub(super) fn claim_address() -> Result<(), LabError> {
    let ip = format!("{SERVICE_IP}/24");
    match crate::topology::run("ip", &["addr", "add", &ip, "dev", PROD_IF]) {
        Ok(_) => Ok(()),
        Err(LabError::Command { stderr, .. }) if stderr.contains("exists") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the service address from this host (no error if it is not there).
pub(super) fn release_address() {
    let ip = format!("{SERVICE_IP}/24");
    let _ = crate::topology::run("ip", &["addr", "del", &ip, "dev", PROD_IF]);
}

/// Sends gratuitous ARPs for the service address from this host's production port.
pub(super) fn announce() -> Result<(), LabError> {
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{PROD_IF}/address"))
        .map_err(|e| LabError::component("reading prod0 MAC", e))?;
    let bytes: Vec<u8> = mac_text
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    let mac = xenft_netback::frame::MacAddr::from_slice(&bytes)
        .ok_or_else(|| LabError::component("prod0 MAC", mac_text.trim()))?;
    let sock = xenft_netback::sys::PacketSocket::open(PROD_IF)
        .map_err(|e| LabError::component("packet socket", e))?;
    let garp = xenft_netback::frame::gratuitous_arp(mac, SERVICE_IP);
    for pause in [0, 50, 200] {
        std::thread::sleep(Duration::from_millis(pause));
        sock.send(&garp)
            .map_err(|e| LabError::component("sending gratuitous ARP", e))?;
    }
    Ok(())
}

pub(super) const RELAY_ON: &[u8] = b"uplink-relay on";
pub(super) const RELAY_OFF: &[u8] = b"uplink-relay off";
