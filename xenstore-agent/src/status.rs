//! The status API: JSON status, the bounded decision log, Prometheus metrics and a
//! server-sent-events stream of decisions, over a minimal HTTP/1.1 server on tokio.
//!
//! Routes: `GET /status`, `/events/log`, `/metrics`, `/events` (SSE); with a
//! [`ProtectionApi`] also `POST /vm/<vm>/protect` (`{"level": 1|2|3, "secondary": "<host>"}`)
//! and `POST /vm/<vm>/unprotect`, which change state and so answer only when a token is
//! configured. Bound to loopback by default; when a token is configured every request needs
//! `Authorization: Bearer <token>` (the config refuses a non-loopback address without one).
//! Requests are bounded (8 KiB head, 4 KiB body, 5 s to send them, 64 connections).

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
use crate::protection_api::{Action, Answer, ProtectionApi};

const MAX_HEAD: usize = 8192;
/// Longest accepted request body (protect / unprotect).
pub const MAX_BODY: usize = 4096;

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
        Self::start_with_protection(listen, token, hub, None).await
    }

    /// Binds and serves `hub`, and protect / unprotect through `protection`.
    ///
    /// # Errors
    /// The bind error.
    pub async fn start_with_protection(
        listen: SocketAddr,
        token: Option<String>,
        hub: Arc<StatusHub>,
        protection: Option<Arc<ProtectionApi>>,
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
                        let protection = protection.clone();
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = serve(sock, &hub, token.as_deref(), protection.as_deref()) => {}
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

/// Constant-time equality of two secrets (the length is not secret).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The request head (up to the blank line) and the body bytes read with it.
async fn read_head(sock: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return String::from_utf8(buf).ok().map(|h| (h, rest));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
    }
}

/// A header's value (the first of that name).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        l.split_once(':')
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    })
}

/// The body of a request whose head is `head` (`rest`: what came with the head), bounded by
/// [`MAX_BODY`].
async fn read_body(sock: &mut TcpStream, head: &str, mut rest: Vec<u8>) -> Result<Vec<u8>, Answer> {
    if header(head, "transfer-encoding").is_some() {
        return Err(Answer::error(411, "send the body with a Content-Length"));
    }
    let len = match header(head, "content-length") {
        None => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| Answer::error(400, format!("bad Content-Length {v:?}")))?,
    };
    if len > MAX_BODY || rest.len() > MAX_BODY {
        return Err(Answer::error(
            413,
            format!("the body is limited to {MAX_BODY} bytes"),
        ));
    }
    let mut chunk = [0u8; 1024];
    while rest.len() < len {
        let n = sock
            .read(&mut chunk)
            .await
            .map_err(|e| Answer::error(400, format!("reading the body: {e}")))?;
        if n == 0 {
            return Err(Answer::error(
                400,
                "the body ended before its Content-Length",
            ));
        }
        rest.extend_from_slice(&chunk[..n]);
    }
    rest.truncate(len);
    Ok(rest)
}

/// `%XX` escapes of a path segment decoded; `None` for a malformed one or non-UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `/vm/<vm>/protect` or `/vm/<vm>/unprotect`.
fn protection_route(path: &str) -> Option<(Action, &str)> {
    let rest = path.strip_prefix("/vm/")?;
    let (vm, action) = rest.rsplit_once('/')?;
    let action = match action {
        "protect" => Action::Protect,
        "unprotect" => Action::Unprotect,
        _ => return None,
    };
    (!vm.is_empty() && !vm.contains('/')).then_some((action, vm))
}

async fn respond_json(sock: &mut TcpStream, a: &Answer) {
    let status = match a.status {
        200 => "200 OK",
        400 => "400 Bad Request",
        403 => "403 Forbidden",
        404 => "404 Not Found",
        405 => "405 Method Not Allowed",
        409 => "409 Conflict",
        411 => "411 Length Required",
        413 => "413 Payload Too Large",
        502 => "502 Bad Gateway",
        503 => "503 Service Unavailable",
        _ => "500 Internal Server Error",
    };
    let body = format!("{}\n", a.body);
    respond(sock, status, "application/json", &body).await;
}

/// `POST /vm/<vm>/{protect,unprotect}` (the token was checked).
async fn serve_protection(
    sock: &mut TcpStream,
    method: &str,
    head: &str,
    rest: Vec<u8>,
    route: (Action, &str),
    api: Option<&ProtectionApi>,
    token: Option<&str>,
) {
    let answer = match (method, api, token) {
        ("POST", Some(api), Some(_)) => match percent_decode(route.1) {
            None => Answer::error(400, format!("bad VM name in the path: {:?}", route.1)),
            // The body must come within 5 s too; the operation itself is not cut short.
            Some(vm) => {
                match tokio::time::timeout(Duration::from_secs(5), read_body(sock, head, rest))
                    .await
                {
                    Ok(Ok(body)) => api.handle(route.0, &vm, &body).await,
                    Ok(Err(a)) => a,
                    Err(_) => Answer::error(400, "the body did not come within 5 s"),
                }
            }
        },
        ("POST", Some(_), None) => Answer::error(
            403,
            "protect and unprotect need the status API's token (status.token_file)",
        ),
        ("POST", None, _) => Answer::error(404, "this agent serves no protect / unprotect"),
        _ => Answer::error(405, "POST only"),
    };
    respond_json(sock, &answer).await;
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

async fn serve(
    mut sock: TcpStream,
    hub: &StatusHub,
    token: Option<&str>,
    protection: Option<&ProtectionApi>,
) {
    let Ok(Some((head, rest))) =
        tokio::time::timeout(Duration::from_secs(5), read_head(&mut sock)).await
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
    let path = target.split('?').next().unwrap_or("");
    if let Some(route) = protection_route(path) {
        serve_protection(&mut sock, method, &head, rest, route, protection, token).await;
        return;
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
