//! The xenstore seam: one trait, an in-process store with xenstored's semantics (tests, demo),
//! and the Xen backend (xenstore-rs for watches, plus a thin wire-protocol client for
//! transactions, which xenstore-rs 0.8 lacks).
//!
//! Debian's xenstored was tried as the local implementation (xen-utils-4.17): the C daemon
//! with `--no-domain-init --no-fork` (and `XENSTORED_RUNDIR`) starts and listens without
//! /dev/xen, but closes every connection at its first request (no dom0 domain to account it
//! to); without `--no-domain-init` it needs the hypervisor; oxenstored aborts (setrlimit EPERM
//! in a container). Hence the in-process [`memory::MemStore`], also served over the real
//! protocol by [`wire::serve_memstore`] so the Xen backend is tested byte for byte.
//!
//! Semantics every user must follow (they hold for xenstored too):
//! - a watch fires once when registered, then after every change at or below its path, and
//!   may fire spuriously: a watcher re-reads what it cares about on every event;
//! - a transaction ends with `EAGAIN` when something it read or wrote changed meanwhile:
//!   redo the whole transaction ([`retry_transaction`]).
//!
//! The agent watches `@introduceDomain` and `@releaseDomain` (domains appear and vanish),
//! `/local/domain` (VMs' own subtrees) and its own subtree [`AGENT_ROOT`], where the shims and
//! the xapi plugin publish state.

use std::future::Future;

use tokio::sync::mpsc;

pub mod bridge;
pub mod memory;
pub mod wire;
pub mod xen;

/// The agent's own subtree.
pub const AGENT_ROOT: &str = "/xenft";
/// Special watch path fired when a domain is introduced.
pub const INTRODUCE_DOMAIN: &str = "@introduceDomain";
/// Special watch path fired when a domain is released.
pub const RELEASE_DOMAIN: &str = "@releaseDomain";
/// Most bytes of a path or value (xenstore's payload limit).
pub const MAX_PAYLOAD: usize = 4096;

/// A transaction id (0 is "no transaction").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId(pub u32);

/// A xenstore operation failed.
#[derive(Debug, thiserror::Error)]
pub enum XsError {
    /// The node does not exist.
    #[error("no such node: {0}")]
    NotFound(String),
    /// The transaction conflicted: redo it.
    #[error("transaction conflict (EAGAIN)")]
    Again,
    /// Path or value rejected (too long, bad characters).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Another error code from xenstored (EACCES, EQUOTA, ...).
    #[error("xenstored error {0}")]
    Other(String),
    /// The connection failed.
    #[error("xenstore i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon sent something that does not follow the protocol.
    #[error("xenstore protocol: {0}")]
    Protocol(String),
}

/// A stream of watch events: the path that changed (or the watch path itself).
pub type WatchEvents = mpsc::Receiver<String>;

/// Access to a xenstore.
pub trait XenStore: Send + Sync {
    /// Reads a node (None when it does not exist).
    fn read(
        &self,
        tx: Option<TxId>,
        path: &str,
    ) -> impl Future<Output = Result<Option<String>, XsError>> + Send;
    /// Writes a node, creating missing parents.
    fn write(
        &self,
        tx: Option<TxId>,
        path: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), XsError>> + Send;
    /// Removes a node and its subtree (absent is fine).
    fn rm(&self, tx: Option<TxId>, path: &str) -> impl Future<Output = Result<(), XsError>> + Send;
    /// Lists the children of a node.
    fn directory(
        &self,
        tx: Option<TxId>,
        path: &str,
    ) -> impl Future<Output = Result<Vec<String>, XsError>> + Send;
    /// Starts a transaction.
    fn begin(&self) -> impl Future<Output = Result<TxId, XsError>> + Send;
    /// Ends a transaction: commit (`true`) or abort. A commit may fail with [`XsError::Again`].
    fn end(&self, tx: TxId, commit: bool) -> impl Future<Output = Result<(), XsError>> + Send;
    /// Watches a path (and everything below it).
    fn watch(&self, path: &str) -> impl Future<Output = Result<WatchEvents, XsError>> + Send;
}

/// Checks a path: absolute (or a special `@` path), bounded, printable ASCII.
///
/// # Errors
/// [`XsError::Invalid`].
pub fn check_path(path: &str) -> Result<(), XsError> {
    let ok = (path.starts_with('/') || path.starts_with('@'))
        && path.len() <= MAX_PAYLOAD / 2
        && path.bytes().all(|b| b.is_ascii_graphic())
        && (path == "/" || !path.ends_with('/'))
        && !path.contains("//");
    if ok {
        Ok(())
    } else {
        Err(XsError::Invalid(path.chars().take(80).collect()))
    }
}

/// Runs `body` in a fresh transaction and commits it, redoing everything on `EAGAIN` up to
/// `max_attempts` times. `body` gets the transaction id; an error from it aborts.
///
/// # Errors
/// The body's error, or [`XsError::Again`] after too many conflicts.
pub async fn retry_transaction<S, T, F, Fut>(
    xs: &S,
    max_attempts: usize,
    mut body: F,
) -> Result<T, XsError>
where
    S: XenStore,
    F: FnMut(TxId) -> Fut,
    Fut: Future<Output = Result<T, XsError>>,
{
    for _ in 0..max_attempts.max(1) {
        let tx = xs.begin().await?;
        match body(tx).await {
            Ok(v) => match xs.end(tx, true).await {
                Ok(()) => return Ok(v),
                Err(XsError::Again) => {}
                Err(e) => return Err(e),
            },
            Err(e) => {
                let _ = xs.end(tx, false).await;
                if !matches!(e, XsError::Again) {
                    return Err(e);
                }
            }
        }
    }
    Err(XsError::Again)
}

/// Domain ids present under `/local/domain`.
///
/// # Errors
/// [`XsError`].
pub async fn list_domains<S: XenStore>(xs: &S) -> Result<Vec<u32>, XsError> {
    let names = match xs.directory(None, "/local/domain").await {
        Ok(n) => n,
        Err(XsError::NotFound(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut ids: Vec<u32> = names.iter().filter_map(|n| n.parse().ok()).collect();
    ids.sort_unstable();
    Ok(ids)
}
