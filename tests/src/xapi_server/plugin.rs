//! `host.call_plugin(session, host, plugin, fn, args)`: runs `plugin_dir/plugin` as xapi runs
//! `/etc/xapi.d/plugins/<plugin>` (xen-api `ocaml/xapi/xapi_plugins.ml`): the XML-RPC
//! methodCall `fn(session, args)` in argv[1], the XML-RPC reply on stdout, whose string value
//! is the result. `XENAPI_MISSING_PLUGIN [plugin]` when there is no such executable,
//! `XENAPI_PLUGIN_FAILURE [reason, stdout, stderr]` when it fails.

use std::sync::Arc;
use std::time::Duration;

use xenft_xapi::xmlrpc::{self, Value};

use super::calls::arg_str;
use super::{fail, ApiResult, Shared};

pub(super) async fn call_plugin(
    sh: &Arc<Shared>,
    method: &str,
    session: &str,
    args: &[Value],
) -> ApiResult {
    let host = arg_str(args, 0, method)?;
    let plugin = arg_str(args, 1, method)?;
    let func = arg_str(args, 2, method)?;
    let fargs = args[3]
        .as_struct()
        .ok_or_else(|| fail("FIELD_TYPE_ERROR", &["args"]))?
        .clone();
    sh.lock().obj("host", host)?;
    let Some(dir) = &sh.cfg.plugin_dir else {
        return Err(fail("XENAPI_MISSING_PLUGIN", &[plugin]));
    };
    if plugin.is_empty() || plugin.contains('/') || plugin.starts_with('.') {
        return Err(fail("XENAPI_MISSING_PLUGIN", &[plugin]));
    }
    let path = dir.join(plugin);
    if !path.is_file() {
        return Err(fail("XENAPI_MISSING_PLUGIN", &[plugin]));
    }
    let call = xmlrpc::encode_call(func, &[Value::str(session), Value::Struct(fargs)]);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(&path)
            .arg(call)
            .env("XENFT_URL", &sh.url)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let out = match out {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(fail("XENAPI_PLUGIN_FAILURE", &["exec", "", &e.to_string()])),
        Err(_) => return Err(fail("XENAPI_PLUGIN_FAILURE", &["timeout", "", ""])),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        return Err(fail(
            "XENAPI_PLUGIN_FAILURE",
            &["non-zero exit", &stdout, &stderr],
        ));
    }
    match xmlrpc::decode_response(&stdout) {
        Ok(xmlrpc::Response::Success(v)) => match xenft_xapi::client::unwrap_envelope(v) {
            Ok(Value::String(s)) => Ok(Value::String(s)),
            Ok(other) => Err(fail(
                "XENAPI_PLUGIN_FAILURE",
                &["result is not a string", &format!("{other:?}"), ""],
            )),
            Err(xenft_xapi::XapiError::Api { code, params }) => Err((code, params)),
            Err(e) => Err(fail(
                "XENAPI_PLUGIN_FAILURE",
                &["bad envelope", &stdout, &e.to_string()],
            )),
        },
        Ok(xmlrpc::Response::Fault { code, message }) => Err(fail(
            "XENAPI_PLUGIN_FAILURE",
            &["fault", &code.to_string(), &message],
        )),
        Err(e) => Err(fail(
            "XENAPI_PLUGIN_FAILURE",
            &["unparsable output", &stdout, &e.to_string()],
        )),
    }
}
