//! Protect / unprotect from the console: the agent gets the input, the peer is told.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use xenft_agent::core::{Input, VmSpec};
use xenft_agent::lifecycle::Level;

use crate::topology::Host;

use super::vm::Vm;
use super::{host_id, lock, vm_id, Node, VM};

impl Node {
    /// Protect (`on`) or unprotect the VM on this host: the agent gets the input, the
    /// components follow. Unless `forwarded`, the peer is told too (over the production
    /// network, its console's API), the running copy's host first.
    pub(super) fn set_protection(&self, on: bool, forwarded: bool) -> Result<String, String> {
        let inputs = self
            .inputs
            .get()
            .ok_or_else(|| "the agent is not running yet".to_string())?;
        let (me, peer) = (self.me(), self.me().peer());
        let running = matches!(*lock(&self.vm), Vm::Running(_));
        let mut said = Vec::new();
        let tell_peer = |said: &mut Vec<String>| {
            if !forwarded {
                said.push(match forward(peer, on) {
                    Ok(m) => m,
                    Err(e) => format!("{}: not reached ({e})", peer.name()),
                });
            }
        };
        if !running {
            tell_peer(&mut said);
        }
        if on {
            let primary = if running { me } else { peer };
            self.unprotected.store(false, Ordering::SeqCst);
            inputs
                .blocking_send(Input::Protect(VmSpec {
                    vm: vm_id(),
                    level: Level::L3,
                    primary: host_id(primary),
                    secondary: host_id(primary.peer()),
                    memory_mb: (self.cfg.memory_bytes >> 20).max(1),
                }))
                .map_err(|e| e.to_string())?;
            self.event(
                &format!("protect {VM} requested (console)"),
                &format!("agent told: level 3, primary {}", primary.name()),
            );
            said.push(format!("{}: protecting {VM}", me.name()));
        } else {
            inputs
                .blocking_send(Input::Unprotect(vm_id()))
                .map_err(|e| e.to_string())?;
            self.stop_replication();
            self.event(
                &format!("unprotect {VM} requested (console)"),
                if running {
                    "agent record dropped; checkpoint stream and disk mirror stopped, the VM keeps running"
                } else {
                    "agent record dropped; replica discarded"
                },
            );
            said.push(format!("{}: {VM} unprotected", me.name()));
        }
        if running {
            tell_peer(&mut said);
        }
        Ok(said.join("; "))
    }
}

/// Tells `peer`'s node to protect or unprotect (POST to its console, marked forwarded).
pub(super) fn forward(peer: Host, on: bool) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from((peer.prod_ip(), crate::console::CONSOLE_PORT));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let path = format!(
        "/api/vm/{VM}/{}?forwarded=1",
        if on { "protect" } else { "unprotect" }
    );
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.take(64 * 1024)
        .read_to_string(&mut out)
        .map_err(|e| e.to_string())?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    if out.starts_with("HTTP/1.1 200") {
        Ok(body.to_string())
    } else {
        Err(body.to_string())
    }
}

/// The console's protect/unprotect buttons, on this node.
pub(super) struct LabControl(pub(super) Arc<Node>);

impl crate::console::Control for LabControl {
    fn set_protection(&self, on: bool, forwarded: bool) -> Result<String, String> {
        self.0.set_protection(on, forwarded)
    }
}
