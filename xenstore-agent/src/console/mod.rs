//! The availability console, served by every agent that has a `console` section in its
//! configuration (`{"listen": "ADDR:PORT", "token_file": "...", "xapi_login": true}`).
//!
//! One page (`page.html`, plain HTML/CSS/JS compiled into the binary: no build step, no CDN,
//! works in an air-gapped pool) shows the pool's hosts, the A-link and management paths as
//! each agent hears them, every VM with its level, state, RPO, expected failover time and
//! resync progress, each agent's view, and the decisions of all agents with their reasons
//! ([`snapshot`]). The page asks its console for a snapshot every 500 ms; when that console
//! stops answering it asks the next host's (the snapshot lists every console of the pool),
//! so it stays live while any one host is down.
//!
//! A console builds its snapshot from the registry in the pool's xapi, its own agent, and
//! the other hosts' consoles reached over the management network ([`sources`]).
//!
//! Login ([`auth`]): the console's token (`token_file`) and/or xapi credentials checked with
//! `session.login_with_password` against the pool's xapi (`xapi_login`). A login sets a
//! session cookie for the page and hands the page a bearer session that every console of
//! the pool accepts; the API takes only bearer credentials (a forged cross-site request
//! carries none). Unauthenticated requests get 401 and the login page. Protect and unprotect
//! go through XenAPI, as `xenft vm-protect` / `vm-unprotect` ([`ProtectionApi`]).
//!
//! Routes: `GET /` (page, or 401 + login), `GET /login`, `POST /login`, `POST /logout`,
//! `GET /api/state` (snapshot), `GET /api/local` (this agent's view, for the other
//! consoles), `POST /api/vm/<name>/{protect,unprotect}`.

pub mod auth;
pub mod http;
pub mod snapshot;
pub mod sources;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use xenft_xapi::XenApi;

use self::auth::{Auth, LoginError, XapiLogin};
use self::http::{Answer, Request};
use self::snapshot::RegistryView;
use self::sources::Registry;
use crate::protection_api::{Action, ProtectionApi};
use crate::status::StatusHub;
use crate::xapi::desired::Desired;

const PAGE: &str = include_str!("page.html");
const LOGIN: &str = include_str!("login.html");
/// The session cookie.
pub const COOKIE: &str = "xenft_session";
/// How long a built snapshot is reused (many pages, one build).
const SNAPSHOT_REUSE: Duration = Duration::from_millis(400);
/// Open connections at most.
const MAX_CONNECTIONS: usize = 64;
/// A failed login is answered after this long (guessing is slow).
const LOGIN_FAILURE_DELAY: Duration = Duration::from_secs(1);

/// `"console": {...}` in the agent's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleFile {
    /// Where the console listens (the management network; every host the same port).
    pub listen: SocketAddr,
    /// File holding the console's token (a login, and a bearer credential for scripts).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Log in with xapi credentials, checked against the pool's xapi.
    #[serde(default)]
    pub xapi_login: bool,
    /// Where xapi logins are checked (`https://<pool master>`); default: where the agent
    /// talks to xapi, unless that is dom0's local socket, on which xapi lets root in without
    /// checking the password — then this is required for `xapi_login`.
    #[serde(default)]
    pub xapi_url: Option<String>,
    /// HTTPS trust for `xapi_url`: the pool's CA (PEM file).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// HTTPS trust for `xapi_url`: the certificate's SHA-256 fingerprint.
    #[serde(default)]
    pub pin_sha256: Option<String>,
    /// How long a login lasts (hours, 1..=168, default 8).
    #[serde(default = "default_session_hours")]
    pub session_hours: u64,
}

fn default_session_hours() -> u64 {
    8
}

impl ConsoleFile {
    /// The token, read; the settings checked.
    ///
    /// # Errors
    /// The problem, in words: no login configured, an unreadable or short token.
    pub fn token(&self) -> Result<Option<String>, String> {
        if !(1..=168).contains(&self.session_hours) {
            return Err(format!(
                "console.session_hours must be 1..=168, not {}",
                self.session_hours
            ));
        }
        let token = match &self.token_file {
            None => None,
            Some(p) => {
                let meta = std::fs::metadata(p)
                    .map_err(|e| format!("console.token_file {}: {e}", p.display()))?;
                if meta.len() > 4096 {
                    return Err(format!(
                        "console.token_file {}: longer than 4 KiB",
                        p.display()
                    ));
                }
                let t = std::fs::read_to_string(p)
                    .map_err(|e| format!("console.token_file {}: {e}", p.display()))?;
                let t = t.trim().to_string();
                if t.len() < 16 {
                    return Err(format!(
                        "console.token_file {}: the token must be at least 16 characters",
                        p.display()
                    ));
                }
                Some(t)
            }
        };
        if token.is_none() && !self.xapi_login {
            return Err(
                "console: no way to log in — set token_file and/or \"xapi_login\": true".into(),
            );
        }
        Ok(token)
    }
}

