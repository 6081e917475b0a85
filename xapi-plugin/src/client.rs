//! The XenAPI session client: envelopes, sessions and re-login.
//!
//! Every call is `Class.method(session_ref, args...)`; the reply is the XenAPI envelope
//! (wire-protocol.md, "Return Values and Status Codes"):
//!
//! ```text
//! { Status: "Success", Value: <result> }
//! { Status: "Failure", ErrorDescription: [code, param1, ...] }
//! ```
//!
//! Two encodings sit behind [`XenApi::call`]: XML-RPC POSTed to `/` (every XenServer/XCP-ng
//! release) and JSON-RPC 2.0 at `/jsonrpc` (xapi ≥ 1.290), where a failure is
//! `{"error": {"code", "message": <code>, "data": [params]}}`.
//!
//! Sessions: [`XenApi::call`] logs in with `session.login_with_password(user, password, version,
//! originator)` on first use, and when xapi answers `SESSION_INVALID` (expired, xapi restarted,
//! logged out elsewhere) it logs in again once and repeats the call.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::error::{codes, XapiError};
use crate::transport::{Endpoint, TlsOptions, Transport};
use crate::xmlrpc::{self, Response, Value};

/// The XenAPI version we announce at login.
pub const API_VERSION: &str = "1.0";

/// Which RPC encoding to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// XML-RPC at `/`.
    #[default]
    XmlRpc,
    /// JSON-RPC 2.0 at `/jsonrpc`.
    JsonRpc,
}

/// User name and password. `Debug` never prints the password.
#[derive(Clone)]
pub struct Credentials {
    /// User name (`root` on most pools).
    pub user: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Everything needed to reach xapi.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Where xapi listens.
    pub endpoint: Endpoint,
    /// TLS trust (https only).
    pub tls: TlsOptions,
    /// Who we are.
    pub credentials: Credentials,
    /// Encoding.
    pub protocol: Protocol,
    /// Per-call time limit (long polls add their own timeout to it).
    pub timeout: Duration,
    /// The `originator` string sent at login (shows up in xapi's logs).
    pub originator: String,
}

impl ConnectOptions {
    /// Options with defaults: XML-RPC, 30 s per call, originator `xenft`.
    pub fn new(endpoint: Endpoint, credentials: Credentials) -> ConnectOptions {
        ConnectOptions {
            endpoint,
            tls: TlsOptions::default(),
            credentials,
            protocol: Protocol::XmlRpc,
            timeout: Duration::from_secs(30),
            originator: "xenft".to_string(),
        }
    }
}

