//! The drivers speak to the components only through the control contract's client
//! ([`xenft_control::Client`]: bounded replies, timeouts, typed replies and errors). This
//! module re-exports it and keeps the drivers' test double: a scripted component served by the
//! contract's own server.

pub use xenft_control::{Client, ControlError};

/// A scripted component for the drivers' unit tests: the contract's server with a reply
/// function, recording every request.
#[cfg(test)]
pub(crate) mod fake {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use xenft_control::{Client, Component, ErrorReply, Events, Server, ServerOptions};

    /// A served fake; dropping it stops the server.
    pub(crate) struct Fake<C: Component> {
        _dir: Option<tempfile::TempDir>,
        _server: Server,
        /// The socket.
        pub(crate) path: PathBuf,
        /// Every request received, in order.
        pub(crate) seen: Arc<Mutex<Vec<C::Request>>>,
    }

    impl<C: Component> Fake<C> {
        /// A client with a 2 s timeout.
        pub(crate) fn client(&self) -> Client<C> {
            Client::new(&self.path, Duration::from_secs(2))
        }

        /// The requests received so far.
        pub(crate) fn seen(&self) -> Vec<C::Request> {
            self.seen.lock().unwrap().clone()
        }
    }

    /// Serves `reply` for component `C` on a fresh socket.
    pub(crate) fn serve<C: Component>(
        reply: impl Fn(&C::Request) -> Result<C::Reply, ErrorReply> + Send + Sync + 'static,
    ) -> Fake<C> {
        let dir = tempfile::tempdir().unwrap();
        let mut f = serve_at(&dir.path().join("ctl.sock"), reply);
        f._dir = Some(dir);
        f
    }

    /// Serves `reply` for component `C` at `path`.
    pub(crate) fn serve_at<C: Component>(
        path: &std::path::Path,
        reply: impl Fn(&C::Request) -> Result<C::Reply, ErrorReply> + Send + Sync + 'static,
    ) -> Fake<C> {
        start(path, reply, Events::new())
    }

    /// A component at `path` that pushes what is published on `events` (and refuses every
    /// request).
    pub(crate) fn serve_at_with_events<C: Component>(
        path: &std::path::Path,
        events: Arc<Events<C::Event>>,
    ) -> Fake<C> {
        start(path, |_| Err(ErrorReply::refused("events only")), events)
    }

    fn start<C: Component>(
        path: &std::path::Path,
        reply: impl Fn(&C::Request) -> Result<C::Reply, ErrorReply> + Send + Sync + 'static,
        events: Arc<Events<C::Event>>,
    ) -> Fake<C> {
        let path = path.to_path_buf();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        let handler = move |req: C::Request| {
            s2.lock().unwrap().push(req.clone());
            reply(&req)
        };
        let server =
            Server::start::<C, _>(&path, Arc::new(handler), events, ServerOptions::default())
                .unwrap();
        Fake {
            _dir: None,
            _server: server,
            path,
            seen,
        }
    }

    /// A broken component: answers every line with `line`, whatever was asked.
    pub(crate) fn raw(line: &'static str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("raw.sock");
        let l = UnixListener::bind(&p).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut got = String::new();
                let _ = BufReader::new(&s).read_line(&mut got);
                let _ = s.write_all(line.as_bytes());
            }
        });
        (d, p)
    }
}