/// What a console is built from.
pub struct ConsoleDeps {
    /// This host's name.
    pub me: String,
    /// This agent's status.
    pub hub: Arc<StatusHub>,
    /// The registry as the follower reads it.
    pub desired: watch::Receiver<Option<Arc<Desired>>>,
    /// The follower's XenAPI session.
    pub api: watch::Receiver<Option<Arc<XenApi>>>,
    /// Protect / unprotect.
    pub protection: Arc<ProtectionApi>,
    /// The pool secret (sessions are signed with a key derived from it).
    pub pool_secret: Vec<u8>,
    /// The failover time this agent's timing gives.
    pub expected_failover_ms: u64,
    /// Checks xapi credentials (`xapi_login`).
    pub xapi_login: Option<XapiLogin>,
}

struct Shared {
    me: String,
    port: u16,
    hub: Arc<StatusHub>,
    registry: Registry,
    protection: Arc<ProtectionApi>,
    auth: Auth,
    expected_failover_ms: u64,
    last: tokio::sync::Mutex<Option<(Instant, Value)>>,
    logins: Semaphore,
}

/// The running console.
pub struct Console {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Console {
    /// Binds `file.listen` and serves.
    ///
    /// # Errors
    /// The bind error, or the settings' problem.
    pub async fn start(file: &ConsoleFile, deps: ConsoleDeps) -> std::io::Result<Self> {
        let token = file.token().map_err(std::io::Error::other)?;
        let listener = TcpListener::bind(file.listen).await?;
        let addr = listener.local_addr()?;
        let xapi = if file.xapi_login {
            deps.xapi_login
        } else {
            None
        };
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let shared = Arc::new(Shared {
            me: deps.me,
            port: addr.port(),
            hub: deps.hub,
            registry: Registry::new(deps.desired, deps.api),
            protection: deps.protection,
            auth: Auth::new(
                &deps.pool_secret,
                token,
                xapi,
                Duration::from_secs(file.session_hours * 3600),
            ),
            expected_failover_ms: deps.expected_failover_ms,
            last: tokio::sync::Mutex::new(None),
            logins: Semaphore::new(4),
        });
        tasks.push(tokio::spawn(accept(listener, shared, stop_rx)));
        Ok(Self { addr, stop, tasks })
    }

    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn accept(l: TcpListener, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut stopping = stop.clone();
    loop {
        tokio::select! {
            _ = stopping.changed() => return,
            acc = l.accept() => {
                let Ok((sock, _)) = acc else { continue };
                let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else { continue };
                let (shared, mut stop) = (Arc::clone(&shared), stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = serve(sock, &shared) => {}
                        _ = stop.changed() => {}
                    }
                    drop(permit);
                });
            }
        }
    }
}

async fn serve(mut sock: TcpStream, s: &Shared) {
    let req = match tokio::time::timeout(http::REQUEST_TIME, http::read_request(&mut sock)).await {
        Err(_) => {
            Answer::error(400, "the request did not come within 5 s")
                .send(&mut sock)
                .await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(r)) => {
            Answer::error(r.0, r.1).send(&mut sock).await;
            return;
        }
        Ok(Ok(Some(r))) => r,
    };
    route(s, &req).await.send(&mut sock).await;
}

