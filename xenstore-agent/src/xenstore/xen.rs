//! The Xen backend: xenstore-rs (feature `async-tokio`) for watches, and the wire-protocol
//! client ([`WireClient`]) on a second connection for reads, writes and transactions
//! (xenstore-rs 0.8 sends every request with transaction id 0).

use std::path::PathBuf;

use futures::StreamExt;
use tokio::sync::mpsc;
use xenstore_rs::tokio::XsTokio;
use xenstore_rs::AsyncWatch;

use super::wire::WireClient;
use super::{check_path, TxId, WatchEvents, XenStore, XsError};

/// The default xenstored socket.
pub const XENSTORED_SOCKET: &str = "/run/xenstored/socket";

/// xenstore on a Xen host.
pub struct XenXs {
    ops: WireClient,
    watcher: XsTokio,
}

impl XenXs {
    /// Connects both connections to xenstored's socket (`XENSTORED_PATH` overrides the
    /// path, as in xenstore-rs).
    ///
    /// # Errors
    /// [`XsError::Io`] when xenstored is not reachable.
    pub async fn connect() -> Result<Self, XsError> {
        let path = std::env::var_os("XENSTORED_PATH")
            .map_or_else(|| PathBuf::from(XENSTORED_SOCKET), PathBuf::from);
        let ops = WireClient::connect(&path).await?;
        let watcher = XsTokio::new().await?;
        Ok(Self { ops, watcher })
    }
}

impl XenStore for XenXs {
    async fn read(&self, tx: Option<TxId>, path: &str) -> Result<Option<String>, XsError> {
        self.ops.read(tx, path).await
    }
    async fn write(&self, tx: Option<TxId>, path: &str, value: &str) -> Result<(), XsError> {
        self.ops.write(tx, path, value).await
    }
    async fn rm(&self, tx: Option<TxId>, path: &str) -> Result<(), XsError> {
        self.ops.rm(tx, path).await
    }
    async fn directory(&self, tx: Option<TxId>, path: &str) -> Result<Vec<String>, XsError> {
        self.ops.directory(tx, path).await
    }
    async fn begin(&self) -> Result<TxId, XsError> {
        self.ops.begin().await
    }
    async fn end(&self, tx: TxId, commit: bool) -> Result<(), XsError> {
        self.ops.end(tx, commit).await
    }
    async fn watch(&self, path: &str) -> Result<WatchEvents, XsError> {
        check_path(path)?;
        let mut stream = self.watcher.watch(path).await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(p) = stream.next().await {
                if tx.send(p.into_string()).await.is_err() {
                    return; // dropping the stream unwatches
                }
            }
        });
        Ok(rx)
    }
}
