//! HTTPS to xapi: certificates are verified against the system roots or only against
//! `--ca-file`; `--insecure` is the explicit escape hatch. A Python TLS terminator (with
//! certificates made by `openssl`) sits in front of the XenAPI test server.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::transport::{Endpoint, TlsOptions};
use xenft_xapi::{ConnectOptions, Credentials, XapiError, XenApi};

struct Proxy(Child, u16);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Makes `ca.pem` and a `leaf.pem`/`leaf.key` for 127.0.0.1 signed by it (and `other.pem`, an
/// unrelated CA).
fn certs(dir: &Path) {
    sh(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=xenft-test-ca",
        ],
    );
    sh(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "other.key",
            "-out",
            "other.pem",
            "-days",
            "2",
            "-subj",
            "/CN=other-ca",
        ],
    );
    sh(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    sh(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
}

fn proxy(dir: &Path, backend: std::net::SocketAddr) -> Proxy {
    let script = r#"
import socket, ssl, sys, threading
cert, key, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key)
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(16)
print(ls.getsockname()[1], flush=True)
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d: break
            b.sendall(d)
    except Exception: pass
    for s in (a, b):
        try: s.close()
        except Exception: pass
def serve(c):
    try: t = ctx.wrap_socket(c, server_side=True)
    except Exception: c.close(); return
    b = socket.create_connection(("127.0.0.1", port))
    threading.Thread(target=pipe, args=(t, b), daemon=True).start()
    pipe(b, t)
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir.join("leaf.pem"))
        .arg(dir.join("leaf.key"))
        .arg(backend.port().to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().expect("proxy prints its port");
    Proxy(child, port)
}

async fn try_connect(srv: &FakeXapi, port: u16, tls: TlsOptions) -> Result<(), XapiError> {
    let mut o = ConnectOptions::new(
        Endpoint::parse(&format!("https://127.0.0.1:{port}")).unwrap(),
        Credentials {
            user: srv.user().into(),
            password: srv.password().into(),
        },
    );
    o.tls = tls;
    XenApi::new(o)?.host_get_all_records().await.map(drop)
}

#[tokio::test]
async fn https_verifies_against_the_given_ca_and_insecure_is_explicit() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    srv.add_host("host1", "10.0.0.1", 1 << 30);
    let px = proxy(dir.path(), srv.addr());

    let e = try_connect(&srv, px.1, TlsOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, XapiError::Connect { .. }),
        "unknown CA must fail: {e}"
    );

    let other = TlsOptions {
        ca_file: Some(dir.path().join("other.pem")),
        ..Default::default()
    };
    let e = try_connect(&srv, px.1, other).await.unwrap_err();
    assert!(
        matches!(e, XapiError::Connect { .. }),
        "wrong CA must fail: {e}"
    );

    let ours = TlsOptions {
        ca_file: Some(dir.path().join("ca.pem")),
        ..Default::default()
    };
    try_connect(&srv, px.1, ours).await.unwrap();

    let insecure = TlsOptions {
        insecure: true,
        ..Default::default()
    };
    try_connect(&srv, px.1, insecure).await.unwrap();

    let missing = TlsOptions {
        ca_file: Some(dir.path().join("absent.pem")),
        ..Default::default()
    };
    assert!(matches!(
        try_connect(&srv, px.1, missing).await,
        Err(XapiError::Config(_))
    ));

    // Pinning the leaf's fingerprint works without any CA; another fingerprint is refused.
    let fp = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(dir.path().join("leaf.pem"))
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout).trim().to_string();
    let pinned = TlsOptions {
        pin_sha256: Some(fp),
        ..Default::default()
    };
    try_connect(&srv, px.1, pinned).await.unwrap();
    let wrong = TlsOptions {
        pin_sha256: Some("00".repeat(32)),
        ..Default::default()
    };
    let e = try_connect(&srv, px.1, wrong).await.unwrap_err();
    assert!(
        matches!(e, XapiError::Connect { .. }),
        "wrong pin must fail: {e}"
    );
}
