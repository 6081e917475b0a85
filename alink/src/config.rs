//! Link configuration.

use std::net::SocketAddr;
use std::time::Duration;

use crate::LinkError;

/// One TCP path between the two hosts (for example one private NIC each side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathConfig {
    /// This host's address on the path. The accepting host listens on it; the dialing host
    /// uses its IP as the source address (its port is ignored) so that traffic takes this path.
    pub local: SocketAddr,
    /// The peer's address on the path.
    pub peer: SocketAddr,
}

/// Everything a [`crate::Link`] needs. Build with [`LinkConfig::new`] and adjust fields.
#[derive(Clone)]
pub struct LinkConfig {
    /// This host's name in the pool.
    pub local_host: String,
    /// The peer's name. The host whose name sorts first dials; the other accepts.
    pub peer_host: String,
    /// The pool secret: authenticates every frame.
    pub secret: Vec<u8>,
    /// Two or more independent paths.
    pub paths: Vec<PathConfig>,
    /// How often each path sends a heartbeat (default 100 ms).
    pub heartbeat_interval: Duration,
    /// A path silent for this long is declared down and reconnected (default 500 ms).
    pub path_timeout: Duration,
    /// Largest application message (default 64 MiB).
    pub max_message: usize,
    /// Unacknowledged bytes allowed per channel before `send` waits (default 64 MiB).
    pub window_bytes: usize,
    /// Delay between reconnection attempts of a down path (default 200 ms).
    pub reconnect_interval: Duration,
}

impl std::fmt::Debug for LinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkConfig")
            .field("local_host", &self.local_host)
            .field("peer_host", &self.peer_host)
            .field("secret", &"<redacted>")
            .field("paths", &self.paths)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("path_timeout", &self.path_timeout)
            .field("max_message", &self.max_message)
            .field("window_bytes", &self.window_bytes)
            .finish_non_exhaustive()
    }
}

impl LinkConfig {
    /// A configuration with the default timings.
    pub fn new(
        local_host: impl Into<String>,
        peer_host: impl Into<String>,
        secret: impl Into<Vec<u8>>,
        paths: Vec<PathConfig>,
    ) -> Self {
        LinkConfig {
            local_host: local_host.into(),
            peer_host: peer_host.into(),
            secret: secret.into(),
            paths,
            heartbeat_interval: Duration::from_millis(100),
            path_timeout: Duration::from_millis(500),
            max_message: 64 * 1024 * 1024,
            window_bytes: 64 * 1024 * 1024,
            reconnect_interval: Duration::from_millis(200),
        }
    }

    /// True when this host dials (its name sorts before the peer's).
    #[must_use]
    pub fn is_dialer(&self) -> bool {
        self.local_host < self.peer_host
    }

    /// Checks the configuration and names the first problem.
    ///
    /// # Errors
    /// [`LinkError::Config`].
    pub fn validate(&self) -> Result<(), LinkError> {
        let bad = |m: String| Err(LinkError::Config(m));
        if self.local_host.is_empty() || self.peer_host.is_empty() {
            return bad("host names must not be empty".into());
        }
        if self.local_host.len() > 255 || self.peer_host.len() > 255 {
            return bad("host names must be at most 255 bytes".into());
        }
        if self.local_host == self.peer_host {
            return bad(format!(
                "local and peer host are both '{}'",
                self.local_host
            ));
        }
        if self.secret.len() < 16 {
            return bad(format!(
                "the pool secret has {} bytes; at least 16 are required",
                self.secret.len()
            ));
        }
        if self.paths.is_empty() {
            return bad("at least one path is required (two for redundancy)".into());
        }
        if self.paths.len() > 16 {
            return bad(format!("{} paths configured; at most 16", self.paths.len()));
        }
        if self.heartbeat_interval.is_zero() || self.path_timeout <= self.heartbeat_interval {
            return bad(format!(
                "path timeout ({:?}) must be longer than the heartbeat interval ({:?})",
                self.path_timeout, self.heartbeat_interval
            ));
        }
        if self.max_message == 0 || self.max_message > 1 << 30 {
            return bad(format!(
                "max message {} out of range (1 byte to 1 GiB)",
                self.max_message
            ));
        }
        if self.window_bytes == 0 {
            return bad("window must be at least one byte".into());
        }
        Ok(())
    }
}
