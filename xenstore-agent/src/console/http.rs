//! The console's HTTP/1.1 requests and answers: bounded (8 KiB head, 4 KiB body, 5 s to send
//! them), parsed without panicking on any input.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest request head.
pub const MAX_HEAD: usize = 8192;
/// Longest request body (a login form, a protect request).
pub const MAX_BODY: usize = 4096;
/// Time to send a whole request.
pub const REQUEST_TIME: Duration = Duration::from_secs(5);

/// A parsed request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string (after `?`), if any.
    pub query: String,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    /// The first header named `name` (lower case).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The bearer credential of the `Authorization` header.
    #[must_use]
    pub fn bearer(&self) -> Option<&str> {
        self.header("authorization")?
            .strip_prefix("Bearer ")
            .map(str::trim)
    }

    /// The value of cookie `name`.
    #[must_use]
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "cookie")
            .flat_map(|(_, v)| v.split(';'))
            .find_map(|c| {
                c.trim()
                    .split_once('=')
                    .filter(|(k, _)| *k == name)
                    .map(|(_, v)| v.trim())
            })
    }
}

/// Why a request is refused before it is routed: the status line and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub u16, pub String);

/// Parses a request head (up to and without the blank line).
///
/// # Errors
/// [`Refusal`] for a malformed request line or header.
pub fn parse_head(head: &[u8]) -> Result<Request, Refusal> {
    let text = std::str::from_utf8(head)
        .map_err(|_| Refusal(400, "the request head is not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, target, version) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
        || !version.starts_with("HTTP/1.")
        || parts.next().is_some()
    {
        return Err(Refusal(400, format!("bad request line {line:?}")));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| Refusal(400, format!("bad header line {l:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok(Request {
        method: method.into(),
        path: path.into(),
        query: query.into(),
        headers,
        body: Vec::new(),
    })
}

/// Reads one request (head and body), bounded in size; the caller bounds the time.
///
/// # Errors
/// [`Refusal`] naming the problem; `None` inside when the peer closed before a request.
pub async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Result<Option<Request>, Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(Refusal(
                431,
                format!("the request head is limited to {MAX_HEAD} bytes"),
            ));
        }
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| Refusal(400, e.to_string()))?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(Refusal(400, "the request ended in its head".into()))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if end > MAX_HEAD {
        return Err(Refusal(
            431,
            format!("the request head is limited to {MAX_HEAD} bytes"),
        ));
    }
    let mut req = parse_head(&buf[..end])?;
    let mut body = buf.split_off(end + 4);
    if req.header("transfer-encoding").is_some() {
        return Err(Refusal(411, "send the body with a Content-Length".into()));
    }
    let len = match req.header("content-length") {
        None => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| Refusal(400, format!("bad Content-Length {v:?}")))?,
    };
    if len > MAX_BODY || body.len() > MAX_BODY {
        return Err(Refusal(
            413,
            format!("the body is limited to {MAX_BODY} bytes"),
        ));
    }
    while body.len() < len {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| Refusal(400, e.to_string()))?;
        if n == 0 {
            return Err(Refusal(
                400,
                "the body ended before its Content-Length".into(),
            ));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    req.body = body;
    Ok(Some(req))
}

/// `application/x-www-form-urlencoded` pairs (a login form), decoded; malformed escapes
/// make the pair's value `None`.
#[must_use]
pub fn form(body: &[u8]) -> Vec<(String, Option<String>)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                url_decode(k).unwrap_or_default(),
                url_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

/// `%XX` escapes decoded; `None` for a malformed escape or non-UTF-8.
#[must_use]
pub fn url_decode(s: &str) -> Option<String> {
    crate::status::percent_decode(s)
}

/// The reason phrase of a status code.
#[must_use]
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Content type.
    pub ctype: &'static str,
    /// Extra header lines (`Name: value`).
    pub headers: Vec<String>,
    /// Body.
    pub body: String,
}

impl Answer {
    /// An answer with no extra headers.
    #[must_use]
    pub fn new(status: u16, ctype: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            ctype,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A JSON answer.
    #[must_use]
    pub fn json(status: u16, v: &serde_json::Value) -> Self {
        Self::new(status, "application/json", v.to_string())
    }

    /// `{"error": why}`.
    #[must_use]
    pub fn error(status: u16, why: impl std::fmt::Display) -> Self {
        Self::json(status, &serde_json::json!({ "error": why.to_string() }))
    }

    /// With one more header line.
    #[must_use]
    pub fn with(mut self, header: String) -> Self {
        self.headers.push(header);
        self
    }

    /// Writes the answer and closes the connection.
    pub async fn send<S: AsyncWrite + Unpin>(&self, s: &mut S) {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
             Access-Control-Allow-Origin: *\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.ctype,
            self.body.len()
        );
        for h in &self.headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let _ = s.write_all(head.as_bytes()).await;
        let _ = s.write_all(self.body.as_bytes()).await;
        let _ = s.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> Result<Option<Request>, Refusal> {
        let mut r = bytes;
        read_request(&mut r).await
    }

    #[tokio::test]
    async fn a_request_with_headers_cookies_and_body_is_read() {
        let r = read(
            b"POST /login?x=1 HTTP/1.1\r\nHost: h\r\nCookie: a=1; xenft_session=abc\r\nAuthorization: Bearer t0k\r\nContent-Length: 5\r\n\r\nhello+more",
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.query.as_str()),
            ("POST", "/login", "x=1")
        );
        assert_eq!(r.cookie("xenft_session"), Some("abc"));
        assert_eq!(r.bearer(), Some("t0k"));
        assert_eq!(r.body, b"hello");
    }

    #[tokio::test]
    async fn oversized_or_malformed_requests_are_refused_with_the_reason() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(read(big.as_bytes()).await.unwrap_err().0, 431);
        let body = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(read(body.as_bytes()).await.unwrap_err().0, 413);
        for bad in [
            &b"GET\r\n\r\n"[..],
            b"get / HTTP/1.1\r\n\r\n",
            b"GET nopath HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\r\n\xff\xfe: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost",
        ] {
            assert!(
                read(bad).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(read(b"").await.unwrap(), None);
    }

    #[test]
    fn form_values_are_decoded_and_bad_escapes_are_none() {
        let f = form(b"user=root&password=a%26b+c&bad=%zz&&x");
        assert_eq!(f[0], ("user".into(), Some("root".into())));
        assert_eq!(f[1], ("password".into(), Some("a&b c".into())));
        assert_eq!(f[2], ("bad".into(), None));
        assert_eq!(f[3], ("x".into(), Some(String::new())));
        assert_eq!(url_decode("%e9"), None);
        assert_eq!(url_decode("%"), None);
    }
}
