//! Errors of the XenAPI client.
//!
//! XenAPI reports API failures inside a successful XML-RPC reply as
//! `{Status: "Failure", ErrorDescription: [code, params...]}` (wire-protocol.md, "Return Values
//! and Status Codes"); [`XapiError::Api`] keeps the code and every parameter so callers can match
//! on the code (e.g. [`codes::MAP_DUPLICATE_KEY`]) and show the parameters.

use crate::xmlrpc::XmlRpcError;

/// XenAPI error codes the product matches on (xen-api `ocaml/xapi-consts/api_errors.ml`).
pub mod codes {
    /// The session reference is unknown or expired: log in again.
    pub const SESSION_INVALID: &str = "SESSION_INVALID";
    /// Wrong user name or password.
    pub const SESSION_AUTHENTICATION_FAILED: &str = "SESSION_AUTHENTICATION_FAILED";
    /// `add_to_<map>` with a key that is already there: `[class, field, ref, key]`.
    pub const MAP_DUPLICATE_KEY: &str = "MAP_DUPLICATE_KEY";
    /// An object reference that does not exist: `[class, ref]`.
    pub const HANDLE_INVALID: &str = "HANDLE_INVALID";
    /// A UUID that does not exist: `[class, uuid]`.
    pub const UUID_INVALID: &str = "UUID_INVALID";
    /// `event.from` token too old: the caller must re-read everything.
    pub const EVENTS_LOST: &str = "EVENTS_LOST";
    /// The method does not exist.
    pub const MESSAGE_METHOD_UNKNOWN: &str = "MESSAGE_METHOD_UNKNOWN";
    /// Wrong number of parameters: `[method, expected, received]`.
    pub const MESSAGE_PARAMETER_COUNT_MISMATCH: &str = "MESSAGE_PARAMETER_COUNT_MISMATCH";
    /// The VM is in the wrong power state: `[vm, expected, actual]`.
    pub const VM_BAD_POWER_STATE: &str = "VM_BAD_POWER_STATE";
    /// Not enough free memory on the host: `[needed, available]`.
    pub const HOST_NOT_ENOUGH_FREE_MEMORY: &str = "HOST_NOT_ENOUGH_FREE_MEMORY";
    /// A host plugin failed: `[reason, stdout, stderr]` or as the plugin reported.
    pub const XENAPI_PLUGIN_FAILURE: &str = "XENAPI_PLUGIN_FAILURE";
    /// A parameter has the wrong type or value: `[field, value]`.
    pub const INVALID_VALUE: &str = "INVALID_VALUE";
    /// A field type mismatch: `[expected, received]`.
    pub const FIELD_TYPE_ERROR: &str = "FIELD_TYPE_ERROR";
}

/// What can go wrong talking to xapi.
#[derive(Debug, thiserror::Error)]
pub enum XapiError {
    /// xapi answered with a XenAPI failure.
    #[error("XenAPI error {code}{}", fmt_params(.params))]
    Api {
        /// The error code (first element of `ErrorDescription`).
        code: String,
        /// The remaining elements.
        params: Vec<String>,
    },
    /// The connection could not be made or broke.
    #[error("cannot talk to xapi at {target}: {reason}")]
    Connect {
        /// URL or socket path.
        target: String,
        /// Why.
        reason: String,
    },
    /// The call did not complete in time.
    #[error("call {method} to {target} timed out after {secs} s")]
    Timeout {
        /// URL or socket path.
        target: String,
        /// The method.
        method: String,
        /// The limit.
        secs: u64,
    },
    /// A non-200 HTTP status.
    #[error("HTTP status {status} from {target}")]
    Http {
        /// The HTTP status code.
        status: u16,
        /// URL or socket path.
        target: String,
    },
    /// The reply was larger than we accept.
    #[error("reply from {target} larger than {limit} bytes")]
    TooLarge {
        /// URL or socket path.
        target: String,
        /// The limit.
        limit: usize,
    },
    /// The reply was not valid XML-RPC.
    #[error("malformed reply from xapi: {0}")]
    Decode(#[from] XmlRpcError),
    /// The reply was valid XML-RPC but not a XenAPI envelope, or JSON-RPC was malformed.
    #[error("malformed XenAPI reply: {0}")]
    Envelope(String),
    /// XML-RPC level fault (xapi uses these for protocol-level problems only).
    #[error("XML-RPC fault {code}: {message}")]
    Fault {
        /// `faultCode`.
        code: i32,
        /// `faultString`.
        message: String,
    },
    /// A value in a reply had the wrong type.
    #[error("unexpected value for {what}: {got}")]
    Type {
        /// What we were reading.
        what: String,
        /// What we got (abbreviated).
        got: String,
    },
    /// A call the client refuses to make because xapi's datamodel has no such method (e.g.
    /// `pool.get_by_name_label`, a map field the class does not have).
    #[error("{0} is not a XenAPI method xenft calls")]
    NotInDatamodel(String),
    /// The client configuration is unusable (bad URL, unreadable CA file...).
    #[error("invalid XenAPI connection settings: {0}")]
    Config(String),
}

fn fmt_params(p: &[String]) -> String {
    if p.is_empty() {
        String::new()
    } else {
        format!(" [{}]", p.join(", "))
    }
}

impl XapiError {
    /// The XenAPI error code, if this is an API failure.
    pub fn code(&self) -> Option<&str> {
        match self {
            XapiError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// True if this is the API failure `code`.
    pub fn is(&self, code: &str) -> bool {
        self.code() == Some(code)
    }

    pub(crate) fn type_err(what: &str, got: &crate::xmlrpc::Value) -> XapiError {
        let mut got = format!("{got:?}");
        if got.len() > 80 {
            let mut cut = 80;
            while !got.is_char_boundary(cut) {
                cut -= 1;
            }
            got.truncate(cut);
            got.push('…');
        }
        XapiError::Type {
            what: what.to_string(),
            got,
        }
    }
}
