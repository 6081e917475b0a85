//! The availability console: a page served by every host on its production address
//! (`http://10.200.0.1:8080/`, `http://10.200.0.2:8080/`).
//!
//! Plain HTML/CSS/JS compiled into the binary (`console.html`): no build step, no npm, no CDN,
//! nothing for an operator to install, and it works in an air-gapped pool. The page subscribes
//! to `/api/events` (server-sent events, one pool snapshot every 500 ms) and, when the host it
//! talks to stops answering, reconnects to the next host in the snapshot's `consoles` list —
//! so it keeps showing the outage while it happens. `/api/state` returns one snapshot.
//!
//! In the lab the snapshot is assembled from the state directory that every host process shares: the
//! hosts' status files (each carries its agent's view: phase, generation, lease, paths) and
//! the event log (every agent decision with its reason, plus the hosts' own events).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::now_ms;
use crate::pool::lab_timing;
use crate::pool::{node_status, protected_primary};
use crate::state::{NodeRole, StateDir};
use crate::topology::Host;

/// The protect/unprotect actions of the page, carried out by the host serving it.
pub trait Control: Send + Sync {
    /// Protects (`on`) or unprotects the VM; `forwarded` when another host already handled
    /// the request and passes it on. Returns what was done, or why not.
    ///
    /// # Errors
    /// The reason, in words.
    fn set_protection(&self, on: bool, forwarded: bool) -> Result<String, String>;
}

/// Port of the console on each host's production address.
pub const CONSOLE_PORT: u16 = 8080;
const PAGE: &str = include_str!("console.html");
const MAX_REQUEST: usize = 8 * 1024;

/// The console URL of `h`.
#[must_use]
pub fn url(h: Host) -> String {
    format!("http://{}:{CONSOLE_PORT}/", h.prod_ip())
}

/// One snapshot of the pool, as the page shows it.
#[must_use]
pub fn snapshot(dir: &StateDir, served_by: Host) -> Value {
    let hosts: Vec<Value> = [Host::Host1, Host::Host2]
        .into_iter()
        .map(|h| match node_status(dir, h) {
            Ok(Some(s)) => json!({
                "name": h.name(), "up": true, "role": s.role, "serving": s.serving,
                "alinks": s.link.paths.iter().enumerate().map(|(i, p)| json!({
                    "name": format!("alink{}", i + 1), "up": p.up, "rtt_ms": p.rtt_ms,
                })).collect::<Vec<_>>(),
                "disk_state": s.disk_state, "disk": s.disk,
                "checkpoint": s.checkpoint, "takeover": s.takeover,
                "agent": s.agent,
            }),
            _ => json!({"name": h.name(), "up": false}),
        })
        .collect();
    let statuses: Vec<_> = [Host::Host1, Host::Host2]
        .into_iter()
        .filter_map(|h| node_status(dir, h).ok().flatten())
        .collect();
    let running = statuses.iter().find(|s| s.role == NodeRole::Primary);
    let fenced = statuses.iter().find(|s| s.role == NodeRole::Fenced);
    let (state, runs_on) = match (protected_primary(dir).ok().flatten(), running, fenced) {
        (Some(p), _, _) => ("protected".to_string(), p.name()),
        (None, Some(r), _) => (
            match r.agent.phase.as_str() {
                "" => "unprotected".to_string(),
                "failed-over" => "running unprotected (failed over)".to_string(),
                "syncing" | "resyncing" => format!("running, {}", r.agent.phase),
                p => format!("running, protection {p}"),
            },
            r.host.name(),
        ),
        (None, None, Some(f)) => ("fenced (paused)".to_string(), f.host.name()),
        _ => ("unknown".to_string(), "-"),
    };
    let (lag, age) = running.map_or((None, None), |a| {
        (
            Some(a.checkpoint.lag_bytes),
            a.checkpoint.last_commit_age_ms,
        )
    });
    let resync = running
        .and_then(|a| a.disk.get("resync").cloned())
        .unwrap_or(Value::Null);
    let t = lab_timing();
    let expected_failover_ms = statuses
        .iter()
        .map(|s| s.agent.expected_failover_ms)
        .find(|v| *v > 0)
        .unwrap_or(t.peer_dead_ms.max(t.lease_ms) + t.heartbeat_ms);
    let events = dir
        .events_since(now_ms().saturating_sub(3_600_000))
        .unwrap_or_default();
    let events: Vec<_> = events.iter().rev().take(40).collect();
    let acks = dir.acks().unwrap_or_default();
    json!({
        "served_by": served_by.name(),
        "consoles": [url(Host::Host1), url(Host::Host2)],
        "now_ms": now_ms(),
        "pool": {"name": "xenft lab pool", "hosts": hosts},
        "vms": [{
            "name": "vm1", "level": 3, "state": state, "runs_on": runs_on,
            "rpo_bytes": lag, "last_commit_age_ms": age,
            "expected_failover_ms": expected_failover_ms,
            "disk_resync": resync,
            "protected_by_agent": statuses.iter().any(|s| !s.agent.phase.is_empty()),
        }],
        "client": {
            "acked_writes": acks.len(),
            "last_ack_age_ms": acks.last().map(|a| now_ms().saturating_sub(a.1)),
        },
        "events": events,
    })
}

