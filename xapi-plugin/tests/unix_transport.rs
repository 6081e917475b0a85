//! HTTP over xapi's Unix socket (hyper): what the transport sends, which replies it accepts, and
//! the bounds it keeps (reply size, timeout). A scripted server on a socket in a temporary
//! directory answers with exact bytes, including broken and hostile replies.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use xenft_xapi::transport::{Endpoint, TlsOptions, Transport, MAX_REPLY_BYTES};
use xenft_xapi::XapiError;

/// Reads one request (headers and a Content-Length body) and returns it as text.
async fn read_request(s: &mut UnixStream) -> String {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.expect("read request");
        assert!(n > 0, "client closed before a full request");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if raw.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

/// Serves one connection: reads the request, then `reply` writes whatever it likes.
fn serve<F, Fut>(dir: &Path, reply: F) -> (PathBuf, tokio::task::JoinHandle<String>)
where
    F: FnOnce(UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let path = dir.join("xapi");
    let listener = UnixListener::bind(&path).expect("bind");
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let req = read_request(&mut s).await;
        reply(s).await;
        req
    });
    (path, task)
}

fn canned(
    bytes: &'static [u8],
) -> impl FnOnce(UnixStream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    move |mut s| {
        Box::pin(async move {
            s.write_all(bytes).await.expect("write reply");
            let _ = s.shutdown().await;
        })
    }
}

async fn post(path: &Path, timeout: Duration) -> Result<Vec<u8>, XapiError> {
    let t = Transport::new(Endpoint::Unix(path.into()), &TlsOptions::default(), timeout).unwrap();
    t.post(
        "/",
        "text/xml",
        b"<methodCall/>".to_vec(),
        "VM.get_all",
        Duration::ZERO,
    )
    .await
}

const SECS: Duration = Duration::from_secs(10);

#[tokio::test]
async fn request_is_a_post_with_type_length_and_close() {
    let dir = tempfile::tempdir().unwrap();
    let (path, server) = serve(
        dir.path(),
        canned(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    );
    assert_eq!(post(&path, SECS).await.unwrap(), b"ok");
    let req = server.await.unwrap();
    let lower = req.to_ascii_lowercase();
    assert!(req.starts_with("POST / HTTP/1.1\r\n"), "{req}");
    for h in [
        "host: localhost",
        "content-type: text/xml",
        "content-length: 13",
        "connection: close",
        "user-agent: xenft",
    ] {
        assert!(lower.contains(h), "{h} missing in {req}");
    }
    assert!(req.ends_with("\r\n\r\n<methodCall/>"), "{req}");
}

#[tokio::test]
async fn content_length_chunked_and_read_to_close_replies_are_read() {
    for (reply, want) in [
        (
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"[..],
            &b"abc"[..],
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"abcde",
        ),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end", b"to the end"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (path, _server) = serve(dir.path(), canned(reply));
        assert_eq!(post(&path, SECS).await.unwrap(), want);
    }
}

#[tokio::test]
async fn short_garbled_or_badly_chunked_replies_are_connection_errors() {
    for reply in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab"[..],
        b"garbage",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nab",
        b"",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (path, _server) = serve(dir.path(), canned(reply));
        let e = post(&path, SECS).await.unwrap_err();
        assert!(
            matches!(e, XapiError::Connect { .. }),
            "{:?}: {e:?}",
            String::from_utf8_lossy(reply)
        );
    }
}

#[tokio::test]
async fn non_2xx_status_is_an_http_error() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _server) = serve(
        dir.path(),
        canned(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"),
    );
    let e = post(&path, SECS).await.unwrap_err();
    assert!(matches!(e, XapiError::Http { status: 500, .. }), "{e:?}");
}

#[tokio::test]
async fn declared_oversize_reply_is_refused_before_its_body() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _server) = serve(dir.path(), |mut s| async move {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_REPLY_BYTES + 1
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // Never send the body: the client must not wait for it.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let e = post(&path, SECS).await.unwrap_err();
    assert!(
        matches!(e, XapiError::TooLarge { limit, .. } if limit == MAX_REPLY_BYTES),
        "{e:?}"
    );
}

#[tokio::test]
async fn streamed_oversize_reply_is_refused_at_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _server) = serve(dir.path(), |mut s| async move {
        // No length: the body runs to the close, and past the limit.
        s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..=(MAX_REPLY_BYTES >> 20) {
            if s.write_all(&chunk).await.is_err() {
                return; // the client gave up, as it should
            }
        }
    });
    let e = post(&path, Duration::from_secs(60)).await.unwrap_err();
    assert!(matches!(e, XapiError::TooLarge { .. }), "{e:?}");
}

#[tokio::test]
async fn silent_server_times_out_with_the_method_named() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _server) = serve(dir.path(), |s| async move {
        // Hold the connection open, say nothing.
        let _open = s;
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let started = Instant::now();
    let e = post(&path, Duration::from_millis(300)).await.unwrap_err();
    assert!(
        matches!(&e, XapiError::Timeout { method, .. } if method == "VM.get_all"),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn missing_socket_is_a_connection_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = post(&dir.path().join("absent"), SECS).await.unwrap_err();
    assert!(matches!(e, XapiError::Connect { .. }), "{e:?}");
}
