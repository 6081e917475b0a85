//! The methods xapi has: the datamodel list kept in `xapi-plugin/datamodel/xapi-methods.txt`
//! (parsed by [`xenft_xapi::datamodel`]).
//!
//! xapi's generated dispatcher (xen-api `ocaml/idl/ocaml_backend/gen_server.ml`) matches the
//! method name first (`MESSAGE_METHOD_UNKNOWN [name]` when none matches), then the parameter
//! count (`MESSAGE_PARAMETER_COUNT_MISMATCH [name, expected, received]`), and only then
//! unmarshals and checks the session; `system.listMethods` returns every message's sync wire
//! name, without a session.

use xenft_xapi::datamodel::{Methods, Signature};
use xenft_xapi::xmlrpc::Value;

use super::Failure;

/// The method list.
pub(super) fn methods() -> &'static Methods {
    Methods::shipped()
}

/// xapi's checks before the session is looked at: the name exists, the count fits.
pub(super) fn check(method: &str, n_params: usize) -> Result<Signature, Failure> {
    methods().check_call(method, n_params)
}

/// `system.listMethods`: the datamodel's messages (xapi does not list `system.*` itself).
pub(super) fn list_methods() -> Value {
    Value::Array(
        methods()
            .names()
            .filter(|n| !n.starts_with("system."))
            .map(Value::str)
            .collect(),
    )
}

/// Whether `class` is a datamodel class (spelled as in method names: `VM`, `host`).
pub(super) fn is_class(class: &str) -> bool {
    methods().has_class(class) && class != "system"
}
