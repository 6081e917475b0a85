//! The components' control sockets as tests and benches use them: through the contract's
//! client (`xenft_control`), like every other process.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use xenft_control::{blkback, checkpoint, netback, Blkback, Client, Component, ControlError};

/// How long one test request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One request to the component `C` at `sock`.
///
/// # Errors
/// The client's error, or the component's refusal.
pub fn call<C: Component>(sock: &Path, req: &C::Request) -> Result<C::Reply, ControlError> {
    Client::<C>::new(sock, REQUEST_TIMEOUT).call(req)
}

/// The reply as the JSON object a script reads on the socket (`{"reply":"status",...}`);
/// `None` when the component could not be reached or refused.
#[must_use]
pub fn reply_json<C: Component>(sock: &Path, req: &C::Request) -> Option<Value> {
    call::<C>(sock, req)
        .ok()
        .and_then(|r| serde_json::to_value(r).ok())
}

/// One request to `xenft-blkback`.
///
/// # Errors
/// The client's error, or the shim's refusal.
pub fn blkback_call(sock: &Path, req: &blkback::Request) -> Result<blkback::Reply, ControlError> {
    call::<Blkback>(sock, req)
}

/// `xenft-blkback`'s `status` as JSON (`{"reply":"status","role":..,"primary":{..}}`).
#[must_use]
pub fn blkback_status(sock: &Path) -> Option<Value> {
    reply_json::<Blkback>(sock, &blkback::Request::Status)
}

/// The checkpoint engine's `status` as JSON (`{"reply":"status","state":..,..}`).
#[must_use]
pub fn checkpoint_status(sock: &Path) -> Option<Value> {
    reply_json::<xenft_control::Checkpoint>(sock, &checkpoint::Request::Status)
}

/// `xenft-netback`'s counters as JSON (`{"reply":"counters","counters":{..}}`).
#[must_use]
pub fn netback_counters(sock: &Path) -> Option<Value> {
    reply_json::<xenft_control::Netback>(sock, &netback::Request::Counters)
}

/// Polls the shim's status until `f` accepts it; panics after `timeout` with the last one.
#[must_use]
pub fn wait_blkback_status(sock: &Path, timeout: Duration, f: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(v) = blkback_status(sock) {
            if f(&v) {
                return v;
            }
        }
        assert!(
            start.elapsed() < timeout,
            "timeout waiting on {}: last {:?}",
            sock.display(),
            blkback_status(sock)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A primary's view of its peer link in a status (`""` when absent).
#[must_use]
pub fn peer_link(v: &Value) -> &str {
    v["primary"]["peer"].as_str().unwrap_or("")
}

/// The outcome as the JSON a test asserts on: the reply with `"ok": true`, or a refusal as
/// `{"ok": false, "kind": .., "error": ..}`; `None` when the component could not be reached.
#[must_use]
pub fn outcome_json<C: Component>(sock: &Path, req: &C::Request) -> Option<Value> {
    match call::<C>(sock, req) {
        Ok(r) => {
            let mut v = serde_json::to_value(r).ok()?;
            v["ok"] = Value::Bool(true);
            Some(v)
        }
        Err(ControlError::Refused { reply, .. }) => Some(serde_json::json!({
            "ok": false,
            "kind": reply.kind,
            "error": reply.message,
        })),
        Err(_) => None,
    }
}
