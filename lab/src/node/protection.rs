//! Protect / unprotect from the console: through this host's agent status API (the
//! product's `POST /vm/<vm>/protect` / `unprotect`), then the peer is told.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::topology::{Host, STATUS_PORT};

use super::vm::Vm;
use super::{lock, Node, VM};

impl Node {
    /// Protect (`on`) or unprotect the VM on this host: the agent gets the input, the
    /// components follow. Unless `forwarded`, the peer is told too (over the production
    /// network, its console's API), the running copy's host first.
    pub(super) fn set_protection(&self, on: bool, forwarded: bool) -> Result<String, String> {
        if self.hub.get().is_none() {
            return Err("the agent is not running yet".to_string());
        }
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
            self.agent_post(
                "protect",
                &serde_json::json!({
                    "level": 3,
                    "primary": primary.name(),
                    "secondary": primary.peer().name(),
                }),
            )?;
            self.event(
                &format!("protect {VM} requested (console)"),
                &format!("agent told: level 3, primary {}", primary.name()),
            );
            said.push(format!("{}: protecting {VM}", me.name()));
        } else {
            self.agent_post("unprotect", &serde_json::json!({}))?;
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

impl Node {
    /// `POST /vm/<VM>/<action>` on this host's agent status API (with its token); the
    /// agent's reason when it refuses.
    fn agent_post(&self, action: &str, body: &serde_json::Value) -> Result<(), String> {
        use std::io::{Read, Write};
        let token = super::agent_token(&self.cfg.dir, self.me())
            .ok_or_else(|| "this host's agent token is missing".to_string())?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], STATUS_PORT));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("agent status API: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let body = body.to_string();
        write!(
            s,
            "POST /vm/{VM}/{action} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.take(64 * 1024)
            .read_to_string(&mut out)
            .map_err(|e| e.to_string())?;
        if out.starts_with("HTTP/1.1 200") {
            return Ok(());
        }
        let answer = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
        let reason = serde_json::from_str::<serde_json::Value>(answer)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| answer.to_string());
        Err(format!("the agent refused to {action} {VM}: {reason}"))
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
