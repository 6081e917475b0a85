//! How request bytes reach xapi: HTTP(S) with reqwest, or HTTP/1.1 with hyper over xapi's Unix
//! socket.
//!
//! wire-protocol.md, "Transport Layer": HTTP/HTTPS for remote administration, HTTP over Unix
//! domain sockets (`/var/lib/xcp/xapi` in dom0) for local administration. reqwest 0.12 has no
//! Unix socket support, so [`Endpoint::Unix`] hands a tokio `UnixStream` to hyper's HTTP/1.1
//! client connection (`hyper::client::conn::http1`): one request per connection,
//! `Connection: close`, and hyper reads Content-Length, chunked or read-to-close replies.
//!
//! Bounds, the same for both transports: every call is limited by the transport's timeout
//! (plus the caller's extra time for long polls), connecting included; a reply body larger
//! than [`MAX_REPLY_BYTES`] is refused as [`XapiError::TooLarge`] as soon as it is seen
//! (from its Content-Length, or while it streams), and hyper bounds the reply headers; a
//! non-2xx status is [`XapiError::Http`]; a reply cut short is [`XapiError::Connect`].
//!
//! TLS: certificates are verified against the system roots, or only against `ca_file` when one
//! is given. `pin_sha256` instead accepts exactly the certificate with that SHA-256 fingerprint
//! (`openssl x509 -noout -fingerprint -sha256 -in /etc/xensource/xapi-ssl.pem`), which suits
//! xapi's self-signed certificates: the handshake signature is still verified, only the chain
//! and host name checks are replaced by the fingerprint. `insecure` turns verification off and
//! is logged at `warn` on every connection setup; it is never a default.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::XapiError;

/// Largest reply body accepted (a large pool's `VM.get_all_records` is tens of MiB).
pub const MAX_REPLY_BYTES: usize = 256 << 20;

/// The xapi socket in dom0.
pub const XAPI_UNIX_SOCKET: &str = "/var/lib/xcp/xapi";

/// Where xapi listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `http://` or `https://` base URL.
    Http(String),
    /// Path of a Unix socket.
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `http(s)://host[:port][/]`, `unix:/path` or an absolute socket path.
    pub fn parse(s: &str) -> Result<Endpoint, XapiError> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            let u = reqwest::Url::parse(s)
                .map_err(|e| XapiError::Config(format!("bad URL {s:?}: {e}")))?;
            if u.host_str().is_none() {
                return Err(XapiError::Config(format!("URL {s:?} has no host")));
            }
            return Ok(Endpoint::Http(s.trim_end_matches('/').to_string()));
        }
        Err(XapiError::Config(format!(
            "xapi address {s:?} is neither http(s)://host, unix:/path nor an absolute socket path"
        )))
    }

    fn target(&self) -> String {
        match self {
            Endpoint::Http(u) => u.clone(),
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}

/// TLS trust settings for `https://` endpoints.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM file of trusted certificates; when set, the system roots are not used.
    pub ca_file: Option<PathBuf>,
    /// Accept only the certificate with this SHA-256 fingerprint (hex, colons allowed).
    pub pin_sha256: Option<String>,
    /// Accept any certificate. Explicit only; logged loudly.
    pub insecure: bool,
}

/// Parses a SHA-256 fingerprint: 64 hex digits, optionally separated by colons, optionally
/// prefixed as `openssl` prints it (`sha256 Fingerprint=`).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], XapiError> {
    let s = s.rsplit('=').next().unwrap_or(s);
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let bad = || {
        XapiError::Config(format!(
            "certificate fingerprint {s:?} is not 64 hex digits"
        ))
    };
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(out)
}

