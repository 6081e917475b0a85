//! Who may use the console: a login (the console's token, or xapi credentials checked with
//! `session.login_with_password` against the pool's xapi) yields a session, which is a
//! signed, expiring token that every console of the pool accepts — its key is derived from
//! the pool secret all the agents hold — so the page keeps working when it fails over to
//! another host's console. The consoles reach each other with sessions of their own
//! (`agent:<host>`, one minute).
//!
//! Format: `s1.<expiry, Unix s>.<user, hex>.<HMAC-SHA256, hex>`. Every comparison of a secret
//! is constant-time; every token from outside is parsed without panicking.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Longest user name a session carries.
pub const MAX_USER: usize = 128;
/// The user of the consoles' sessions to one another (`agent:<host>`): they read
/// `/api/local` only.
pub const PEER_PREFIX: &str = "agent:";
/// Longest session token accepted.
const MAX_TOKEN: usize = 1024;

/// Checks xapi credentials (`Ok`: valid; `Err`: why not, in words).
pub type XapiLogin =
    Arc<dyn Fn(String, String) -> BoxFuture<'static, Result<(), LoginError>> + Send + Sync>;

/// Why a login failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Wrong user, password or token.
    #[error("{0}")]
    Refused(String),
    /// The check could not be made (xapi unreachable, ...).
    #[error("{0}")]
    Unavailable(String),
}

/// Constant-time equality (the length is not secret).
#[must_use]
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    crate::status::ct_eq(a, b)
}

/// The console's login rules and session key.
pub struct Auth {
    key: [u8; 32],
    token: Option<String>,
    xapi: Option<XapiLogin>,
    ttl: Duration,
}

impl Auth {
    /// Sessions signed with a key derived from `pool_secret`; logins with `token` and/or
    /// through `xapi`; sessions last `ttl`.
    #[must_use]
    pub fn new(
        pool_secret: &[u8],
        token: Option<String>,
        xapi: Option<XapiLogin>,
        ttl: Duration,
    ) -> Self {
        let mut key = [0u8; 32];
        if let Ok(mut m) = Hmac::<Sha256>::new_from_slice(pool_secret) {
            m.update(b"xenft console session key v1");
            key.copy_from_slice(&m.finalize().into_bytes());
        }
        Self {
            key,
            token,
            xapi,
            ttl,
        }
    }

    /// Whether xapi logins are offered.
    #[must_use]
    pub fn offers_xapi(&self) -> bool {
        self.xapi.is_some()
    }

    /// Whether token logins are offered.
    #[must_use]
    pub fn offers_token(&self) -> bool {
        self.token.is_some()
    }

    fn mac(&self, body: &str) -> String {
        let Ok(mut m) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return String::new();
        };
        m.update(body.as_bytes());
        hex(&m.finalize().into_bytes())
    }

    /// A session for `user`, valid for `ttl` from `now` (Unix s).
    #[must_use]
    pub fn mint_at(&self, user: &str, ttl: Duration, now: u64) -> String {
        let user: String = user.chars().take(MAX_USER).collect();
        let body = format!(
            "s1.{}.{}",
            now.saturating_add(ttl.as_secs()),
            hex(user.as_bytes())
        );
        let mac = self.mac(&body);
        format!("{body}.{mac}")
    }

    /// A session for `user` of the configured length, from now.
    #[must_use]
    pub fn mint(&self, user: &str) -> String {
        self.mint_at(user, self.ttl, unix_now())
    }

    /// A short session for this agent's requests to the other consoles.
    #[must_use]
    pub fn mint_peer(&self, me: &str) -> String {
        self.mint_at(
            &format!("{PEER_PREFIX}{me}"),
            Duration::from_secs(60),
            unix_now(),
        )
    }

    /// The user of a valid session at `now` (Unix s); `None` for anything else.
    #[must_use]
    pub fn verify_at(&self, token: &str, now: u64) -> Option<String> {
        if token.len() > MAX_TOKEN {
            return None;
        }
        let (body, mac) = token.rsplit_once('.')?;
        if !ct_eq(self.mac(body).as_bytes(), mac.as_bytes()) {
            return None;
        }
        let mut parts = body.split('.');
        let (v, exp, user) = (parts.next()?, parts.next()?, parts.next()?);
        if v != "s1" || parts.next().is_some() {
            return None;
        }
        let exp: u64 = exp.parse().ok()?;
        if exp <= now {
            return None;
        }
        String::from_utf8(unhex(user)?).ok()
    }

    /// Who a request's credential (a session, or the console's token) stands for.
    #[must_use]
    pub fn check(&self, credential: &str) -> Option<String> {
        if let Some(t) = &self.token {
            if ct_eq(credential.as_bytes(), t.as_bytes()) {
                return Some("token".into());
            }
        }
        self.verify_at(credential, unix_now())
    }

    /// A login with the console's token.
    ///
    /// # Errors
    /// [`LoginError::Refused`] for a wrong token, or when no token is configured.
    pub fn login_token(&self, token: &str) -> Result<String, LoginError> {
        match &self.token {
            Some(t) if ct_eq(token.trim().as_bytes(), t.as_bytes()) => Ok(self.mint("token")),
            Some(_) => Err(LoginError::Refused("wrong token".into())),
            None => Err(LoginError::Refused(
                "this console takes no token (console.token_file is not set)".into(),
            )),
        }
    }

    /// A login with xapi credentials, checked against the pool's xapi.
    ///
    /// # Errors
    /// [`LoginError`]: refused by xapi, xapi unreachable, or xapi logins not configured.
    pub async fn login_xapi(&self, user: &str, password: &str) -> Result<String, LoginError> {
        let Some(check) = &self.xapi else {
            return Err(LoginError::Refused(
                "this console takes no xapi login (console.xapi_login is false)".into(),
            ));
        };
        if user.is_empty() || user.len() > MAX_USER || password.len() > 4096 {
            return Err(LoginError::Refused("give a user and a password".into()));
        }
        if user.starts_with(PEER_PREFIX) {
            return Err(LoginError::Refused(format!(
                "{PEER_PREFIX}… names are the consoles' own"
            )));
        }
        check(user.to_string(), password.to_string()).await?;
        Ok(self.mint(&format!("xapi:{user}")))
    }
}

