//! The xapi host plugin (`/etc/xapi.d/plugins/xenft`), called as
//! `host.call_plugin(host, "xenft", fn, args)`.
//!
//! Protocol (xapi's plugin convention, as implemented by `XenAPIPlugin.py`): xapi runs the
//! executable with ONE argument, an XML-RPC `<methodCall>` whose method name is `fn` and whose
//! parameters are `(session_ref, struct<string,string> args)`. The plugin prints an XML-RPC
//! `<methodResponse>` whose single value is the XenAPI envelope: `{Status: "Success", Value:
//! <string>}` — we put JSON in the string, as XCP-ng's plugins do — or `{Status: "Failure",
//! ErrorDescription: [code, params...]}`, which xapi hands to the caller as a XenAPI error.
//!
//! Functions (mirroring the CLI): `protect {vm, level, secondary}`, `unprotect {vm}`,
//! `status {vm}`, `list {}`, `pool_status {}`, `compat_check {host?}`. Anything malformed
//! (argument count, XML, parameter types) is answered with a Failure, never a crash.
//!
//! The plugin talks back to xapi with the caller's session over xapi's Unix socket, or over
//! `XENFT_URL` when set (the test server sets it).

use std::collections::BTreeMap;

use crate::client::{failure_envelope, success_envelope, ConnectOptions, Credentials, XenApi};
use crate::ops::{self, OpError};
use crate::registry::{Level, RegistryError};
use crate::transport::{Endpoint, XAPI_UNIX_SOCKET};
use crate::xmlrpc::{self, Value};
use crate::XapiError;

/// Failure code: the call itself is malformed.
pub const BAD_CALL: &str = "XENFT_PLUGIN_BAD_CALL";
/// Failure code: unknown function (same code as XenAPIPlugin.py).
pub const UNKNOWN_FUNCTION: &str = "UNKNOWN_XENAPI_PLUGIN_FUNCTION";
/// Failure code: no such VM/host.
pub const NOT_FOUND: &str = "XENFT_NOT_FOUND";
/// Failure code: admission control or compat check refused.
pub const REFUSED: &str = "XENFT_REFUSED";
/// Failure code: bad argument value.
pub const INVALID: &str = "XENFT_INVALID_ARGUMENT";
/// Failure code: registry malformed, newer, or changed concurrently.
pub const REGISTRY: &str = "XENFT_REGISTRY";
/// Failure code: xapi could not be reached.
pub const XAPI: &str = "XENFT_XAPI_UNREACHABLE";

/// Functions the plugin offers.
pub const FUNCTIONS: &[&str] = &[
    "protect",
    "unprotect",
    "status",
    "list",
    "pool_status",
    "compat_check",
];

type Failure = (String, Vec<String>);

fn failure(code: &str, msg: impl Into<String>) -> Failure {
    (code.to_string(), vec![msg.into()])
}

fn op_failure(e: OpError) -> Failure {
    match e {
        OpError::NotFound { .. } | OpError::Ambiguous { .. } => failure(NOT_FOUND, e.to_string()),
        OpError::Refused(_) => failure(REFUSED, e.to_string()),
        OpError::Invalid(_) => failure(INVALID, e.to_string()),
        OpError::Api(a) | OpError::Registry(RegistryError::Api(a)) => api_failure(a),
        OpError::Registry(r) => failure(REGISTRY, r.to_string()),
    }
}

fn api_failure(e: XapiError) -> Failure {
    match e {
        XapiError::Api { code, params } => (code, params),
        other => failure(XAPI, other.to_string()),
    }
}

/// A parsed plugin call.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginCall {
    /// The function.
    pub function: String,
    /// The caller's session.
    pub session: String,
    /// The arguments.
    pub args: BTreeMap<String, String>,
}