/// Escapes `</` so that no string can close the page's script element.
fn script_json(v: &Value) -> String {
    v.to_string().replace("</", "<\\/")
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn login_page(s: &Shared, status: u16, message: &str) -> Answer {
    let body = LOGIN
        .replace("{{HOST}}", &html_escape(&s.me))
        .replace("{{MESSAGE}}", &html_escape(message))
        .replace("{{XAPI}}", if s.auth.offers_xapi() { "" } else { "hidden" })
        .replace(
            "{{TOKEN}}",
            if s.auth.offers_token() { "" } else { "hidden" },
        );
    Answer::new(status, "text/html; charset=utf-8", body)
}

async fn route(s: &Shared, req: &Request) -> Answer {
    // The consoles' own sessions (`agent:<host>`) read `/api/local` and nothing else.
    let peer_only = |u: &String| u.starts_with(auth::PEER_PREFIX);
    let bearer_user = req.bearer().and_then(|b| s.auth.check(b));
    let peer = bearer_user.as_ref().is_some_and(peer_only);
    match (req.method.as_str(), req.path.as_str()) {
        ("OPTIONS", _) => Answer::new(204, "text/plain", "")
            .with("Access-Control-Allow-Methods: GET, POST".into())
            .with("Access-Control-Allow-Headers: authorization, content-type".into())
            .with("Access-Control-Max-Age: 600".into()),
        ("GET", "/login") => login_page(s, 200, ""),
        ("POST", "/login") => login(s, req).await,
        ("POST", "/logout") => Answer::new(303, "text/plain", "logged out\n")
            .with("Location: /login".into())
            .with(format!(
                "Set-Cookie: {COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
            )),
        ("GET", "/") => {
            let user = req
                .cookie(COOKIE)
                .and_then(|c| s.auth.check(c))
                .or(bearer_user)
                .filter(|u| !peer_only(u));
            match user {
                None => login_page(s, 401, "log in to see the pool"),
                Some(user) => {
                    // The page's own session, never the credential it came with (a token).
                    let session = s.auth.mint(&user);
                    let snap = state(s).await;
                    let page = PAGE
                        .replace("/*INITIAL*/null", &script_json(&snap))
                        .replace("/*SESSION*/null", &script_json(&json!(session)));
                    Answer::new(200, "text/html; charset=utf-8", page)
                }
            }
        }
        (_, p) if p.starts_with("/api/") && bearer_user.is_none() => Answer::error(
            401,
            "log in first: Authorization: Bearer <session or token>",
        )
        .with("WWW-Authenticate: Bearer realm=\"xenft console\"".into()),
        (_, p) if peer && p != "/api/local" => {
            Answer::error(403, "a console's session reads /api/local only")
        }
        ("GET", "/api/state") => Answer::json(200, &state(s).await),
        ("GET", "/api/local") => {
            let comps = s.hub.snapshot().components;
            Answer::json(
                200,
                &sources::local_view(&s.me, &s.hub, &comps, s.expected_failover_ms),
            )
        }
        (m, p) if p.starts_with("/api/vm/") => {
            let user = bearer_user.unwrap_or_default();
            protection(s, m, p, &req.body, &user).await
        }
        (_, "/" | "/login" | "/logout" | "/api/state" | "/api/local") => {
            Answer::error(405, format!("{} is not served on {}", req.method, req.path))
        }
        _ => Answer::error(404, format!("no page {}", req.path)),
    }
}

async fn login(s: &Shared, req: &Request) -> Answer {
    let form = http::form(&req.body);
    let field = |k: &str| {
        form.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone().unwrap_or_default())
            .unwrap_or_default()
    };
    let Ok(_permit) = s.logins.acquire().await else {
        return login_page(s, 503, "the console is stopping");
    };
    let result = if field("method") == "token" {
        s.auth.login_token(&field("token"))
    } else {
        s.auth.login_xapi(&field("user"), &field("password")).await
    };
    match result {
        Ok(session) => {
            tracing::info!(host = %s.me, method = %field("method"), user = %field("user"), "console login");
            Answer::new(303, "text/plain", "logged in\n")
                .with("Location: /".into())
                .with(format!(
                    "Set-Cookie: {COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict"
                ))
        }
        Err(e) => {
            tracing::warn!(host = %s.me, user = %field("user"), reason = %e, "console login refused");
            let status = match e {
                LoginError::Refused(_) => 401,
                LoginError::Unavailable(_) => 503,
            };
            tokio::time::sleep(LOGIN_FAILURE_DELAY).await;
            login_page(s, status, &format!("login refused: {e}"))
        }
    }
}

/// `POST /api/vm/<name>/{protect,unprotect}` (the credential was checked).
async fn protection(s: &Shared, method: &str, path: &str, body: &[u8], user: &str) -> Answer {
    let rest = path.strip_prefix("/api/vm/").unwrap_or_default();
    let Some((vm, action)) = rest.rsplit_once('/') else {
        return Answer::error(404, format!("no page {path}"));
    };
    let action = match action {
        "protect" => Action::Protect,
        "unprotect" => Action::Unprotect,
        other => return Answer::error(404, format!("no action {other:?}: protect or unprotect")),
    };
    if method != "POST" {
        return Answer::error(405, "POST only");
    }
    let Some(vm) = http::url_decode(vm).filter(|v| !v.is_empty() && !v.contains('/')) else {
        return Answer::error(400, format!("bad VM name in the path: {vm:?}"));
    };
    tracing::info!(host = %s.me, user, vm = %vm, ?action, "console: protection change asked");
    let a = s.protection.handle(action, &vm, body).await;
    // The next snapshot shows the change.
    *s.last.lock().await = None;
    Answer::json(a.status, &a.body)
}

