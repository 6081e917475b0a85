//! The one server: serves a component's control socket with a [`Handler`].
//!
//! A listening Unix socket (mode 0600: only the owner — root, the agent — may drive a
//! component), one thread per connection, at most [`ServerOptions::max_connections`] at once
//! (more are closed at accept), lines of at most [`MAX_LINE`] bytes, a request connection idle
//! for [`ServerOptions::idle`] closed. Each request line gets exactly one reply line; a line
//! that does not decode gets a typed [`ErrorReply`]. A `subscribe` line turns the connection
//! into a stream of the events published on the server's [`Events`]; a subscriber that does
//! not keep up (its queue of [`EVENT_QUEUE`] events is full) is dropped rather than allowed to
//! stall the component. Dropping the [`Server`] stops accepting and removes the socket file.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::frame::{self, ErrorKind, ErrorReply, Incoming, MAX_LINE};
use crate::Component;

/// Events queued per subscriber before it counts as stuck and is dropped.
pub const EVENT_QUEUE: usize = 256;

/// Carries out a component's requests.
pub trait Handler<C: Component>: Send + Sync + 'static {
    /// One request, one reply.
    ///
    /// # Errors
    /// The typed refusal or failure sent back to the client.
    fn handle(&self, req: C::Request) -> Result<C::Reply, ErrorReply>;
}

impl<C, F> Handler<C> for F
where
    C: Component,
    F: Fn(C::Request) -> Result<C::Reply, ErrorReply> + Send + Sync + 'static,
{
    fn handle(&self, req: C::Request) -> Result<C::Reply, ErrorReply> {
        self(req)
    }
}

/// Where a component publishes its events; every subscribed connection gets each one.
pub struct Events<E> {
    subscribers: Mutex<Vec<SyncSender<E>>>,
}

impl<E> std::fmt::Debug for Events<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field(
                "subscribers",
                &self.subscribers.lock().map_or(0, |s| s.len()),
            )
            .finish()
    }
}

impl<E: Clone + Send + 'static> Default for Events<E> {
    fn default() -> Self {
        Self {
            subscribers: Mutex::new(Vec::new()),
        }
    }
}

impl<E: Clone + Send + 'static> Events<E> {
    /// An event bus with no subscriber.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn subscribers(&self) -> std::sync::MutexGuard<'_, Vec<SyncSender<E>>> {
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `event` to every subscriber; never blocks. Returns how many got it.
    pub fn publish(&self, event: &E) -> usize {
        let mut subs = self.subscribers();
        subs.retain(|tx| match tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::warn!("a control-socket subscriber does not keep up: dropped");
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
        subs.len()
    }

    /// Current subscribers.
    #[must_use]
    pub fn subscriber_count(&self) -> usize {
        self.subscribers().len()
    }

    fn subscribe(&self) -> mpsc::Receiver<E> {
        let (tx, rx) = mpsc::sync_channel(EVENT_QUEUE);
        self.subscribers().push(tx);
        rx
    }
}

/// A hook run at the start of every connection thread (e.g. a real-time priority).
pub type ConnectionHook = Arc<dyn Fn() + Send + Sync>;

/// Limits and hooks of a [`Server`].
#[derive(Clone)]
pub struct ServerOptions {
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// A request connection silent this long is closed.
    pub idle: Duration,
    /// Run at the start of each connection thread.
    pub on_connection: Option<ConnectionHook>,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("max_connections", &self.max_connections)
            .field("idle", &self.idle)
            .field("on_connection", &self.on_connection.is_some())
            .finish()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            idle: Duration::from_secs(30),
            on_connection: None,
        }
    }
}

