//! The one client: a blocking, bounded client for a component's control socket.
//!
//! Each [`Client::call`] opens a connection, sends one request line and reads one reply line
//! within the client's timeout; the reply is bounded ([`MAX_LINE`]) and decoded into the
//! component's reply enum, an [`ErrorReply`] becoming [`ControlError::Refused`]. Everything
//! read is untrusted: garbage, silence, an oversized line or another framing version is a
//! typed [`ControlError`], never a panic. [`Client::subscribe`] opens a long-lived connection
//! that yields the component's events.

use std::io::{BufRead, BufReader, Read, Write};
use std::marker::PhantomData;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::frame::{self, ErrorKind, ErrorReply, Outgoing, MAX_LINE};
use crate::Component;

/// Why a control request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached (the component is not running).
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
    /// The component closed the connection without replying.
    #[error("{0}: closed without a reply")]
    NoReply(PathBuf),
    /// The reply line exceeds [`MAX_LINE`].
    #[error("{0}: reply longer than {MAX_LINE} bytes")]
    TooLong(PathBuf),
    /// The reply is not a line of this framing, or not of the component's reply types.
    #[error("{path}: malformed reply: {detail}")]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The component answered with an error.
    #[error("{path}: {reply}")]
    Refused {
        /// The socket.
        path: PathBuf,
        /// The component's typed error.
        reply: ErrorReply,
    },
}