/// The pool snapshot, built at most every [`SNAPSHOT_REUSE`].
async fn state(s: &Shared) -> Value {
    let mut last = s.last.lock().await;
    if let Some((at, v)) = last.as_ref() {
        if at.elapsed() < SNAPSHOT_REUSE {
            return v.clone();
        }
    }
    let reg: RegistryView = s.registry.view().await;
    let comps = s.hub.snapshot().components;
    let mine = sources::local_view(&s.me, &s.hub, &comps, s.expected_failover_ms);
    let session = s.auth.mint_peer(&s.me);
    let others = reg.hosts.iter().filter(|h| h.name != s.me);
    let fetched = futures::future::join_all(others.clone().map(|h| {
        let session = session.clone();
        async move {
            (
                h.name.clone(),
                sources::fetch_peer(&h.address, s.port, &session).await,
            )
        }
    }))
    .await;
    let mut views = vec![(s.me.clone(), Ok(mine))];
    views.extend(fetched);
    let mut consoles: Vec<String> = reg
        .hosts
        .iter()
        .filter(|h| h.name == s.me)
        .chain(others)
        .map(|h| sources::console_url(&h.address, s.port))
        .collect();
    consoles.dedup();
    let snap = snapshot::build(&s.me, &consoles, &reg, &views, now_ms());
    *last = Some((Instant::now(), snap.clone()));
    snap
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Checks xapi credentials with `session.login_with_password` (then logs out) against the
/// pool's xapi: `file.xapi_url` with its trust, else the master the follower talks to (else
/// `configured`) with the agent's trust (`tls`). Never over xapi's local socket, which lets
/// root in without a password.
///
/// # Errors
/// `xapi_url` unreadable or without HTTPS trust.
pub fn xapi_checker(
    file: &ConsoleFile,
    configured: xenft_xapi::transport::Endpoint,
    tls: xenft_xapi::transport::TlsOptions,
    api: watch::Receiver<Option<Arc<XenApi>>>,
) -> Result<XapiLogin, String> {
    use xenft_xapi::transport::{Endpoint, TlsOptions};
    let own = match &file.xapi_url {
        None => None,
        Some(u) => {
            let e = Endpoint::parse(u).map_err(|e| format!("console.xapi_url {u:?}: {e}"))?;
            if matches!(e, Endpoint::Unix(_)) {
                return Err("console.xapi_url: an https address, not xapi's local socket (which lets root in without a password)".into());
            }
            if u.starts_with("https://") && file.ca_file.is_none() && file.pin_sha256.is_none() {
                return Err("console.xapi_url: https needs ca_file or pin_sha256".into());
            }
            Some((
                e,
                TlsOptions {
                    ca_file: file.ca_file.clone(),
                    pin_sha256: file.pin_sha256.clone(),
                    insecure: false,
                },
            ))
        }
    };
    Ok(Arc::new(move |user, password| {
        let (endpoint, tls) = own.clone().unwrap_or_else(|| {
            let e = api
                .borrow()
                .as_ref()
                .map_or_else(|| configured.clone(), |a| a.endpoint().clone());
            (e, tls.clone())
        });
        Box::pin(async move {
            if matches!(endpoint, Endpoint::Unix(_)) {
                return Err(LoginError::Unavailable(
                    "xapi logins are not checked over xapi's local socket (it lets root in \
                     without a password): set console.xapi_url, or use the console's token"
                        .into(),
                ));
            }
            let mut opts = xenft_xapi::ConnectOptions::new(
                endpoint,
                xenft_xapi::client::Credentials { user, password },
            );
            opts.tls = tls;
            opts.timeout = Duration::from_secs(5);
            opts.originator = "xenft-console".into();
            let api = XenApi::new(opts).map_err(|e| LoginError::Unavailable(e.to_string()))?;
            match api.login().await {
                Ok(_) => {
                    let _ = api.logout().await;
                    Ok(())
                }
                Err(e) if e.code() == Some("SESSION_AUTHENTICATION_FAILED") => Err(
                    LoginError::Refused("xapi refused the user or password".into()),
                ),
                Err(e) if e.code().is_some() => Err(LoginError::Refused(format!("xapi: {e}"))),
                Err(e) => Err(LoginError::Unavailable(format!(
                    "the pool's xapi cannot check the login now ({e}): use the console's token"
                ))),
            }
        })
    }))
}

#[cfg(test)]
mod server_tests;