/// The page with `snap` embedded for the first paint (`</` escaped so that no string in the
/// snapshot can close the script element).
#[must_use]
pub fn page(snap: &Value) -> String {
    let json = snap.to_string().replace("</", "<\\/");
    PAGE.replace("/*INITIAL*/null", &json)
}

/// This host's agent status, read from its status API (`GET /status` on loopback; reading
/// needs no token there, only changes would).
async fn agent_status() -> Value {
    let fetch = async {
        let mut s = TcpStream::connect(("127.0.0.1", crate::topology::STATUS_PORT)).await?;
        let req = "GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.take(4 << 20).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    match tokio::time::timeout(Duration::from_millis(500), fetch).await {
        Ok(Ok(buf)) => {
            let text = String::from_utf8_lossy(&buf);
            text.split_once("\r\n\r\n")
                .and_then(|(_, body)| serde_json::from_str(body).ok())
                .unwrap_or(Value::Null)
        }
        _ => Value::Null,
    }
}

/// The snapshot plus this host's agent status (from its status API).
async fn full_snapshot(dir: &StateDir, me: Host) -> Value {
    let mut snap = snapshot(dir, me);
    snap["agent"] = agent_status().await;
    snap
}

async fn reply(s: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    let h = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nAccess-Control-Allow-Origin: *\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(h.as_bytes()).await?;
    s.write_all(body.as_bytes()).await
}

async fn handle(
    mut s: TcpStream,
    dir: StateDir,
    me: Host,
    ctl: Arc<dyn Control>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        if n == buf.len() {
            return s
                .write_all(b"HTTP/1.1 431 Too Large\r\nConnection: close\r\n\r\n")
                .await;
        }
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            return Ok(());
        }
        n += r;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let cors = "Access-Control-Allow-Origin: *\r\nCache-Control: no-cache\r\n";
    match (method, path) {
        ("POST", p) if p.starts_with("/api/vm/vm1/") => {
            let (action, query) = p["/api/vm/vm1/".len()..]
                .split_once('?')
                .unwrap_or((&p["/api/vm/vm1/".len()..], ""));
            let on = match action {
                "protect" => true,
                "unprotect" => false,
                _ => return reply(&mut s, "404 Not Found", "text/plain", "unknown action").await,
            };
            let forwarded = query == "forwarded=1";
            let r = tokio::task::spawn_blocking(move || ctl.set_protection(on, forwarded)).await;
            match r {
                Ok(Ok(msg)) => reply(&mut s, "200 OK", "text/plain", &msg).await,
                Ok(Err(e)) => reply(&mut s, "409 Conflict", "text/plain", &e).await,
                Err(e) => {
                    reply(
                        &mut s,
                        "500 Internal Server Error",
                        "text/plain",
                        &e.to_string(),
                    )
                    .await
                }
            }
        }
        ("GET", "/") => {
            let page = page(&full_snapshot(&dir, me).await);
            let h = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n{cors}Connection: close\r\n\r\n",
                page.len()
            );
            s.write_all(h.as_bytes()).await?;
            s.write_all(page.as_bytes()).await
        }
        ("GET", "/api/state") => {
            let body = full_snapshot(&dir, me).await.to_string();
            let h = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{cors}Connection: close\r\n\r\n",
                body.len()
            );
            s.write_all(h.as_bytes()).await?;
            s.write_all(body.as_bytes()).await
        }
        ("GET", "/api/events") => {
            let h = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{cors}Connection: keep-alive\r\n\r\n"
            );
            s.write_all(h.as_bytes()).await?;
            loop {
                let msg = format!("data: {}\n\n", full_snapshot(&dir, me).await);
                s.write_all(msg.as_bytes()).await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        _ => {
            s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await
        }
    }
}

/// Serves the console on this host's production address until the listener fails.
pub async fn serve(dir: StateDir, me: Host, ctl: Arc<dyn Control>) {
    let Ok(l) = TcpListener::bind((me.prod_ip(), CONSOLE_PORT)).await else {
        tracing::warn!("cannot bind the console port");
        return;
    };
    while let Ok((s, _)) = l.accept().await {
        let d = dir.clone();
        let c = Arc::clone(&ctl);
        tokio::spawn(async move {
            let _ = handle(s, d, me, c).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_snapshot_cannot_close_the_script() {
        let p = page(&json!({"events": [{"what": "</script><script>alert(1)</script>"}]}));
        assert!(!p.contains("</script><script>alert"));
        assert!(p.contains(r"<\/script>"));
        assert!(!p.contains("/*INITIAL*/null"));
    }
}