/// Parses the plugin's argv (without argv\[0\]).
pub fn parse_call(argv: &[String]) -> Result<PluginCall, Failure> {
    let [call] = argv else {
        return Err(failure(
            BAD_CALL,
            format!(
                "expected one argument (an XML-RPC methodCall), got {}",
                argv.len()
            ),
        ));
    };
    let (function, params) =
        xmlrpc::decode_call(call).map_err(|e| failure(BAD_CALL, e.to_string()))?;
    let [Value::String(session), Value::Struct(raw)] = params.as_slice() else {
        return Err(failure(
            BAD_CALL,
            "parameters must be (session_ref, struct<string,string>)",
        ));
    };
    let mut args = BTreeMap::new();
    for (k, v) in raw {
        let Value::String(s) = v else {
            return Err(failure(BAD_CALL, format!("argument {k:?} is not a string")));
        };
        args.insert(k.clone(), s.clone());
    }
    if !FUNCTIONS.contains(&function.as_str()) {
        return Err((UNKNOWN_FUNCTION.to_string(), vec![function]));
    }
    Ok(PluginCall {
        function,
        session: session.clone(),
        args,
    })
}

fn arg<'a>(c: &'a PluginCall, k: &str) -> Result<&'a str, Failure> {
    c.args
        .get(k)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| failure(INVALID, format!("{} needs argument {k:?}", c.function)))
}

fn to_json(v: &impl serde::Serialize) -> Result<Value, Failure> {
    serde_json::to_string(v)
        .map(Value::String)
        .map_err(|e| failure(INVALID, e.to_string()))
}

/// Runs a parsed call against xapi.
pub async fn execute(api: &XenApi, c: &PluginCall) -> Result<Value, Failure> {
    match c.function.as_str() {
        "protect" => {
            let l = arg(c, "level")?;
            let level = Level::parse(l)
                .ok_or_else(|| failure(INVALID, format!("level {l:?}: 1, 2 or 3")))?;
            let r = ops::protect(api, arg(c, "vm")?, level, arg(c, "secondary")?)
                .await
                .map_err(op_failure)?;
            to_json(&r)
        }
        "unprotect" => {
            let was = ops::unprotect(api, arg(c, "vm")?)
                .await
                .map_err(op_failure)?;
            to_json(&serde_json::json!({"was_protected": was}))
        }
        "status" => to_json(&ops::status(api, arg(c, "vm")?).await.map_err(op_failure)?),
        "list" => to_json(&ops::list(api).await.map_err(op_failure)?),
        "pool_status" => to_json(&ops::pool_status(api).await.map_err(op_failure)?),
        "compat_check" => {
            let local = ops::LocalFacts::gather();
            let host = match c.args.get("host").filter(|h| !h.is_empty()) {
                Some(h) => h.clone(),
                None => local.hostname.clone(),
            };
            to_json(
                &ops::compat_check(api, &host, &local)
                    .await
                    .map_err(op_failure)?,
            )
        }
        other => Err((UNKNOWN_FUNCTION.to_string(), vec![other.to_string()])),
    }
}

/// Handles one invocation: argv (without argv\[0\]) and the xapi address override
/// (`XENFT_URL`); returns the `<methodResponse>` to print.
pub async fn handle(argv: &[String], url: Option<&str>) -> String {
    let result = async {
        let call = parse_call(argv)?;
        let endpoint = match url {
            Some(u) => Endpoint::parse(u).map_err(api_failure)?,
            None => Endpoint::Unix(XAPI_UNIX_SOCKET.into()),
        };
        let mut opts = ConnectOptions::new(
            endpoint,
            Credentials {
                user: "root".into(),
                password: String::new(),
            },
        );
        opts.originator = "xenft-plugin".into();
        let api = XenApi::new(opts).map_err(api_failure)?;
        api.set_session(call.session.clone()).await;
        execute(&api, &call).await
    }
    .await;
    let env = match result {
        Ok(v) => success_envelope(v),
        Err((code, params)) => failure_envelope(&code, &params),
    };
    xmlrpc::encode_response(&env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_calls_are_failures() {
        assert_eq!(parse_call(&[]).unwrap_err().0, BAD_CALL);
        assert_eq!(parse_call(&["<nope".into()]).unwrap_err().0, BAD_CALL);
        let wrong_types = xmlrpc::encode_call("status", &[Value::Int(1)]);
        assert_eq!(parse_call(&[wrong_types]).unwrap_err().0, BAD_CALL);
        let unknown = xmlrpc::encode_call(
            "format_disks",
            &[Value::str("OpaqueRef:s"), Value::Struct(BTreeMap::new())],
        );
        assert_eq!(
            parse_call(&[unknown]).unwrap_err(),
            (
                UNKNOWN_FUNCTION.to_string(),
                vec!["format_disks".to_string()]
            )
        );
    }
}