/// A XenAPI client with one session, shared by all calls (it is `Sync`).
#[derive(Debug)]
pub struct XenApi {
    transport: Transport,
    protocol: Protocol,
    credentials: Credentials,
    originator: String,
    session: Mutex<Option<String>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl XenApi {
    /// Builds a client; no network traffic until the first call.
    pub fn new(opts: ConnectOptions) -> Result<XenApi, XapiError> {
        Ok(XenApi {
            transport: Transport::new(opts.endpoint, &opts.tls, opts.timeout)?,
            protocol: opts.protocol,
            credentials: opts.credentials,
            originator: opts.originator,
            session: Mutex::new(None),
            next_id: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        self.transport.endpoint()
    }

    /// Logs in (again) and returns the new session reference.
    pub async fn login(&self) -> Result<String, XapiError> {
        let mut guard = self.session.lock().await;
        let v = self
            .call_raw(
                "session.login_with_password",
                vec![
                    Value::str(&self.credentials.user),
                    Value::str(&self.credentials.password),
                    Value::str(API_VERSION),
                    Value::str(&self.originator),
                ],
                Duration::ZERO,
            )
            .await?;
        let s = v
            .as_str()
            .ok_or_else(|| XapiError::type_err("session reference", &v))?
            .to_string();
        tracing::debug!(endpoint = ?self.endpoint(), "logged in to xapi");
        *guard = Some(s.clone());
        Ok(s)
    }

    /// Logs out (best effort) and forgets the session.
    pub async fn logout(&self) -> Result<(), XapiError> {
        let s = self.session.lock().await.take();
        if let Some(s) = s {
            self.call_raw("session.logout", vec![Value::String(s)], Duration::ZERO)
                .await?;
        }
        Ok(())
    }

    /// The current session reference, if logged in.
    pub async fn session_ref(&self) -> Option<String> {
        self.session.lock().await.clone()
    }

    /// Uses an existing session (e.g. the one xapi hands to a host plugin) instead of logging in.
    pub async fn set_session(&self, session: String) {
        *self.session.lock().await = Some(session);
    }

    /// Calls `method(session, args...)`, logging in first if needed and once more on
    /// `SESSION_INVALID`.
    pub async fn call(&self, method: &str, args: Vec<Value>) -> Result<Value, XapiError> {
        self.call_with_timeout(method, args, Duration::ZERO).await
    }

    /// As [`XenApi::call`] with `extra` added to the call time limit (long polls).
    pub async fn call_with_timeout(
        &self,
        method: &str,
        args: Vec<Value>,
        extra: Duration,
    ) -> Result<Value, XapiError> {
        let current = self.session.lock().await.clone();
        let session = match current {
            Some(s) => s,
            None => self.login().await?,
        };
        let mut params = Vec::with_capacity(args.len() + 1);
        params.push(Value::String(session.clone()));
        params.extend(args.iter().cloned());
        match self.call_raw(method, params, extra).await {
            Err(e) if e.is(codes::SESSION_INVALID) => {
                tracing::info!(method, "xapi session invalid; logging in again");
                {
                    let mut g = self.session.lock().await;
                    if g.as_deref() == Some(session.as_str()) {
                        *g = None;
                    }
                }
                let current = self.session.lock().await.clone();
                let session = match current {
                    Some(s) => s,
                    None => self.login().await?,
                };
                let mut params = Vec::with_capacity(args.len() + 1);
                params.push(Value::String(session));
                params.extend(args);
                self.call_raw(method, params, extra).await
            }
            r => r,
        }
    }

    /// One round trip with explicit parameters (no session handling).
    pub async fn call_raw(
        &self,
        method: &str,
        params: Vec<Value>,
        extra: Duration,
    ) -> Result<Value, XapiError> {
        match self.protocol {
            Protocol::XmlRpc => {
                let body = xmlrpc::encode_call(method, &params).into_bytes();
                let reply = self
                    .transport
                    .post("/", "text/xml", body, method, extra)
                    .await?;
                let text = String::from_utf8(reply)
                    .map_err(|_| XapiError::Envelope("reply is not UTF-8".into()))?;
                match xmlrpc::decode_response(&text)? {
                    Response::Fault { code, message } => Err(XapiError::Fault { code, message }),
                    Response::Success(v) => unwrap_envelope(v),
                }
            }
            Protocol::JsonRpc => {
                let id = self
                    .next_id
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let body = serde_json::json!({
                    "jsonrpc": "2.0",
                    "method": method,
                    "params": params.iter().map(crate::jsonrpc::to_json).collect::<Vec<_>>(),
                    "id": id,
                });
                let body = serde_json::to_vec(&body)
                    .map_err(|e| XapiError::Envelope(format!("encode: {e}")))?;
                let reply = self
                    .transport
                    .post("/jsonrpc", "application/json", body, method, extra)
                    .await?;
                crate::jsonrpc::decode_reply(&reply)
            }
        }
    }
}

/// Unwraps the XenAPI `Status`/`Value`/`ErrorDescription` envelope.
pub fn unwrap_envelope(v: Value) -> Result<Value, XapiError> {
    let Value::Struct(mut m) = v else {
        return Err(XapiError::Envelope("reply is not a struct".into()));
    };
    match m.get("Status").and_then(Value::as_str) {
        Some("Success") => m
            .remove("Value")
            .ok_or_else(|| XapiError::Envelope("Success without Value".into())),
        Some("Failure") => {
            let desc = m
                .remove("ErrorDescription")
                .ok_or_else(|| XapiError::Envelope("Failure without ErrorDescription".into()))?;
            Err(api_error_from_description(&desc))
        }
        other => Err(XapiError::Envelope(format!("bad Status {other:?}"))),
    }
}

fn api_error_from_description(desc: &Value) -> XapiError {
    let parts: Vec<String> = desc
        .as_array()
        .unwrap_or_default()
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    let mut it = parts.into_iter();
    let code = it.next().unwrap_or_else(|| "UNKNOWN_ERROR".to_string());
    XapiError::Api {
        code,
        params: it.collect(),
    }
}

/// Builds a success envelope (used by servers and the host plugin).
pub fn success_envelope(value: Value) -> Value {
    let mut m = BTreeMap::new();
    m.insert("Status".to_string(), Value::str("Success"));
    m.insert("Value".to_string(), value);
    Value::Struct(m)
}

/// Builds a failure envelope `[code, params...]`.
pub fn failure_envelope(code: &str, params: &[String]) -> Value {
    let mut desc = vec![Value::str(code)];
    desc.extend(params.iter().map(Value::str));
    let mut m = BTreeMap::new();
    m.insert("Status".to_string(), Value::str("Failure"));
    m.insert("ErrorDescription".to_string(), Value::Array(desc));
    Value::Struct(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_failure_keeps_code_and_params() {
        let e = unwrap_envelope(failure_envelope(
            codes::MAP_DUPLICATE_KEY,
            &[
                "VM".into(),
                "other_config".into(),
                "OpaqueRef:1".into(),
                "k".into(),
            ],
        ))
        .unwrap_err();
        assert!(e.is(codes::MAP_DUPLICATE_KEY));
        match e {
            XapiError::Api { params, .. } => assert_eq!(params[3], "k"),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn envelope_success_and_garbage() {
        assert_eq!(
            unwrap_envelope(success_envelope(Value::str("x"))).unwrap(),
            Value::str("x")
        );
        assert!(matches!(
            unwrap_envelope(Value::str("x")),
            Err(XapiError::Envelope(_))
        ));
        let mut m = BTreeMap::new();
        m.insert("Status".to_string(), Value::str("Success"));
        assert!(matches!(
            unwrap_envelope(Value::Struct(m)),
            Err(XapiError::Envelope(_))
        ));
    }

    #[test]
    fn credentials_debug_hides_password() {
        let c = Credentials {
            user: "root".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
