//! The status API: JSON status, the bounded decision log, Prometheus metrics and a
//! server-sent-events stream of decisions, over a minimal HTTP/1.1 server on tokio.
//!
//! Routes (GET only): `/status`, `/events/log`, `/metrics`, `/events` (SSE). Bound to
//! loopback by default; when a token is configured every request needs
//! `Authorization: Bearer <token>` (the config refuses a non-loopback address without one).
//! Requests are bounded (8 KiB head, 5 s to send it, 64 connections).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch, Semaphore};

use crate::core::{PeerView, VmView};
use crate::decision::{Decision, EventLog};
use crate::ids::HostId;

const MAX_HEAD: usize = 8192;

/// Counters kept by the runtime.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    /// Heartbeats sent (all paths).
    pub heartbeats_sent: u64,
    /// Heartbeats accepted.
    pub heartbeats_received: u64,
    /// Datagrams refused (bad MAC, malformed, unknown path).
    pub heartbeats_rejected: u64,
    /// Quorum requests sent.
    pub quorum_requests: u64,
    /// Quorum requests that failed.
    pub quorum_errors: u64,
    /// Commands that failed.
    pub command_errors: u64,
    /// State file writes that failed.
    pub persist_errors: u64,
}

/// What `/status` returns.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StatusSnapshot {
    /// This host.
    pub host: Option<HostId>,
    /// Agent incarnation.
    pub incarnation: u64,
    /// Peers and their paths.
    pub peers: Vec<PeerView>,
    /// Protected VMs.
    pub vms: Vec<VmView>,
    /// Quorum servers in order, with whether the last request succeeded.
    pub quorum: Vec<(String, bool)>,
    /// Counters.
    pub counters: Counters,
    /// Domains on this host (domid, name), from xenstore when the bridge runs.
    pub local_domains: Vec<(u32, String)>,
    /// Per VM, what its components report (`{"disk": {...}, "net": {...}}`), refreshed every
    /// second by the binary with real drivers: disk role, link, dirty bytes, resync progress.
    pub components: std::collections::BTreeMap<String, serde_json::Value>,
}

/// Shared between the runtime (writer) and the HTTP server (reader).
pub struct StatusHub {
    snapshot: RwLock<StatusSnapshot>,
    log: Mutex<EventLog>,
    events: broadcast::Sender<Decision>,
}

impl StatusHub {
    /// A hub keeping `log_len` decisions.
    #[must_use]
    pub fn new(log_len: usize) -> Arc<Self> {
        let (events, _) = broadcast::channel(256);
        Arc::new(Self {
            snapshot: RwLock::new(StatusSnapshot::default()),
            log: Mutex::new(EventLog::new(log_len)),
            events,
        })
    }

    /// Replaces the snapshot.
    pub fn set(&self, s: StatusSnapshot) {
        if let Ok(mut g) = self.snapshot.write() {
            *g = s;
        }
    }

    /// Updates the snapshot in place.
    pub fn update(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        if let Ok(mut g) = self.snapshot.write() {
            f(&mut g);
        }
    }

    /// The snapshot.
    #[must_use]
    pub fn snapshot(&self) -> StatusSnapshot {
        self.snapshot.read().map(|g| g.clone()).unwrap_or_default()
    }

    /// Records a decision (log and live stream).
    pub fn push(&self, d: Decision) {
        if let Ok(mut l) = self.log.lock() {
            l.push(d.clone());
        }
        let _ = self.events.send(d);
    }

    /// The kept decisions, oldest first, and the total ever recorded.
    #[must_use]
    pub fn decisions(&self) -> (Vec<Decision>, u64) {
        self.log
            .lock()
            .map(|l| (l.iter().cloned().collect(), l.total()))
            .unwrap_or_default()
    }