/// Seconds since the Unix epoch.
#[must_use]
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(token: Option<&str>) -> Auth {
        Auth::new(
            b"pool secret",
            token.map(str::to_string),
            None,
            Duration::from_secs(3600),
        )
    }

    #[test]
    fn a_session_is_accepted_by_every_console_of_the_pool_and_no_other() {
        let a = auth(None);
        let s = a.mint_at("xapi:root", Duration::from_secs(60), 1000);
        assert_eq!(a.verify_at(&s, 1001).as_deref(), Some("xapi:root"));
        // Another host's console: same pool secret, same verdict.
        assert_eq!(
            auth(Some("t")).verify_at(&s, 1001).as_deref(),
            Some("xapi:root")
        );
        // Another pool's console refuses it.
        let other = Auth::new(b"other pool", None, None, Duration::from_secs(60));
        assert_eq!(other.verify_at(&s, 1001), None);
    }

    #[test]
    fn an_expired_or_altered_session_is_refused() {
        let a = auth(None);
        let s = a.mint_at("token", Duration::from_secs(60), 1000);
        assert_eq!(a.verify_at(&s, 1060), None, "expired");
        // A longer expiry or another user breaks the signature.
        let forged = s.replacen(".1060.", ".9999999999.", 1);
        assert_ne!(forged, s);
        assert_eq!(a.verify_at(&forged, 1001), None);
        let forged = s.replacen(&hex(b"token"), &hex(b"xapi:root"), 1);
        assert_eq!(a.verify_at(&forged, 1001), None);
    }

    #[test]
    fn hostile_session_strings_are_refused_without_panic() {
        let a = auth(None);
        for t in [
            "",
            ".",
            "....",
            "s1.x.y.z",
            "s1.1.zz.00",
            "s1.18446744073709551616.00.00",
            "s1.5.0.",
            "é.é.é.é",
            &"a".repeat(5000),
            "s1.99999999999.ff.ff.ff",
        ] {
            assert_eq!(a.verify_at(t, 0), None, "{t:?}");
            assert_eq!(a.check(t), None, "{t:?}");
        }
    }

    #[test]
    fn the_token_logs_in_and_a_wrong_one_does_not() {
        let a = auth(Some("s3cret"));
        let s = a.login_token("s3cret\n").expect("login");
        assert_eq!(a.check(&s).as_deref(), Some("token"));
        assert_eq!(a.check("s3cret").as_deref(), Some("token"));
        assert!(matches!(
            a.login_token("s3cre"),
            Err(LoginError::Refused(_))
        ));
        assert!(matches!(
            auth(None).login_token("anything"),
            Err(LoginError::Refused(m)) if m.contains("token_file")
        ));
    }

    #[tokio::test]
    async fn xapi_logins_go_to_the_checker_and_its_refusal_is_kept() {
        let check: XapiLogin = Arc::new(|u, p| {
            Box::pin(async move {
                if u == "root" && p == "xenroot" {
                    Ok(())
                } else {
                    Err(LoginError::Refused("SESSION_AUTHENTICATION_FAILED".into()))
                }
            })
        });
        let a = Auth::new(b"k", None, Some(check), Duration::from_secs(60));
        let s = a.login_xapi("root", "xenroot").await.expect("login");
        assert_eq!(a.check(&s).as_deref(), Some("xapi:root"));
        let e = a.login_xapi("root", "wrong").await.unwrap_err();
        assert!(e.to_string().contains("AUTHENTICATION"), "{e}");
        assert!(a.login_xapi("", "x").await.is_err());
        assert!(auth(None).login_xapi("root", "xenroot").await.is_err());
    }
}
