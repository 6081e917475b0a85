//! The error a plugin call ends with, in the shape xapi-storage-script reads.
//!
//! Source: xapi-project/xen-api `ocaml/xapi-storage-script/main.ml` (`fork_exec_rpc`): on a
//! non-zero exit status, stdout must be one JSON object that
//! `xapi_storage_script_types.ml`'s `error_of_rpc` parses: `{"code": string, "params":
//! [string], "backtrace": {"error": string, "files": [string], "lines": [int]}}` (the shape
//! Python's `xapi.py` prints). xapi turns it into `Backend_error_with_backtrace(code,
//! backtrace :: params)`; `params = ["Activated_on_another_host", host]` becomes SMAPIv2's
//! `Activated_on_another_host`. Anything else on stdout becomes `SCRIPT_FAILED` with the raw
//! text, so every failure here, including bad input, goes through [`SrError::to_json`].

use serde_json::{json, Value};

/// A failed call: an error code xapi shows and its parameters (the first one is the
/// human-readable reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrError {
    /// The code (`Volume_does_not_exist`, `Sr_not_attached`, `Unimplemented`,
    /// `Activated_on_another_host` from `ocaml/xapi-storage/generator/lib/control.ml`'s
    /// `exns`, or one of ours: `XENFT_SR_BAD_ARGUMENTS`, `XENFT_SR_FAILED`, ...).
    pub code: String,
    /// Parameters, the reason first.
    pub params: Vec<String>,
}

impl SrError {
    fn new(code: &str, params: Vec<String>) -> Self {
        Self {
            code: code.into(),
            params,
        }
    }

    /// The arguments are malformed (missing field, wrong type, hostile value).
    pub fn bad_args(why: impl Into<String>) -> Self {
        Self::new("XENFT_SR_BAD_ARGUMENTS", vec![why.into()])
    }

    /// Something on this host failed (file, process, peer).
    pub fn failed(why: impl Into<String>) -> Self {
        Self::new("XENFT_SR_FAILED", vec![why.into()])
    }

    /// The volume is not in the SR (`control.ml`: `Volume_does_not_exist of string`).
    pub fn no_volume(key: &str) -> Self {
        Self::new("Volume_does_not_exist", vec![key.into()])
    }

    /// The SR is not attached on this host (`control.ml`: `Sr_not_attached of string`).
    pub fn not_attached(sr: &str) -> Self {
        Self::new("Sr_not_attached", vec![sr.into()])
    }

    /// The operation is refused by design (`control.ml`: `Unimplemented of string`).
    pub fn unimplemented(why: impl Into<String>) -> Self {
        Self::new("Unimplemented", vec![why.into()])
    }

    /// The volume is active on the other host of the pair (`main.ml`:
    /// `backend_backtrace_error` maps these params to `Activated_on_another_host`).
    pub fn active_elsewhere(host: &str) -> Self {
        Self::new(
            "Activated_on_another_host",
            vec!["Activated_on_another_host".into(), host.into()],
        )
    }

    /// The JSON object printed on stdout before exiting non-zero.
    #[must_use]
    pub fn to_json(&self) -> Value {
        json!({
            "code": self.code,
            "params": self.params,
            "backtrace": {"error": self.to_string(), "files": [], "lines": []},
        })
    }
}

impl std::fmt::Display for SrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.params.join(": "))
    }
}

impl std::error::Error for SrError {}

/// Result of a plugin call.
pub type SrResult<T> = Result<T, SrError>;

/// Maps an I/O error on `what` to [`SrError::failed`].
pub fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> SrError {
    move |e| SrError::failed(format!("{what}: {e}"))
}
