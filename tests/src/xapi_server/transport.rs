//! HTTP/1.1 transport: XML-RPC on any path (xapi serves it at `/` and Xen Orchestra's client
//! posts to `/xmlrpc`), JSON-RPC 2.0 at `/jsonrpc` (xen-api `ocaml/xapi/api_server.ml`).
//!
//! Every XenAPI answer, failures included, is an HTTP 200 with the `Status`/`Value`/
//! `ErrorDescription` envelope (XML-RPC) or a JSON-RPC `error` object whose `message` is the
//! code and `data` the parameters. `system.listMethods` is answered bare: the array outside
//! any envelope over XML-RPC, as xapi's `callback` special-cases it. Content types are exactly
//! `text/xml` and `application/json`: Xen Orchestra's client picks the transport by them.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xenft_xapi::client::{failure_envelope, success_envelope};
use xenft_xapi::xmlrpc;

use super::{calls, Shared, JSONRPC_REQUESTS};

/// Largest request body the server reads.
const MAX_BODY: usize = 16 << 20;
/// Largest request head.
const MAX_HEAD: usize = 64 << 10;
/// The method whose XML-RPC reply is not enveloped.
const LIST_METHODS: &str = "system.listMethods";

pub(super) async fn serve(
    sh: Arc<Shared>,
    tcp: std::net::TcpListener,
    unix: Option<std::os::unix::net::UnixListener>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(tcp) = tokio::net::TcpListener::from_std(tcp) else {
        return;
    };
    let unix = unix.and_then(|u| tokio::net::UnixListener::from_std(u).ok());
    loop {
        tokio::select! {
            _ = &mut stop => return,
            a = tcp.accept() => {
                if let Ok((s, _)) = a {
                    let sh = sh.clone();
                    tokio::spawn(async move { let _ = connection(sh, s).await; });
                }
            }
            a = async {
                match &unix {
                    Some(u) => u.accept().await.map(|(s, _)| s),
                    None => std::future::pending().await,
                }
            } => {
                if let Ok(s) = a {
                    let sh = sh.clone();
                    tokio::spawn(async move { let _ = connection(sh, s).await; });
                }
            }
        }
    }
}

/// Serves HTTP/1.1 requests on one connection until it closes.
async fn connection<S>(sh: Arc<Shared>, mut s: S) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Read the head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_HEAD {
                return respond(&mut s, 431, "text/plain", b"head too large", true).await;
            }
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let req_line = lines.next().unwrap_or("");
        let mut parts = req_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("/").to_string();
        let mut length = 0usize;
        let mut close = req_line.ends_with("HTTP/1.0");
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                let v = v.trim();
                if k == "content-length" {
                    length = match v.parse() {
                        Ok(n) => n,
                        Err(_) => {
                            return respond(&mut s, 400, "text/plain", b"bad length", true).await
                        }
                    };
                } else if k == "connection" {
                    close = v.eq_ignore_ascii_case("close");
                }
            }
        }
        if length > MAX_BODY {
            return respond(&mut s, 413, "text/plain", b"body too large", true).await;
        }
        buf.drain(..head_end + 4);
        while buf.len() < length {
            let mut chunk = vec![0u8; (length - buf.len()).min(64 << 10)];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        if method != "POST" {
            respond(&mut s, 405, "text/plain", b"POST only", close).await?;
        } else if path == "/jsonrpc" {
            *sh.lock()
                .calls
                .entry(JSONRPC_REQUESTS.to_string())
                .or_default() += 1;
            let reply = match xenft_xapi::jsonrpc::decode_request(&body) {
                Ok((m, params, id)) => {
                    let r = calls::dispatch(&sh, &m, params).await;
                    match &r {
                        Ok(v) => xenft_xapi::jsonrpc::encode_reply(&id, Ok(v)),
                        Err((c, p)) => xenft_xapi::jsonrpc::encode_reply(&id, Err((c, p))),
                    }
                }
                Err(e) => xenft_xapi::jsonrpc::encode_reply(
                    &serde_json::Value::Null,
                    Err(("PARSE_ERROR", &[e.to_string()])),
                ),
            };
            respond(&mut s, 200, "application/json", &reply, close).await?;
        } else {
            let reply = match std::str::from_utf8(&body)
                .map_err(|e| e.to_string())
                .and_then(|t| xmlrpc::decode_call(t).map_err(|e| e.to_string()))
            {
                Ok((m, params)) => {
                    let env = match calls::dispatch(&sh, &m, params).await {
                        Ok(v) if m == LIST_METHODS => v,
                        Ok(v) => success_envelope(v),
                        Err((c, p)) => failure_envelope(&c, &p),
                    };
                    xmlrpc::encode_response(&env)
                }
                Err(e) => xmlrpc::encode_fault(-32700, &format!("parse error: {e}")),
            };
            respond(&mut s, 200, "text/xml", reply.as_bytes(), close).await?;
        }
        if close {
            return Ok(());
        }
    }
}

async fn respond<S>(
    s: &mut S,
    status: u16,
    ctype: &str,
    body: &[u8],
    close: bool,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncWrite + Unpin,
{
    let reason = if status == 200 { "OK" } else { "Error" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await
}
