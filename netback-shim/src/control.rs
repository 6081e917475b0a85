//! The control socket of the `xenft-netback` binary: JSON lines over a Unix stream socket.
//!
//! One request per line, one reply per line:
//!
//! ```text
//! {"op":"begin_epoch","epoch":7}          → {"ok":true}
//! {"op":"commit","epoch":7}               → {"ok":true,"released":12}
//! {"op":"discard"}                        → {"ok":true,"discarded":3}
//! {"op":"set_mode","mode":"buffered"}     → {"ok":true}      (passthrough | buffered | standby)
//! {"op":"takeover","mode":"passthrough"}  → {"ok":true,"announced":3}
//! {"op":"announce"}                       → {"ok":true,"announced":3}
//! {"op":"redirect","on":true}             → {"ok":true}      (true | false | null = automatic)
//! {"op":"add_addresses","addresses":["10.0.0.2","fd00::2"]} → {"ok":true}
//! {"op":"counters"}                       → {"ok":true,"counters":{...}}
//! {"op":"subscribe"}                      → {"ok":true}, then {"event":"early_checkpoint","epoch":N} lines
//! ```
//!
//! Errors: `{"ok":false,"error":"..."}`. Lines longer than 64 KiB close the connection. The
//! socket is created mode 0600; at most 16 connections are served at once.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::shim::{Counters, Mode, Shim};

/// Longest accepted request line.
const MAX_LINE: u64 = 64 * 1024;
/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 16;

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// [`Shim::begin_epoch`].
    BeginEpoch {
        /// The epoch.
        epoch: u64,
    },
    /// [`Shim::commit`].
    Commit {
        /// The epoch.
        epoch: u64,
    },
    /// [`Shim::discard`].
    Discard,
    /// [`Shim::set_mode`].
    SetMode {
        /// The new mode.
        mode: Mode,
    },
    /// [`Shim::takeover`].
    Takeover {
        /// The mode after the takeover.
        mode: Mode,
    },
    /// [`Shim::announce`].
    Announce,
    /// [`Shim::set_redirect`].
    Redirect {
        /// `true` redirect, `false` stay local, `null` automatic.
        on: Option<bool>,
    },
    /// [`Shim::add_addresses`].
    AddAddresses {
        /// The addresses.
        addresses: Vec<IpAddr>,
    },
    /// [`Shim::counters`].
    Counters,
    /// Turns the connection into a stream of early-checkpoint events.
    Subscribe,
}

/// A reply on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Frames released by a commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<u64>,
    /// Frames dropped by a discard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discarded: Option<u64>,
    /// Announcement frames sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced: Option<u64>,
    /// The counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<Box<Counters>>,
}

/// An event pushed to subscribed connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The output buffer is near its bound: checkpoint early.
    EarlyCheckpoint {
        /// The current epoch.
        epoch: u64,
    },
}

fn ok() -> Reply {
    Reply {
        ok: true,
        ..Reply::default()
    }
}

fn fail(e: impl std::fmt::Display) -> Reply {
    Reply {
        ok: false,
        error: Some(e.to_string()),
        ..Reply::default()
    }
}

/// Applies one request to the relay.
pub fn handle(shim: &Shim, req: &Request) -> Reply {
    match req {
        Request::BeginEpoch { epoch } => match shim.begin_epoch(*epoch) {
            Ok(()) => ok(),
            Err(e) => fail(e),
        },
        Request::Commit { epoch } => match shim.commit(*epoch) {
            Ok(n) => Reply {
                released: Some(n as u64),
                ..ok()
            },
            Err(e) => fail(e),
        },
        Request::Discard => Reply {
            discarded: Some(shim.discard() as u64),
            ..ok()
        },
        Request::SetMode { mode } => {
            shim.set_mode(*mode);
            ok()
        }
        Request::Takeover { mode } => Reply {
            announced: Some(shim.takeover(*mode) as u64),
            ..ok()
        },
        Request::Announce => Reply {
            announced: Some(shim.announce() as u64),
            ..ok()
        },
        Request::Redirect { on } => {
            shim.set_redirect(*on);
            ok()
        }
        Request::AddAddresses { addresses } => {
            shim.add_addresses(addresses);
            ok()
        }
        Request::Counters => Reply {
            counters: Some(Box::new(shim.counters())),
            ..ok()
        },
        Request::Subscribe => ok(),
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes. `Ok(None)` at end of stream.
fn read_line(r: &mut BufReader<UnixStream>) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r.by_ref().take(MAX_LINE + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "request line too long or unterminated",
        ));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "request is not UTF-8"))
}

