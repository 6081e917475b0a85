//! A blocking client for the shims' line-oriented control sockets: one request line out, one
//! JSON line back, on a fresh connection per request. Everything read is untrusted: the reply
//! is bounded ([`MAX_REPLY`]), the connection has read and write timeouts, and a reply that is
//! not a JSON object with `"ok": true` is a typed error.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// Longest accepted reply line.
pub const MAX_REPLY: u64 = 1 << 20;
/// Longest error text kept from a reply.
const MAX_ERROR_TEXT: usize = 512;

/// A control request that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached (the shim is not running).
    #[error("{path}: cannot connect: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Reading or writing failed, or timed out.
    #[error("{path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The shim closed the connection without replying.
    #[error("{0}: closed without a reply")]
    NoReply(PathBuf),
    /// The reply line exceeds [`MAX_REPLY`].
    #[error("{0}: reply longer than {MAX_REPLY} bytes")]
    TooLong(PathBuf),
    /// The reply is not a JSON object, or misses fields the caller needs.
    #[error("{path}: malformed reply: {detail}")]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The shim refused (`"ok": false`).
    #[error("{path}: refused: {reason}")]
    Refused {
        /// The socket.
        path: PathBuf,
        /// The shim's error text (truncated).
        reason: String,
    },
}

/// One shim's control socket.
#[derive(Clone, Debug)]
pub struct ControlSocket {
    path: PathBuf,
    timeout: Duration,
}

impl ControlSocket {
    /// A client for the socket at `path`; each request must complete within `timeout`.
    #[must_use]
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            path: path.into(),
            timeout,
        }
    }

    /// The socket path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `line` and returns the reply object (checked for `"ok": true`).
    ///
    /// # Errors
    /// [`ControlError`].
    pub fn request(&self, line: &str) -> Result<Value, ControlError> {
        self.request_within(line, self.timeout)
    }

    /// Like [`Self::request`] with a per-request timeout (long operations).
    ///
    /// # Errors
    /// [`ControlError`].
    pub fn request_within(&self, line: &str, timeout: Duration) -> Result<Value, ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.path).map_err(|source| ControlError::Connect {
            path: self.path.clone(),
            source,
        })?;
        let timeout = timeout.max(Duration::from_millis(1));
        s.set_read_timeout(Some(timeout)).map_err(io)?;
        s.set_write_timeout(Some(timeout)).map_err(io)?;
        let mut msg = line.trim().to_string();
        msg.push('\n');
        s.write_all(msg.as_bytes()).map_err(io)?;
        let mut buf = Vec::new();
        BufReader::new((&s).take(MAX_REPLY))
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if buf.is_empty() {
            return Err(ControlError::NoReply(self.path.clone()));
        }
        if buf.last() != Some(&b'\n') && u64::try_from(buf.len()).unwrap_or(u64::MAX) >= MAX_REPLY {
            return Err(ControlError::TooLong(self.path.clone()));
        }
        parse_reply(&self.path, &buf)
    }
}

/// Checks a reply line: a JSON object with `"ok": true`, or a refusal.
///
/// # Errors
/// [`ControlError::Malformed`] or [`ControlError::Refused`].
pub fn parse_reply(path: &Path, line: &[u8]) -> Result<Value, ControlError> {
    let malformed = |detail: String| ControlError::Malformed {
        path: path.to_path_buf(),
        detail,
    };
    let v: Value = serde_json::from_slice(line).map_err(|e| malformed(e.to_string()))?;
    if !v.is_object() {
        return Err(malformed("not a JSON object".into()));
    }
    match v.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(v),
        Some(false) => {
            let mut reason: String = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_ERROR_TEXT)
                .collect();
            if reason.is_empty() {
                reason = "no reason given".into();
            }
            Err(ControlError::Refused {
                path: path.to_path_buf(),
                reason,
            })
        }
        None => Err(malformed("no boolean \"ok\" field".into())),
    }
}

/// Reads a typed view out of a reply.
///
/// # Errors
/// [`ControlError::Malformed`] naming the field.
pub fn field<T: serde::de::DeserializeOwned>(
    path: &Path,
    v: &Value,
    name: &str,
) -> Result<T, ControlError> {
    let raw = v.get(name).cloned().unwrap_or(Value::Null);
    serde_json::from_value(raw).map_err(|e| ControlError::Malformed {
        path: path.to_path_buf(),
        detail: format!("field {name:?}: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve_once(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ctl.sock");
        let l = UnixListener::bind(&p).unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut line = String::new();
                let _ = BufReader::new(&s).read_line(&mut line);
                let _ = s.write_all(reply);
            }
        });
        (d, p)
    }

    #[test]
    fn an_ok_reply_is_returned() {
        let (_d, p) = serve_once(b"{\"ok\":true,\"role\":\"primary\"}\n");
        let v = ControlSocket::new(&p, Duration::from_secs(2))
            .request("status")
            .unwrap();
        assert_eq!(v["role"], "primary");
    }

    #[test]
    fn a_refusal_carries_the_shims_reason() {
        let (_d, p) = serve_once(b"{\"ok\":false,\"error\":\"unknown command\"}\n");
        let e = ControlSocket::new(&p, Duration::from_secs(2))
            .request("bogus")
            .unwrap_err();
        assert!(matches!(&e, ControlError::Refused { reason, .. } if reason == "unknown command"));
    }

    #[test]
    fn garbage_and_silence_are_typed_errors() {
        let (_d, p) = serve_once(b"not json\n");
        let e = ControlSocket::new(&p, Duration::from_secs(2))
            .request("status")
            .unwrap_err();
        assert!(matches!(e, ControlError::Malformed { .. }), "{e}");
        let (_d2, p2) = serve_once(b"");
        let e = ControlSocket::new(&p2, Duration::from_secs(2))
            .request("status")
            .unwrap_err();
        assert!(matches!(e, ControlError::NoReply(_)), "{e}");
    }

    #[test]
    fn a_shim_that_never_answers_times_out() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ctl.sock");
        let _l = UnixListener::bind(&p).unwrap();
        let e = ControlSocket::new(&p, Duration::from_millis(100))
            .request("status")
            .unwrap_err();
        assert!(matches!(e, ControlError::Io { .. }), "{e}");
    }

    #[test]
    fn a_missing_socket_is_a_connect_error() {
        let e = ControlSocket::new("/nonexistent/xenft.sock", Duration::from_millis(100))
            .request("status")
            .unwrap_err();
        assert!(matches!(e, ControlError::Connect { .. }), "{e}");
    }
}

/// A scripted control socket for the drivers' unit tests: answers each request line with
/// `reply(line)` and records the lines.
#[cfg(test)]
pub(crate) mod fake {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    /// The reply function.
    pub(crate) type Reply = Box<dyn Fn(&str) -> String + Send>;

    /// Serves `reply` on a fresh socket; returns its directory (keep it alive), path and log.
    pub(crate) fn serve(reply: Reply) -> (tempfile::TempDir, PathBuf, Arc<Mutex<Vec<String>>>) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ctl.sock");
        let l = UnixListener::bind(&p).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut line = String::new();
                if BufReader::new(&s).read_line(&mut line).is_err() {
                    continue;
                }
                let line = line.trim().to_string();
                let out = reply(&line);
                s2.lock().unwrap().push(line);
                let _ = s.write_all(format!("{out}\n").as_bytes());
            }
        });
        (d, p, seen)
    }
}