/// A component's control socket being served.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// The listening socket, shut down to wake the accept thread.
    listener: Arc<UnixListener>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `path` (replacing a stale socket file) and serves `handler`'s requests and
    /// `events`' events.
    ///
    /// # Errors
    /// When the socket cannot be bound or its thread cannot start.
    pub fn start<C, H>(
        path: &Path,
        handler: Arc<H>,
        events: Arc<Events<C::Event>>,
        opts: ServerOptions,
    ) -> io::Result<Server>
    where
        C: Component,
        H: Handler<C>,
    {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = Arc::new(UnixListener::bind(path)?);
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, listener2) = (Arc::clone(&stop), Arc::clone(&listener));
        let accept = std::thread::Builder::new()
            .name(format!("{}-control", C::NAME))
            .spawn(move || accept_loop::<C, H>(&listener2, &handler, &events, &opts, &stop2))?;
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            listener,
            accept: Some(accept),
        })
    }

    /// The socket path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The accept thread blocks in accept(): shutting the listening socket down makes
        // accept() fail (Linux: EINVAL), and the thread sees the stop flag.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop<C: Component, H: Handler<C>>(
    listener: &UnixListener,
    handler: &Arc<H>,
    events: &Arc<Events<C::Event>>,
    opts: &ServerOptions,
    stop: &Arc<AtomicBool>,
) {
    let live = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok(_) if stop.load(Ordering::Relaxed) => return,
            Ok((stream, _)) => {
                if live.load(Ordering::Relaxed) >= opts.max_connections {
                    tracing::warn!(
                        component = C::NAME,
                        "too many control connections: refusing one"
                    );
                    drop(stream);
                    continue;
                }
                live.fetch_add(1, Ordering::Relaxed);
                let (live, handler, events, opts, stop) = (
                    Arc::clone(&live),
                    Arc::clone(handler),
                    Arc::clone(events),
                    opts.clone(),
                    Arc::clone(stop),
                );
                let spawned = std::thread::Builder::new()
                    .name(format!("{}-control-conn", C::NAME))
                    .spawn(move || {
                        if let Some(hook) = &opts.on_connection {
                            hook();
                        }
                        if let Err(e) = serve::<C, H>(stream, &*handler, &events, &opts, &stop) {
                            tracing::debug!(component = C::NAME, error = %e, "control connection closed");
                        }
                        live.fetch_sub(1, Ordering::Relaxed);
                    });
                if let Err(e) = spawned {
                    tracing::warn!(component = C::NAME, error = %e, "cannot serve a control connection");
                }
            }
            Err(_) if stop.load(Ordering::Relaxed) => return,
            Err(e) => {
                tracing::warn!(component = C::NAME, error = %e, "control accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes. `Ok(None)` at end of stream; a longer line
/// is `Err(too_long)` (the connection is then closed: the rest of it cannot be framed).
fn read_line(r: &mut BufReader<UnixStream>) -> io::Result<Option<Result<Vec<u8>, ErrorReply>>> {
    let mut buf = Vec::new();
    let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX);
    let n = r.by_ref().take(limit).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if buf.len() >= MAX_LINE {
            return Ok(Some(Err(ErrorReply::new(
                ErrorKind::TooLong,
                format!("request line longer than {MAX_LINE} bytes"),
            ))));
        }
        return Ok(None); // closed mid-line: nothing to answer
    }
    Ok(Some(Ok(buf)))
}

fn serve<C: Component, H: Handler<C>>(
    stream: UnixStream,
    handler: &H,
    events: &Events<C::Event>,
    opts: &ServerOptions,
    stop: &AtomicBool,
) -> io::Result<()> {
    stream.set_read_timeout(Some(opts.idle))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while let Some(line) = read_line(&mut reader)? {
        let line = match line {
            Ok(l) => l,
            Err(too_long) => {
                writer.write_all(frame::encode_reply::<()>(&Err(too_long)).as_bytes())?;
                return Ok(());
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = match frame::decode_incoming::<C::Request>(&line) {
            Ok(Incoming::Request(req)) => frame::encode_reply(&handler.handle(req)),
            Ok(Incoming::Subscribe) => {
                let rx = events.subscribe();
                writer.write_all(frame::encode_subscribed().as_bytes())?;
                return stream_events(&mut writer, reader.get_mut(), &rx, stop);
            }
            Err(e) => frame::encode_reply::<()>(&Err(e)),
        };
        writer.write_all(reply.as_bytes())?;
    }
    Ok(())
}

/// Writes each event as it comes until the client goes away, the bus drops this subscriber
/// or the server stops. While no event comes, a closed client is noticed by a non-blocking
/// read (it frees its connection slot).
fn stream_events<E: serde::Serialize>(
    w: &mut UnixStream,
    r: &mut UnixStream,
    rx: &mpsc::Receiver<E>,
    stop: &AtomicBool,
) -> io::Result<()> {
    w.set_write_timeout(Some(Duration::from_secs(5)))?;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(ev) => w.write_all(frame::encode_event(&ev).as_bytes())?,
            Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => {
                if client_closed(r)? {
                    return Ok(());
                }
            }
            Err(_) => return Ok(()),
        }
    }
}

/// Whether the client closed its end (anything it sends on a subscription is ignored).
fn client_closed(r: &mut UnixStream) -> io::Result<bool> {
    r.set_nonblocking(true)?;
    let mut scratch = [0u8; 256];
    let got = r.read(&mut scratch);
    r.set_nonblocking(false)?;
    match got {
        Ok(0) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}
