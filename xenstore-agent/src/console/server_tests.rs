//! The console's HTTP side on loopback: login, sessions, 401s, protect / unprotect routing and
//! hostile requests (no xapi: the registry and protection answer that it is unreachable).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::auth::{LoginError, XapiLogin};
use super::{Console, ConsoleDeps, ConsoleFile};
use crate::protection_api::ProtectionApi;
use crate::status::StatusHub;
use crate::xapi::desired::{Desired, HostInfo};

const TOKEN: &str = "0123456789abcdef-console";

struct Fixture {
    console: Console,
    _dir: tempfile::TempDir,
}

async fn start(secret: &[u8]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut d = Desired::default();
    d.hosts.insert(
        "u1".into(),
        HostInfo {
            name: "host1".into(),
            address: "127.0.0.1".into(),
        },
    );
    let (_, desired) = watch::channel(Some(Arc::new(d)));
    let (_, api) = watch::channel(None);
    let check: XapiLogin = Arc::new(|u, p| {
        Box::pin(async move {
            if u == "root" && p == "xenroot" {
                Ok(())
            } else {
                Err(LoginError::Refused(
                    "xapi refused the user or password".into(),
                ))
            }
        })
    });
    let deps = ConsoleDeps {
        me: "host1".into(),
        hub: StatusHub::new(16),
        desired,
        api: api.clone(),
        protection: ProtectionApi::xapi(api),
        pool_secret: secret.to_vec(),
        expected_failover_ms: 1600,
        xapi_login: Some(check),
    };
    let file = ConsoleFile {
        listen: "127.0.0.1:0".parse().unwrap(),
        token_file: Some(token_file),
        xapi_login: true,
        xapi_url: None,
        ca_file: None,
        pin_sha256: None,
        session_hours: 1,
    };
    Fixture {
        console: Console::start(&file, deps).await.unwrap(),
        _dir: dir,
    }
}

