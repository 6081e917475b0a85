//! Calls to the same program on the other host of the pair: the `Peer.*` methods (never called
//! by xapi, not installed as scripts). The conduit is [`HostConfig::peer_command`]: an argv
//! that runs `xenft-sr` on the peer (the method name appended, the arguments on stdin as
//! JSON, the reply read exactly as xapi-storage-script reads a plugin's). Tests use
//! `ip netns exec`; on a pool it is the route an SMAPIv1 driver such as LinstorSR takes
//! (`host.call_plugin` on the other host) or ssh between dom0s, configured per host.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::HostConfig;
use crate::error::{SrError, SrResult};

/// A peer call taking longer is abandoned (the peer may be down: callers carry on degraded).
const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest reply read from the peer.
const MAX_REPLY: u64 = 1 << 20;

/// Runs `method` on the peer with `args`; its reply or its error.
pub fn call(host: &HostConfig, method: &str, args: &Value) -> SrResult<Value> {
    let Some((prog, rest)) = host.peer_command.split_first() else {
        return Err(SrError::failed(
            "no peer conduit: peer_command is not set in the host configuration",
        ));
    };
    let mut child = Command::new(prog)
        .args(rest)
        .arg(method)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| SrError::failed(format!("peer command {prog}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(args.to_string().as_bytes());
    }
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| SrError::failed("peer command: no stdout"))?;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = (&mut stdout).take(MAX_REPLY).read_to_end(&mut out);
        out
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > PEER_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SrError::failed(format!(
                    "peer call {method} timed out after {PEER_TIMEOUT:?}"
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(SrError::failed(format!("peer call {method}: {e}"))),
        }
    };
    let out = reader.join().unwrap_or_default();
    let v: Value = serde_json::from_slice(&out).map_err(|_| {
        SrError::failed(format!(
            "peer call {method}: exit {status}, reply is not JSON: {}",
            String::from_utf8_lossy(&out[..out.len().min(300)])
        ))
    })?;
    if status.success() {
        return Ok(v);
    }
    let code = v.get("code").and_then(Value::as_str);
    let params = v.get("params").and_then(Value::as_array).map(|p| {
        p.iter()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect()
    });
    match (code, params) {
        (Some(code), Some(params)) => Err(SrError {
            code: code.into(),
            params,
        }),
        _ => Err(SrError::failed(format!(
            "peer call {method}: exit {status}: {v}"
        ))),
    }
}

/// Whether the error came from the peer refusing because the volume is active there.
#[must_use]
pub fn is_active_elsewhere(e: &SrError) -> bool {
    e.code == "Activated_on_another_host"
}