    /// A live subscription to decisions.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Decision> {
        self.events.subscribe()
    }

    /// Prometheus text exposition.
    #[must_use]
    pub fn metrics(&self) -> String {
        let s = self.snapshot();
        let (_, total) = self.decisions();
        let mut m = String::new();
        let _ = writeln!(m, "# TYPE xenft_agent_peer_up gauge");
        for p in &s.peers {
            let _ = writeln!(
                m,
                "xenft_agent_peer_up{{peer=\"{}\"}} {}",
                p.host,
                u8::from(!p.silent)
            );
        }
        let _ = writeln!(m, "# TYPE xenft_agent_path_up gauge");
        for p in &s.peers {
            for (path, up, _) in &p.paths {
                let _ = writeln!(
                    m,
                    "xenft_agent_path_up{{peer=\"{}\",path=\"{path}\"}} {}",
                    p.host,
                    u8::from(*up)
                );
            }
        }
        let _ = writeln!(m, "# TYPE xenft_agent_vm_running_here gauge");
        for v in &s.vms {
            let running = matches!(v.local, crate::core::LocalCopy::Running);
            let _ = writeln!(
                m,
                "xenft_agent_vm_running_here{{vm=\"{}\"}} {}",
                v.record.vm,
                u8::from(running)
            );
        }
        let _ = writeln!(m, "# TYPE xenft_agent_vm_phase gauge");
        for v in &s.vms {
            let phase = serde_json::to_value(v.record.phase)
                .ok()
                .and_then(|x| x.as_str().map(str::to_string))
                .unwrap_or_default();
            let _ = writeln!(
                m,
                "xenft_agent_vm_phase{{vm=\"{}\",phase=\"{phase}\"}} 1",
                v.record.vm
            );
        }
        let c = &s.counters;
        for (name, v) in [
            ("decisions_total", total),
            ("heartbeats_sent_total", c.heartbeats_sent),
            ("heartbeats_received_total", c.heartbeats_received),
            ("heartbeats_rejected_total", c.heartbeats_rejected),
            ("quorum_requests_total", c.quorum_requests),
            ("quorum_errors_total", c.quorum_errors),
            ("command_errors_total", c.command_errors),
            ("persist_errors_total", c.persist_errors),
        ] {
            let _ = writeln!(
                m,
                "# TYPE xenft_agent_{name} counter\nxenft_agent_{name} {v}"
            );
        }
        m
    }
}

/// The running HTTP server.
pub struct StatusServer {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusServer {
    /// Binds and serves `hub`.
    ///
    /// # Errors
    /// The bind error.
    pub async fn start(
        listen: SocketAddr,
        token: Option<String>,
        hub: Arc<StatusHub>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (shutdown, rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(64));
        let token = Arc::new(token);
        let task = tokio::spawn(async move {
            let mut stop = rx.clone();
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    acc = listener.accept() => {
                        let Ok((sock, _)) = acc else { continue };
                        let Ok(permit) = limit.clone().try_acquire_owned() else { continue };
                        let (hub, token, mut stop) = (hub.clone(), token.clone(), rx.clone());
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = serve(sock, &hub, token.as_deref()) => {}
                                _ = stop.changed() => {}
                            }
                            drop(permit);
                        });
                    }
                }
            }
        });
        Ok(Self {
            addr,
            shutdown,
            task,
        })
    }

    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_head(sock: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return String::from_utf8(buf).ok();
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
    }
}

async fn respond(sock: &mut TcpStream, status: &str, ctype: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    );
    let _ = sock.write_all(head.as_bytes()).await;
    let _ = sock.write_all(body.as_bytes()).await;
    let _ = sock.shutdown().await;
}

async fn serve(mut sock: TcpStream, hub: &StatusHub, token: Option<&str>) {
    let Ok(Some(head)) = tokio::time::timeout(Duration::from_secs(5), read_head(&mut sock)).await
    else {
        return;
    };
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if let Some(token) = token {
        let authorized = lines.any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("authorization")
                    && v.trim()
                        .strip_prefix("Bearer ")
                        .is_some_and(|t| ct_eq(t.trim().as_bytes(), token.as_bytes()))
            })
        });
        if !authorized {
            respond(
                &mut sock,
                "401 Unauthorized",
                "text/plain",
                "token required\n",
            )
            .await;
            return;
        }
    }
    if method != "GET" {
        respond(
            &mut sock,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
        return;
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/status" => {
            #[derive(Serialize)]
            struct Doc {
                #[serde(flatten)]
                snapshot: StatusSnapshot,
                last_decisions: Vec<Decision>,
            }
            let (log, _) = hub.decisions();
            let last = log.len().saturating_sub(50);
            let doc = Doc {
                snapshot: hub.snapshot(),
                last_decisions: log[last..].to_vec(),
            };
            let body = serde_json::to_string_pretty(&doc).unwrap_or_default();
            respond(&mut sock, "200 OK", "application/json", &body).await;
        }
        "/events/log" => {
            let (log, total) = hub.decisions();
            let body = serde_json::json!({ "total": total, "events": log }).to_string();
            respond(&mut sock, "200 OK", "application/json", &body).await;
        }
        "/metrics" => {
            respond(
                &mut sock,
                "200 OK",
                "text/plain; version=0.0.4",
                &hub.metrics(),
            )
            .await;
        }
        "/events" => sse(sock, hub).await,
        _ => respond(&mut sock, "404 Not Found", "text/plain", "not found\n").await,
    }
}

async fn sse(mut sock: TcpStream, hub: &StatusHub) {
    let mut rx = hub.subscribe();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: keep-alive\r\n\r\n: xenft decisions\n\n";
    if sock.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await;
        let chunk = match msg {
            Err(_) => ": keepalive\n\n".to_string(),
            Ok(Ok(d)) => format!(
                "event: decision\ndata: {}\n\n",
                serde_json::to_string(&d).unwrap_or_default()
            ),
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                format!("event: lagged\ndata: {n}\n\n")
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => return,
        };
        if sock.write_all(chunk.as_bytes()).await.is_err() {
            return;
        }
    }
}