type Subscribers = Arc<Mutex<Vec<mpsc::Sender<Event>>>>;

fn serve_connection(shim: &Shim, stream: UnixStream, subs: &Subscribers) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while let Some(line) = read_line(&mut reader)? {
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Subscribe) => {
                let (tx, rx) = mpsc::channel();
                subs.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(tx);
                write_json(&mut writer, &ok())?;
                for ev in rx {
                    write_json(&mut writer, &ev)?;
                }
                return Ok(());
            }
            Ok(req) => handle(shim, &req),
            Err(e) => fail(format!("bad request: {e}")),
        };
        write_json(&mut writer, &reply)?;
    }
    Ok(())
}

fn write_json<T: Serialize>(w: &mut UnixStream, v: &T) -> io::Result<()> {
    let mut s = serde_json::to_string(v).map_err(io::Error::other)?;
    s.push('\n');
    w.write_all(s.as_bytes())
}

/// The control socket server. Dropping it stops accepting and removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path` (replacing a stale socket file) and serves requests for `shim`. It
    /// also installs the shim's early-checkpoint hook, which feeds subscribed connections.
    ///
    /// # Errors
    /// When the socket cannot be bound or its thread cannot start.
    pub fn start(shim: Arc<Shim>, path: &Path) -> io::Result<ControlServer> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        // Only the owner (root, the agent) may drive the relay.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let subs: Subscribers = Arc::new(Mutex::new(Vec::new()));
        {
            let subs = Arc::clone(&subs);
            shim.set_early_checkpoint_hook(Arc::new(move |epoch| {
                let mut list = subs
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                list.retain(|tx| tx.send(Event::EarlyCheckpoint { epoch }).is_ok());
            }));
        }
        let stop2 = Arc::clone(&stop);
        let accept = std::thread::Builder::new()
            .name("netback-control".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if live.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                                tracing::warn!("too many control connections: refusing one");
                                drop(stream);
                                continue;
                            }
                            live.fetch_add(1, Ordering::Relaxed);
                            let live = Arc::clone(&live);
                            let shim = Arc::clone(&shim);
                            let subs = Arc::clone(&subs);
                            let spawned = std::thread::Builder::new()
                                .name("netback-control-conn".into())
                                .spawn(move || {
                                    if let Some(p) = shim.realtime_priority() {
                                        if let Err(e) = crate::sys::set_realtime_priority(p) {
                                            tracing::debug!(error = %e, "control thread stays on the default scheduler");
                                        }
                                    }
                                    if stream.set_nonblocking(false).is_ok() {
                                        if let Err(e) = serve_connection(&shim, stream, &subs) {
                                            tracing::debug!(error = %e, "control connection closed");
                                        }
                                    }
                                    live.fetch_sub(1, Ordering::Relaxed);
                                });
                            if let Err(e) = spawned {
                                tracing::warn!(error = %e, "cannot serve control connection");
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control accept failed");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            accept: Some(accept),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request on a connected control socket and reads the reply (a small client for the
/// agent, tools and tests).
///
/// # Errors
/// On I/O errors or an undecodable reply.
pub fn request(stream: &mut BufReader<UnixStream>, req: &Request) -> io::Result<Reply> {
    write_json(stream.get_mut(), req)?;
    let line = read_line(stream)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "control socket closed"))?;
    serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_the_documented_json_shape() {
        let r: Request = serde_json::from_str(r#"{"op":"commit","epoch":7}"#).unwrap();
        assert_eq!(r, Request::Commit { epoch: 7 });
        let r: Request = serde_json::from_str(r#"{"op":"set_mode","mode":"buffered"}"#).unwrap();
        assert_eq!(
            r,
            Request::SetMode {
                mode: Mode::Buffered
            }
        );
        let r: Request =
            serde_json::from_str(r#"{"op":"add_addresses","addresses":["10.0.0.2","fd00::2"]}"#)
                .unwrap();
        assert!(matches!(r, Request::AddAddresses { addresses } if addresses.len() == 2));
        let r: Request = serde_json::from_str(r#"{"op":"redirect","on":null}"#).unwrap();
        assert_eq!(r, Request::Redirect { on: None });
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"commit","epoch":-1}"#).is_err());
    }
}
