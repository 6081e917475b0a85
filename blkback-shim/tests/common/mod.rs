//! Shared helpers of the blkback integration tests: in-process servers on unique sockets in
//! temporary directories, and runners for the real NBD client tools.
#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use xenft_blkback::nbd::server::{ExportConfig, NbdServer};
use xenft_blkback::store::{FileStore, Store};
use xenft_blkback::volume::Volume;

/// A runtime that is shut down (tasks dropped) when the test ends, even on panic.
pub struct Rt(Option<tokio::runtime::Runtime>);

impl Rt {
    pub fn new() -> Self {
        Self(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        ))
    }
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().unwrap().handle().clone()
    }
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.0.as_ref().unwrap().block_on(f)
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// An NBD server on a Unix socket serving a local file.
pub struct LocalServer {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub disk: PathBuf,
    pub rt: Rt,
}

impl LocalServer {
    pub fn start(size: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        let sock = dir.path().join("nbd.sock");
        let store: Arc<dyn Store> = Arc::new(FileStore::open(&disk, Some(size)).unwrap());
        let rt = Rt::new();
        let server = NbdServer::new(Volume::local(store), ExportConfig::default());
        let listener = {
            let _g = rt.handle().enter();
            tokio::net::UnixListener::bind(&sock).unwrap()
        };
        rt.handle()
            .spawn(async move { server.serve_unix(listener).await });
        Self {
            dir,
            sock,
            disk,
            rt,
        }
    }

    pub fn uri(&self) -> String {
        nbd_uri(&self.sock)
    }
}

pub fn nbd_uri(sock: &Path) -> String {
    format!("nbd+unix:///xenft?socket={}", sock.display())
}

/// Runs a tool; panics with its output if it cannot start (missing tool: see
/// scripts/deps/blkback.apt).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (install it: scripts/deps/blkback.apt): {e}"))
}

/// Runs a tool and asserts it succeeded.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}\nstdout: {out}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Writes `len` bytes of deterministic pseudo-random data.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_be_bytes()[4]
        })
        .collect()
}

use xenft_blkback::mirror::bitmap::{DirtyBitmap, DEFAULT_CHUNK};
use xenft_blkback::mirror::primary::{MirrorConfig, PeerLink, Primary};
use xenft_blkback::mirror::secondary::Secondary;
use xenft_blkback::mirror::transport::{memory_pair, MemoryConnector, PeerSession};

/// A primary and a secondary joined by in-memory sessions, each on its own file.
pub struct MirrorPair {
    pub dir: tempfile::TempDir,
    pub pdisk: PathBuf,
    pub sdisk: PathBuf,
    pub primary: Arc<Primary>,
    pub secondary: Arc<Secondary>,
    pub volume: Arc<Volume>,
    sessions: tokio::sync::mpsc::UnboundedSender<PeerSession>,
    pub secondary_task: Option<tokio::task::JoinHandle<()>>,
}

impl MirrorPair {
    /// Must be called inside a tokio runtime. `pstore` lets tests wrap the primary's store.
    pub fn new(size: u64, wrap: impl FnOnce(FileStore) -> Arc<dyn Store>) -> Self {
        Self::with_stores(size, wrap, |s| Arc::new(s))
    }

    /// Like `new`, wrapping the secondary's store too.
    pub fn with_stores(
        size: u64,
        wrap: impl FnOnce(FileStore) -> Arc<dyn Store>,
        wrap_secondary: impl FnOnce(FileStore) -> Arc<dyn Store>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pdisk = dir.path().join("primary.img");
        let sdisk = dir.path().join("secondary.img");
        let pstore = wrap(FileStore::open(&pdisk, Some(size)).unwrap());
        let sstore = wrap_secondary(FileStore::open(&sdisk, Some(size)).unwrap());
        let bm = DirtyBitmap::open(&dir.path().join("bitmap"), size, DEFAULT_CHUNK).unwrap();
        let cfg = MirrorConfig {
            reconnect_interval: std::time::Duration::from_millis(20),
            ..MirrorConfig::default()
        };
        let primary = Primary::new(pstore.clone(), bm, cfg);
        let secondary = Secondary::new(sstore, dir.path().join("secondary.state"));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(primary.clone().run(MemoryConnector { sessions: rx }));
        let volume = Volume::mirrored(pstore, primary.clone());
        Self {
            dir,
            pdisk,
            sdisk,
            primary,
            secondary,
            volume,
            sessions: tx,
            secondary_task: None,
        }
    }

    /// Connects the secondary (a new session).
    pub fn connect(&mut self) {
        let (p, s) = memory_pair();
        self.sessions.send(p).unwrap();
        self.secondary_task = Some(tokio::spawn(self.secondary.clone().run_session(s)));
    }

    /// Kills the secondary's session (as if its process died).
    pub async fn kill_secondary(&mut self) {
        if let Some(t) = self.secondary_task.take() {
            t.abort();
            let _ = t.await;
        }
        self.wait_for(|l| l == PeerLink::Degraded).await;
    }

    /// Waits (up to 20 s) until the primary's link state satisfies `f`.
    pub async fn wait_for(&self, f: impl Fn(PeerLink) -> bool) {
        for _ in 0..2000 {
            if f(self.primary.status().peer) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("timeout; status {:?}", self.primary.status());
    }

    pub async fn wait_in_sync(&self) {
        self.wait_for(|l| l == PeerLink::InSync).await;
    }

    pub fn files_identical(&self) -> bool {
        std::fs::read(&self.pdisk).unwrap() == std::fs::read(&self.sdisk).unwrap()
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[allow(unused_imports)] // each test binary uses its own subset
pub use xenft_tests::components::{blkback_call as call, blkback_status as status, peer_link};

/// Polls the shim's `status` until `f` accepts it (panics after 30 s with the last status).
pub fn wait_for_status(sock: &Path, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    xenft_tests::components::wait_blkback_status(sock, std::time::Duration::from_secs(30), f)
}
