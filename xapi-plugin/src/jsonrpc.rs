//! JSON-RPC 2.0 encoding of XenAPI calls (xapi's `/jsonrpc` endpoint).
//!
//! Request: `{"jsonrpc": "2.0", "method": "VM.get_all", "params": [session, ...], "id": N}`.
//! Success: `{"jsonrpc": "2.0", "result": <value>, "id": N}`; failure:
//! `{"jsonrpc": "2.0", "error": {"code": 1, "message": "<XenAPI code>", "data": [params]}, "id": N}`
//! (xen-api `doc/content/xen-api/wire-protocol.md`, JSON-RPC section).
//!
//! Values map onto [`Value`] so the rest of the client is encoding-agnostic: JSON integers
//! become the decimal strings XML-RPC uses for XenAPI `int`, and integral-valued strings go out
//! as strings (xapi accepts both for `int` parameters in JSON-RPC).

use serde_json::Value as Json;

use crate::error::XapiError;
use crate::xmlrpc::Value;

/// Largest nesting accepted when converting JSON.
const MAX_DEPTH: usize = 64;

/// [`Value`] → JSON.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Int(i) => Json::from(*i),
        Value::Bool(b) => Json::Bool(*b),
        Value::String(s) | Value::DateTime(s) | Value::Base64(s) => Json::String(s.clone()),
        Value::Double(d) => serde_json::Number::from_f64(*d).map_or(Json::Null, Json::Number),
        Value::Struct(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        Value::Array(a) => Json::Array(a.iter().map(to_json).collect()),
        Value::Nil => Json::Null,
    }
}

/// JSON → [`Value`]; integers become decimal strings (XenAPI `int`).
pub fn from_json(j: &Json) -> Result<Value, XapiError> {
    from_json_depth(j, 0)
}

fn from_json_depth(j: &Json, depth: usize) -> Result<Value, XapiError> {
    if depth > MAX_DEPTH {
        return Err(XapiError::Envelope("JSON nested too deeply".into()));
    }
    Ok(match j {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::String(i.to_string()),
            (None, Some(u)) => Value::String(u.to_string()),
            _ => Value::Double(n.as_f64().unwrap_or(0.0)),
        },
        Json::String(s) => Value::String(s.clone()),
        Json::Array(a) => Value::Array(
            a.iter()
                .map(|x| from_json_depth(x, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Json::Object(m) => Value::Struct(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), from_json_depth(v, depth + 1)?)))
                .collect::<Result<_, XapiError>>()?,
        ),
    })
}

/// Decodes a JSON-RPC reply into the result or the XenAPI error.
pub fn decode_reply(body: &[u8]) -> Result<Value, XapiError> {
    let j: Json = serde_json::from_slice(body)
        .map_err(|e| XapiError::Envelope(format!("JSON-RPC reply is not JSON: {e}")))?;
    let obj = j
        .as_object()
        .ok_or_else(|| XapiError::Envelope("JSON-RPC reply is not an object".into()))?;
    if let Some(err) = obj.get("error").filter(|e| !e.is_null()) {
        let code = err
            .get("message")
            .and_then(Json::as_str)
            .unwrap_or("UNKNOWN_ERROR")
            .to_string();
        let params = err
            .get("data")
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .map(|x| match x {
                        Json::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        return Err(XapiError::Api { code, params });
    }
    let result = obj
        .get("result")
        .ok_or_else(|| XapiError::Envelope("JSON-RPC reply without result or error".into()))?;
    from_json(result)
}

/// Server side: decodes a request into (method, params, id).
pub fn decode_request(body: &[u8]) -> Result<(String, Vec<Value>, Json), XapiError> {
    let j: Json = serde_json::from_slice(body)
        .map_err(|e| XapiError::Envelope(format!("JSON-RPC request is not JSON: {e}")))?;
    let method = j
        .get("method")
        .and_then(Json::as_str)
        .ok_or_else(|| XapiError::Envelope("JSON-RPC request without method".into()))?
        .to_string();
    let params = match j.get("params") {
        Some(Json::Array(a)) => a.iter().map(from_json).collect::<Result<_, _>>()?,
        None | Some(Json::Null) => Vec::new(),
        Some(_) => {
            return Err(XapiError::Envelope(
                "JSON-RPC params is not an array".into(),
            ))
        }
    };
    let id = j.get("id").cloned().unwrap_or(Json::Null);
    Ok((method, params, id))
}

/// Server side: encodes a reply.
pub fn encode_reply(id: &Json, result: Result<&Value, (&str, &[String])>) -> Vec<u8> {
    let j = match result {
        Ok(v) => serde_json::json!({"jsonrpc": "2.0", "result": to_json(v), "id": id}),
        Err((code, params)) => serde_json::json!({
            "jsonrpc": "2.0",
            "error": {"code": 1, "message": code, "data": params},
            "id": id,
        }),
    };
    serde_json::to_vec(&j).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reply_maps_to_api_error() {
        let body = br#"{"jsonrpc":"2.0","error":{"code":1,"message":"SESSION_INVALID","data":["OpaqueRef:x"]},"id":1}"#;
        match decode_reply(body).unwrap_err() {
            XapiError::Api { code, params } => {
                assert_eq!(code, "SESSION_INVALID");
                assert_eq!(params, vec!["OpaqueRef:x".to_string()]);
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn integers_become_xenapi_int_strings() {
        let v =
            decode_reply(br#"{"jsonrpc":"2.0","result":{"memory":8589934592},"id":1}"#).unwrap();
        assert_eq!(
            v.as_struct().unwrap()["memory"].as_i64(),
            Some(8_589_934_592)
        );
        assert!(decode_reply(b"[1]").is_err());
        assert!(decode_reply(b"not json").is_err());
    }
}