/// Accepts exactly one certificate, by SHA-256 fingerprint; handshake signatures are verified.
#[derive(Debug)]
struct PinnedCert {
    sha256: [u8; 32],
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if got == self.sha256 {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "xapi's certificate does not match the pinned SHA-256 fingerprint".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn pinned_tls(pin: &str) -> Result<rustls::ClientConfig, XapiError> {
    let sha256 = parse_fingerprint(pin)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| XapiError::Config(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(PinnedCert { sha256, provider }))
        .with_no_client_auth();
    Ok(cfg)
}

/// A connection to one xapi endpoint.
#[derive(Debug, Clone)]
pub struct Transport {
    endpoint: Endpoint,
    http: Option<reqwest::Client>,
    timeout: Duration,
}

impl Transport {
    /// Builds a transport; `timeout` is the default per-call limit.
    pub fn new(
        endpoint: Endpoint,
        tls: &TlsOptions,
        timeout: Duration,
    ) -> Result<Transport, XapiError> {
        let http = match &endpoint {
            Endpoint::Unix(_) => None,
            Endpoint::Http(url) => {
                let mut b = reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .pool_idle_timeout(Duration::from_secs(30));
                if let Some(ca) = &tls.ca_file {
                    let pem = std::fs::read(ca).map_err(|e| {
                        XapiError::Config(format!("cannot read CA file {}: {e}", ca.display()))
                    })?;
                    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                        XapiError::Config(format!("bad PEM in {}: {e}", ca.display()))
                    })?;
                    if certs.is_empty() {
                        return Err(XapiError::Config(format!(
                            "no certificate in CA file {}",
                            ca.display()
                        )));
                    }
                    b = b.tls_built_in_root_certs(false);
                    for c in certs {
                        b = b.add_root_certificate(c);
                    }
                }
                if let Some(pin) = &tls.pin_sha256 {
                    if tls.ca_file.is_some() {
                        return Err(XapiError::Config(
                            "give either a CA file or a pinned fingerprint, not both".into(),
                        ));
                    }
                    b = b.use_preconfigured_tls(pinned_tls(pin)?);
                }
                if tls.insecure {
                    tracing::warn!(
                        url = %url,
                        "TLS CERTIFICATE VERIFICATION IS OFF (--insecure): anyone on the path can \
                         impersonate xapi and read the password"
                    );
                    b = b.danger_accept_invalid_certs(true);
                }
                Some(
                    b.build()
                        .map_err(|e| XapiError::Config(format!("HTTP client: {e}")))?,
                )
            }
        };
        Ok(Transport {
            endpoint,
            http,
            timeout,
        })
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// POSTs `body` to `path` (e.g. `/` or `/jsonrpc`) and returns the reply body.
    /// `extra` extends the timeout (for long polls such as `event.from`).
    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        method: &str,
        extra: Duration,
    ) -> Result<Vec<u8>, XapiError> {
        let limit = self.timeout + extra;
        let target = self.endpoint.target();
        let fut = async {
            match (&self.endpoint, &self.http) {
                (Endpoint::Http(base), Some(client)) => {
                    post_http(client, &format!("{base}{path}"), content_type, body).await
                }
                (Endpoint::Unix(sock), _) => post_unix(sock, path, content_type, body).await,
                (Endpoint::Http(_), None) => Err(XapiError::Config("no HTTP client".into())),
            }
        };
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(XapiError::Timeout {
                target,
                method: method.to_string(),
                secs: limit.as_secs(),
            }),
        }
    }
}

async fn post_http(
    client: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, XapiError> {
    let conn = |e: reqwest::Error| XapiError::Connect {
        target: url.to_string(),
        reason: error_chain(&e),
    };
    let mut resp = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .body(body)
        .send()
        .await
        .map_err(conn)?;
    if !resp.status().is_success() {
        return Err(XapiError::Http {
            status: resp.status().as_u16(),
            target: url.to_string(),
        });
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(conn)? {
        if out.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(XapiError::TooLarge {
                target: url.to_string(),
                limit: MAX_REPLY_BYTES,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn post_unix(
    sock: &std::path::Path,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, XapiError> {
    use http_body_util::BodyExt as _;

    let target = format!("unix:{}", sock.display());
    let conn_err = |reason: String| XapiError::Connect {
        target: target.clone(),
        reason,
    };
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| conn_err(e.to_string()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| conn_err(error_chain(&e)))?;
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::USER_AGENT, "xenft")
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(hyper::header::CONNECTION, "close")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .map_err(|e| XapiError::Config(format!("HTTP request for {path:?}: {e}")))?;
    let exchange = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| conn_err(error_chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(XapiError::Http {
                status: status.as_u16(),
                target: target.clone(),
            });
        }
        let too_large = || XapiError::TooLarge {
            target: target.clone(),
            limit: MAX_REPLY_BYTES,
        };
        let declared = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| usize::try_from(n).map_or(true, |n| n > MAX_REPLY_BYTES)) {
            return Err(too_large());
        }
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| conn_err(error_chain(&e)))?;
            if let Ok(chunk) = frame.into_data() {
                if out.len() + chunk.len() > MAX_REPLY_BYTES {
                    return Err(too_large());
                }
                out.extend_from_slice(&chunk);
            }
        }
        Ok(out)
    };
    // The connection future does the socket I/O; it is polled alongside the exchange and
    // dropped with it (closing the socket) whichever way the exchange ends.
    let mut conn = std::pin::pin!(conn);
    let mut exchange = std::pin::pin!(exchange);
    tokio::select! {
        r = &mut exchange => r,
        c = &mut conn => match c {
            // The connection ended first (server closed after replying): the reply is
            // complete or its body reports the cut.
            Ok(()) => exchange.await,
            Err(e) => Err(conn_err(error_chain(&e))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            Endpoint::parse("unix:/var/lib/xcp/xapi").unwrap(),
            Endpoint::Unix("/var/lib/xcp/xapi".into())
        );
        assert_eq!(
            Endpoint::parse("https://pool.example/").unwrap(),
            Endpoint::Http("https://pool.example".into())
        );
        assert!(Endpoint::parse("pool.example").is_err());
        assert!(Endpoint::parse("http://").is_err());
    }

    #[test]
    fn fingerprints_parse_in_openssl_and_plain_forms() {
        let hex = "AB".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&hex).unwrap(), [0xab; 32]);
        assert_eq!(
            parse_fingerprint(&format!("sha256 Fingerprint={colons}")).unwrap(),
            [0xab; 32]
        );
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }
}