impl ControlError {
    /// The component's error kind, when it answered with one.
    #[must_use]
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Refused { reply, .. } => Some(reply.kind),
            _ => None,
        }
    }

    /// Whether the socket does not exist (the component was never started here).
    #[must_use]
    pub fn is_absent(&self) -> bool {
        matches!(self, Self::Connect { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    /// A reply of the wrong variant for the request that was sent.
    pub fn unexpected(path: &Path, what: impl std::fmt::Debug) -> Self {
        let mut detail = format!("unexpected reply {what:?}");
        detail.truncate(frame::MAX_MESSAGE);
        Self::Malformed {
            path: path.to_path_buf(),
            detail,
        }
    }
}

/// A client for one component's control socket.
pub struct Client<C> {
    path: PathBuf,
    timeout: Duration,
    _component: PhantomData<fn() -> C>,
}

impl<C> Clone for Client<C> {
    fn clone(&self) -> Self {
        Self {
            path: self.path.clone(),
            timeout: self.timeout,
            _component: PhantomData,
        }
    }
}

impl<C: Component> std::fmt::Debug for Client<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("component", &C::NAME)
            .field("path", &self.path)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<C: Component> Client<C> {
    /// A client for the socket at `path`; each call must complete within `timeout`.
    #[must_use]
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            path: path.into(),
            timeout: timeout.max(Duration::from_millis(1)),
            _component: PhantomData,
        }
    }

    /// The socket path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The per-call timeout.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `req` and returns the component's reply.
    ///
    /// # Errors
    /// [`ControlError`].
    pub fn call(&self, req: &C::Request) -> Result<C::Reply, ControlError> {
        self.call_within(req, self.timeout)
    }

    /// Like [`Self::call`] with another timeout (long operations such as a promotion).
    ///
    /// # Errors
    /// [`ControlError`].
    pub fn call_within(
        &self,
        req: &C::Request,
        timeout: Duration,
    ) -> Result<C::Reply, ControlError> {
        let deadline = Instant::now() + timeout.max(Duration::from_millis(1));
        let (stream, mut reader) = self.connect(deadline)?;
        self.send(&stream, &frame::encode_request(req), deadline)?;
        match self.read::<C::Reply>(&mut reader, &mut Vec::new(), deadline)? {
            Some(Outgoing::Reply(Ok(r))) => Ok(r),
            Some(Outgoing::Reply(Err(reply))) => Err(ControlError::Refused {
                path: self.path.clone(),
                reply,
            }),
            Some(other) => Err(ControlError::unexpected(&self.path, other)),
            None => Err(ControlError::NoReply(self.path.clone())),
        }
    }

    /// Opens an event stream: the component pushes its events on this connection until
    /// either side closes it.
    ///
    /// # Errors
    /// [`ControlError`] when the component cannot be reached or does not accept.
    pub fn subscribe(&self) -> Result<Subscription<C>, ControlError> {
        let deadline = Instant::now() + self.timeout;
        let (stream, mut reader) = self.connect(deadline)?;
        self.send(&stream, &frame::encode_subscribe(), deadline)?;
        match self.read::<C::Reply>(&mut reader, &mut Vec::new(), deadline)? {
            Some(Outgoing::Subscribed) => Ok(Subscription {
                client: self.clone(),
                reader,
                partial: Vec::new(),
            }),
            Some(Outgoing::Reply(Err(reply))) => Err(ControlError::Refused {
                path: self.path.clone(),
                reply,
            }),
            Some(other) => Err(ControlError::unexpected(&self.path, other)),
            None => Err(ControlError::NoReply(self.path.clone())),
        }
    }

    fn io(&self) -> impl Fn(std::io::Error) -> ControlError + '_ {
        |source| ControlError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn connect(
        &self,
        deadline: Instant,
    ) -> Result<(UnixStream, BufReader<UnixStream>), ControlError> {
        let s = UnixStream::connect(&self.path).map_err(|source| ControlError::Connect {
            path: self.path.clone(),
            source,
        })?;
        let left = remaining(deadline);
        s.set_write_timeout(Some(left)).map_err(self.io())?;
        s.set_read_timeout(Some(left)).map_err(self.io())?;
        let r = s.try_clone().map_err(self.io())?;
        Ok((s, BufReader::new(r)))
    }

    fn send(&self, mut s: &UnixStream, line: &str, deadline: Instant) -> Result<(), ControlError> {
        s.set_write_timeout(Some(remaining(deadline)))
            .map_err(self.io())?;
        s.write_all(line.as_bytes()).map_err(self.io())
    }

    /// Reads one line before `deadline` (`None`: the component closed the connection).
    /// `buf` keeps a line's beginning across a timeout (an event stream goes on where it
    /// stopped); it is empty again once a whole line was read.
    fn read<T: serde::de::DeserializeOwned>(
        &self,
        reader: &mut BufReader<UnixStream>,
        buf: &mut Vec<u8>,
        deadline: Instant,
    ) -> Result<Option<Outgoing<T, C::Event>>, ControlError> {
        reader
            .get_ref()
            .set_read_timeout(Some(remaining(deadline)))
            .map_err(self.io())?;
        let limit = u64::try_from(MAX_LINE.saturating_sub(buf.len())).unwrap_or(u64::MAX);
        let n = reader
            .by_ref()
            .take(limit)
            .read_until(b'\n', buf)
            .map_err(self.io())?;
        if buf.last() != Some(&b'\n') {
            if buf.len() >= MAX_LINE {
                return Err(ControlError::TooLong(self.path.clone()));
            }
            if n == 0 && buf.is_empty() {
                return Ok(None);
            }
            return Err(ControlError::NoReply(self.path.clone()));
        }
        let line = std::mem::take(buf);
        frame::decode_outgoing(&line)
            .map(Some)
            .map_err(|e| ControlError::Malformed {
                path: self.path.clone(),
                detail: e.message,
            })
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// A connection on which the component pushes its events.
pub struct Subscription<C: Component> {
    client: Client<C>,
    reader: BufReader<UnixStream>,
    partial: Vec<u8>,
}

impl<C: Component> std::fmt::Debug for Subscription<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl<C: Component> Subscription<C> {
    /// The next event, waiting at most `timeout`; `Ok(None)` when none came in that time.
    ///
    /// # Errors
    /// [`ControlError::NoReply`] when the component closed the stream (it stopped), or a
    /// malformed line.
    pub fn next_within(&mut self, timeout: Duration) -> Result<Option<C::Event>, ControlError> {
        let deadline = Instant::now() + timeout;
        match self
            .client
            .read::<C::Reply>(&mut self.reader, &mut self.partial, deadline)
        {
            Ok(Some(Outgoing::Event(e))) => Ok(Some(e)),
            Ok(Some(other)) => Err(ControlError::unexpected(&self.client.path, other)),
            Ok(None) => Err(ControlError::NoReply(self.client.path.clone())),
            Err(ControlError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