/// Sends `raw`, returns the status code and the whole answer.
async fn send(f: &Fixture, raw: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(f.console.addr())
        .await
        .unwrap();
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

async fn get(f: &Fixture, path: &str, extra: &str) -> (u16, String) {
    send(
        f,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes(),
    )
    .await
}

async fn post(f: &Fixture, path: &str, extra: &str, body: &str) -> (u16, String) {
    send(
        f,
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
}

/// The session a successful login set.
fn session_of(answer: &str) -> String {
    answer
        .split("\r\n")
        .find_map(|l| l.strip_prefix("Set-Cookie: xenft_session="))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie in {answer}"))
        .to_string()
}

#[tokio::test]
async fn unauthenticated_requests_get_401_and_the_login_page() {
    let f = start(b"pool").await;
    let (code, page) = get(&f, "/", "").await;
    assert_eq!(code, 401);
    assert!(page.contains("id=\"xapi-login\"") && page.contains("id=\"token-login\""));
    assert!(!page.contains("const SESSION"), "the console page leaked");
    for path in ["/api/state", "/api/local"] {
        let (code, body) = get(&f, path, "").await;
        assert_eq!(code, 401, "{path}: {body}");
    }
    let (code, _) = post(&f, "/api/vm/vm1/unprotect", "", "").await;
    assert_eq!(code, 401);
    let (code, _) = get(&f, "/api/state", "Authorization: Bearer nope\r\n").await;
    assert_eq!(code, 401);
    f.console.shutdown().await;
}

#[tokio::test]
async fn a_token_login_opens_the_page_and_its_session_opens_the_api() {
    let f = start(b"pool").await;
    let (code, answer) = post(&f, "/login", "", "method=token&token=wrong-token").await;
    assert_eq!(code, 401);
    assert!(answer.contains("login refused: wrong token"), "{answer}");
    let (code, answer) = post(&f, "/login", "", &format!("method=token&token={TOKEN}")).await;
    assert_eq!(code, 303, "{answer}");
    assert!(answer.contains("HttpOnly; SameSite=Strict"), "{answer}");
    let session = session_of(&answer);
    let (code, page) = get(&f, "/", &format!("Cookie: xenft_session={session}\r\n")).await;
    assert_eq!(code, 200);
    assert!(
        page.contains("const SESSION = \"s1."),
        "a session for the page"
    );
    assert!(
        page.contains("\"served_by\":\"host1\""),
        "the first snapshot is embedded"
    );
    // The API takes bearer credentials only: a cookie alone (a cross-site request) is refused.
    let (code, _) = get(
        &f,
        "/api/state",
        &format!("Cookie: xenft_session={session}\r\n"),
    )
    .await;
    assert_eq!(code, 401);
    let (code, body) = get(
        &f,
        "/api/state",
        &format!("Authorization: Bearer {session}\r\n"),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value =
        serde_json::from_str(body.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(json["served_by"], "host1");
    assert_eq!(json["pool"]["hosts"][0]["name"], "host1");
    assert!(
        json["pool"]["registry_problem"]
            .as_str()
            .unwrap()
            .contains("xapi is unreachable"),
        "{json}"
    );
    // The token itself is a bearer credential too (scripts).
    let (code, _) = get(
        &f,
        "/api/local",
        &format!("Authorization: Bearer {TOKEN}\r\n"),
    )
    .await;
    assert_eq!(code, 200);
    f.console.shutdown().await;
}

#[tokio::test]
async fn xapi_credentials_are_checked_and_a_refusal_says_so() {
    let f = start(b"pool").await;
    let (code, answer) = post(&f, "/login", "", "method=xapi&user=root&password=bad").await;
    assert_eq!(code, 401);
    assert!(
        answer.contains("xapi refused the user or password"),
        "{answer}"
    );
    let (code, answer) = post(&f, "/login", "", "method=xapi&user=root&password=xenroot").await;
    assert_eq!(code, 303, "{answer}");
    let session = session_of(&answer);
    let (code, _) = get(
        &f,
        "/api/state",
        &format!("Authorization: Bearer {session}\r\n"),
    )
    .await;
    assert_eq!(code, 200);
    f.console.shutdown().await;
}

#[tokio::test]
async fn a_session_of_another_pool_is_refused() {
    let a = start(b"pool A").await;
    let b = start(b"pool B").await;
    let (_, answer) = post(&a, "/login", "", &format!("method=token&token={TOKEN}")).await;
    let session = session_of(&answer);
    let (code, _) = get(
        &b,
        "/api/state",
        &format!("Authorization: Bearer {session}\r\n"),
    )
    .await;
    assert_eq!(code, 401);
    a.console.shutdown().await;
    b.console.shutdown().await;
}

#[tokio::test]
async fn protect_goes_to_xapi_and_says_why_it_cannot() {
    let f = start(b"pool").await;
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let (code, body) = post(
        &f,
        "/api/vm/vm1/protect",
        &auth,
        r#"{"level": 3, "secondary": "host2"}"#,
    )
    .await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("xapi is unreachable"), "{body}");
    let (code, body) = post(&f, "/api/vm/vm1/protect", &auth, "{not json").await;
    assert_eq!(code, 400, "{body}");
    let (code, _) = get(&f, "/api/vm/vm1/protect", &auth).await;
    assert_eq!(code, 405);
    let (code, _) = post(&f, "/api/vm/vm1/reboot", &auth, "").await;
    assert_eq!(code, 404);
    let (code, body) = post(&f, "/api/vm/%zz/unprotect", &auth, "").await;
    assert_eq!(code, 400, "{body}");
    f.console.shutdown().await;
}

#[tokio::test]
async fn hostile_requests_are_refused_and_the_console_goes_on_serving() {
    let f = start(b"pool").await;
    let big_head = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(send(&f, big_head.as_bytes()).await.0, 431);
    let big_body = "POST /login HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n";
    assert_eq!(send(&f, big_body.as_bytes()).await.0, 413);
    for raw in [
        &b"\x00\x01\x02\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1\r\nCookie: xenft_session=s1.9.zz.00\r\n\r\n",
        b"GET / HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
        b"POST /login HTTP/1.1\r\nContent-Length: 9\r\n\r\nmethod=%%",
        b"POST /login HTTP/1.1\r\nContent-Length: 10\r\n\r\n\xff\xfe=\xff&user=",
        b"DELETE /api/state HTTP/1.1\r\n\r\n",
    ] {
        let (code, answer) = send(&f, raw).await;
        assert!(
            (400..500).contains(&code),
            "{:?} answered {answer}",
            String::from_utf8_lossy(raw)
        );
    }
    // A client that sends half a request and waits is cut off; the console still answers.
    let mut slow = tokio::net::TcpStream::connect(f.console.addr())
        .await
        .unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let (code, _) = get(&f, "/login", "").await;
    assert_eq!(code, 200);
    f.console.shutdown().await;
}

#[test]
fn a_console_without_a_way_to_log_in_is_refused() {
    let file = ConsoleFile {
        listen: "127.0.0.1:0".parse().unwrap(),
        token_file: None,
        xapi_login: false,
        xapi_url: None,
        ca_file: None,
        pin_sha256: None,
        session_hours: 8,
    };
    assert!(file.token().unwrap_err().contains("no way to log in"));
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("t");
    std::fs::write(&short, "short").unwrap();
    let file = ConsoleFile {
        token_file: Some(short),
        ..file
    };
    assert!(file.token().unwrap_err().contains("at least 16"));
}

#[test]
fn the_console_section_of_the_agent_config_is_read_and_checked() {
    let base = r#"{"host": "host1", "secret_file": "/s", "state_file": "/st", "drivers": "record""#;
    let f = crate::config::AgentFile::parse(
        format!(r#"{base}, "console": {{"listen": "0.0.0.0:8080", "xapi_login": true}}}}"#)
            .as_bytes(),
    )
    .unwrap();
    let c = f.console.expect("console section");
    assert_eq!(c.listen.port(), 8080);
    assert!(c.xapi_login && c.token_file.is_none() && c.session_hours == 8);
    assert!(crate::config::AgentFile::parse(
        format!(r#"{base}, "console": {{"listen": "0.0.0.0:8080", "typo": 1}}}}"#).as_bytes()
    )
    .is_err());
    assert!(
        crate::config::AgentFile::parse(format!("{base}}}").as_bytes())
            .unwrap()
            .console
            .is_none()
    );
}

#[tokio::test]
async fn xapi_logins_are_never_checked_over_the_local_socket() {
    use xenft_xapi::transport::{Endpoint, TlsOptions};
    let file: ConsoleFile =
        serde_json::from_str(r#"{"listen": "127.0.0.1:0", "xapi_login": true}"#).unwrap();
    let (_, api) = watch::channel(None);
    let check = super::xapi_checker(
        &file,
        Endpoint::Unix("/var/lib/xcp/xapi".into()),
        TlsOptions::default(),
        api.clone(),
    )
    .unwrap();
    let e = check("root".into(), "anything".into()).await.unwrap_err();
    assert!(e.to_string().contains("console.xapi_url"), "{e}");
    for bad in [
        r#"{"listen": "127.0.0.1:0", "xapi_url": "unix:/var/lib/xcp/xapi"}"#,
        r#"{"listen": "127.0.0.1:0", "xapi_url": "https://master"}"#,
        r#"{"listen": "127.0.0.1:0", "xapi_url": "ftp://x"}"#,
    ] {
        let file: ConsoleFile = serde_json::from_str(bad).unwrap();
        let r = super::xapi_checker(
            &file,
            Endpoint::Unix("/x".into()),
            TlsOptions::default(),
            api.clone(),
        );
        assert!(r.is_err(), "{bad}");
    }
}

#[tokio::test]
async fn a_consoles_own_session_reads_its_agent_and_nothing_else() {
    let f = start(b"pool").await;
    let peer =
        super::auth::Auth::new(b"pool", None, None, Duration::from_secs(60)).mint_peer("host2");
    let auth = format!("Authorization: Bearer {peer}\r\n");
    let (code, _) = get(&f, "/api/local", &auth).await;
    assert_eq!(code, 200);
    let (code, _) = get(&f, "/api/state", &auth).await;
    assert_eq!(code, 403);
    let (code, _) = post(&f, "/api/vm/vm1/unprotect", &auth, "").await;
    assert_eq!(code, 403);
    let (code, _) = get(&f, "/", &auth).await;
    assert_eq!(code, 401);
    // The token as a bearer opens the page, which gets a session, not the token.
    let (code, page) = get(&f, "/", &format!("Authorization: Bearer {TOKEN}\r\n")).await;
    assert_eq!(code, 200);
    assert!(!page.contains(TOKEN), "the token was put into the page");
    f.console.shutdown().await;
}
