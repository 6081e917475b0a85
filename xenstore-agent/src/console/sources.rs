//! Where a console's snapshot comes from: this agent's status hub (with what its VMs'
//! components report, `drivers::publish_reports`), the registry in the pool's xapi (read through the
//! follower's session, at most every [`REGISTRY_EVERY`], the last good read kept while xapi
//! is unreachable), and the other hosts' consoles over the management network
//! (`GET /api/local`, each at most [`PEER_WAIT`]). A host that is down costs one timeout, in
//! parallel with the others: the page stays live.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use xenft_xapi::XenApi;

use super::snapshot::{registry_view, RegistryView};
use crate::status::StatusHub;
use crate::xapi::desired::Desired;

/// How often the registry's VM list is read again.
pub const REGISTRY_EVERY: Duration = Duration::from_secs(2);
/// Longest wait for another host's console.
pub const PEER_WAIT: Duration = Duration::from_millis(800);
/// Largest answer accepted from another console.
const MAX_PEER_ANSWER: u64 = 4 << 20;
/// Decisions a console passes on to the others.
const DECISIONS: usize = 50;

/// What this host's agent says, as the consoles exchange it (`GET /api/local`).
#[must_use]
pub fn local_view(
    me: &str,
    hub: &StatusHub,
    components: &BTreeMap<String, Value>,
    expected_failover_ms: u64,
) -> Value {
    let s = hub.snapshot();
    let (log, _) = hub.decisions();
    let from = log.len().saturating_sub(DECISIONS);
    json!({
        "host": me,
        "incarnation": s.incarnation,
        "peers": s.peers,
        "vms": s.vms,
        "quorum": s.quorum,
        "counters": s.counters,
        "decisions": log[from..],
        "components": components,
        "expected_failover_ms": expected_failover_ms,
    })
}

/// The registry, read through the follower.
pub struct Registry {
    desired: watch::Receiver<Option<Arc<Desired>>>,
    api: watch::Receiver<Option<Arc<XenApi>>>,
    last: tokio::sync::Mutex<Option<(Instant, RegistryView)>>,
}

impl Registry {
    /// Over the follower's desired state and session.
    #[must_use]
    pub fn new(
        desired: watch::Receiver<Option<Arc<Desired>>>,
        api: watch::Receiver<Option<Arc<XenApi>>>,
    ) -> Self {
        Self {
            desired,
            api,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The registry as last read (again when older than [`REGISTRY_EVERY`]); when xapi
    /// cannot be read, the last good view with the reason.
    pub async fn view(&self) -> RegistryView {
        let mut last = self.last.lock().await;
        if let Some((at, v)) = last.as_ref() {
            if at.elapsed() < REGISTRY_EVERY {
                return v.clone();
            }
        }
        let desired = self.desired.borrow().clone();
        let api = self.api.borrow().clone();
        let read = match (&desired, &api) {
            (None, _) => Err("the registry has not been read from xapi yet".to_string()),
            (_, None) => Err("xapi is unreachable".to_string()),
            (Some(_), Some(api)) => {
                match tokio::time::timeout(Duration::from_secs(3), api.vm_get_all_records()).await {
                    Ok(Ok(vms)) => Ok(vms),
                    Ok(Err(e)) => Err(format!("xapi: {e}")),
                    Err(_) => Err("xapi did not answer within 3 s".into()),
                }
            }
        };
        let read = match (read, desired) {
            (Ok(vms), Some(d)) => Ok(registry_view(&d, &vms)),
            (Ok(_), None) => Err("the registry has not been read from xapi yet".to_string()),
            (Err(why), _) => Err(why),
        };
        let view = match read {
            Ok(v) => v,
            Err(why) => {
                let mut v = last.as_ref().map(|(_, v)| v.clone()).unwrap_or_default();
                if v.hosts.is_empty() {
                    if let Some(d) = self.desired.borrow().clone() {
                        v = registry_view(&d, &BTreeMap::new());
                    }
                }
                v.problem = Some(format!("VM list not current: {why}"));
                v
            }
        };
        *last = Some((Instant::now(), view.clone()));
        view
    }
}

/// The console URL of a host at `address` (IPv6 in brackets).
#[must_use]
pub fn console_url(address: &str, port: u16) -> String {
    if address.contains(':') && !address.starts_with('[') {
        format!("http://[{address}]:{port}/")
    } else {
        format!("http://{address}:{port}/")
    }
}

/// `GET /api/local` from the console at `address:port` with `session`; the view, or why not.
pub async fn fetch_peer(address: &str, port: u16, session: &str) -> Result<Value, String> {
    let host = if address.contains(':') && !address.starts_with('[') {
        format!("[{address}]")
    } else {
        address.to_string()
    };
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(format!("{host}:{port}"))
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            "GET /api/local HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {session}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        (&mut s)
            .take(MAX_PEER_ANSWER)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(PEER_WAIT, fetch)
        .await
        .map_err(|_| format!("no answer within {} ms", PEER_WAIT.as_millis()))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "not an HTTP answer".to_string())?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!(
            "answered {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("unreadable answer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_urls_bracket_ipv6() {
        assert_eq!(console_url("10.0.0.1", 8080), "http://10.0.0.1:8080/");
        assert_eq!(console_url("fd00::1", 80), "http://[fd00::1]:80/");
    }

    #[tokio::test]
    async fn a_peer_that_is_not_there_is_an_error_not_a_hang() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let t = Instant::now();
        assert!(fetch_peer("127.0.0.1", port, "s").await.is_err());
        // A peer that accepts and never answers costs one timeout.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let e = fetch_peer("127.0.0.1", port, "s").await.unwrap_err();
        assert!(e.contains("no answer"), "{e}");
        assert!(t.elapsed() < PEER_WAIT * 3);
    }

    #[tokio::test]
    async fn a_peer_refusing_or_babbling_is_an_error() {
        for answer in [
            "HTTP/1.1 401 Unauthorized\r\n\r\n",
            "garbage",
            "HTTP/1.1 200 OK\r\n\r\n{not json",
        ] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            let a = answer.to_string();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(a.as_bytes()).await;
            });
            assert!(
                fetch_peer("127.0.0.1", port, "s").await.is_err(),
                "{answer}"
            );
        }
    }
}
