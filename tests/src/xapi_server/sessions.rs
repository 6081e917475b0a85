//! Sessions: login, logout, the session check every other call goes through.
//!
//! As xapi (xen-api `ocaml/xapi/xapi_session.ml`, `ocaml/xapi/session_check.ml`):
//! - `session.login_with_password(uname, pwd[, version, originator])` — the last two have
//!   defaults in the datamodel — answers a fresh `OpaqueRef`, or `SESSION_AUTHENTICATION_FAILED
//!   [uname, reason]`; on a pool member it answers `HOST_IS_SLAVE [master address]` before
//!   looking at the credentials, which is how clients find the master;
//! - any call with an unknown, logged-out or expired session answers the XenAPI failure
//!   `SESSION_INVALID [ref]` inside a normal reply (never an HTTP error), over XML-RPC and
//!   JSON-RPC alike.

use std::sync::Arc;

use xenft_xapi::xmlrpc::Value;

use super::calls::arg_str;
use super::objects::new_ref;
use super::{fail, ApiResult, Failure, Shared};

pub(super) fn login(sh: &Shared, method: &str, params: &[Value]) -> ApiResult {
    if let Some(master) = &sh.cfg.slave_of {
        return Err(fail("HOST_IS_SLAVE", &[master]));
    }
    let user = arg_str(params, 0, method)?;
    let pw = arg_str(params, 1, method)?;
    if user != sh.cfg.user || pw != sh.cfg.password {
        return Err(fail(
            "SESSION_AUTHENTICATION_FAILED",
            &[user, "Authentication failure"],
        ));
    }
    let s = new_ref();
    sh.lock().sessions.insert(s.clone());
    Ok(Value::String(s))
}

pub(super) fn logout(sh: &Shared, method: &str, params: &[Value]) -> ApiResult {
    let s = arg_str(params, 0, method)?;
    sh.lock().sessions.remove(s);
    Ok(Value::str(""))
}

/// The session reference of a call, if it is a live one.
pub(super) fn check<'a>(sh: &Arc<Shared>, params: &'a [Value]) -> Result<&'a str, Failure> {
    let session = params.first().and_then(Value::as_str).unwrap_or("");
    if sh.lock().sessions.contains(session) {
        Ok(session)
    } else {
        Err(fail("SESSION_INVALID", &[session]))
    }
}

/// `session.get_this_host(session, self)`: the host the session was opened on, here the pool
/// master (the only host that accepts logins).
pub(super) fn get_this_host(sh: &Shared, method: &str, args: &[Value]) -> ApiResult {
    let s = arg_str(args, 0, method)?;
    let db = sh.lock();
    if !db.sessions.contains(s) {
        return Err(fail("HANDLE_INVALID", &["session", s]));
    }
    let master = db
        .refs_of("pool")
        .first()
        .and_then(|p| db.objects.get(p))
        .and_then(|p| p.fields.get("master").and_then(Value::as_str))
        .unwrap_or(super::NULL_REF)
        .to_string();
    Ok(Value::String(master))
}
