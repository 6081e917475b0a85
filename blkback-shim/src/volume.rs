//! The disk as the NBD front sees it: a local store alone, or a mirrored [`Primary`].

use std::sync::Arc;

use bytes::Bytes;

use crate::mirror::primary::{Primary, Ticket};
use crate::nbd::block_status::{allocation_extents, Extent, DATA, MAX_EXTENTS};
use crate::nbd::proto::NBD_EIO;
use crate::store::Store;

/// The exported disk.
pub struct Volume {
    store: Arc<dyn Store>,
    primary: Option<Arc<Primary>>,
}

impl Volume {
    /// A disk served from the local store only (no peer).
    pub fn local(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            store,
            primary: None,
        })
    }

    /// A disk mirrored through `primary` (which owns the local store).
    pub fn mirrored(store: Arc<dyn Store>, primary: Arc<Primary>) -> Arc<Self> {
        Arc::new(Self {
            store,
            primary: Some(primary),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.store.size()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, u32> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(&*store)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "local store error");
                Err(e.nbd_errno())
            }
            Err(_) => Err(NBD_EIO),
        }
    }

    async fn mirrored_op(
        primary: &Arc<Primary>,
        f: impl FnOnce(&Primary) -> Ticket + Send + 'static,
    ) -> Result<(), u32> {
        let p = primary.clone();
        let ticket = tokio::task::spawn_blocking(move || f(&p))
            .await
            .map_err(|_| NBD_EIO)?;
        ticket.await.unwrap_or(Err(NBD_EIO))
    }

    /// The store when the disk is served from it alone (no mirror): its reads and writes may
    /// then run on any blocking thread through [`Volume::read_local`] / [`Volume::write_local`].
    pub fn local_store(&self) -> Option<Arc<dyn Store>> {
        self.primary.is_none().then(|| self.store.clone())
    }

    /// Blocking: reads `len` bytes at `offset` of a local store (range already validated).
    pub fn read_local(store: &dyn Store, offset: u64, len: u32) -> Result<Bytes, u32> {
        let mut b = vec![0u8; len as usize];
        match store.read_at(&mut b, offset) {
            Ok(()) => Ok(Bytes::from(b)),
            Err(e) => {
                tracing::warn!(error = %e, "local store error");
                Err(e.nbd_errno())
            }
        }
    }

    /// Blocking: writes `data` at `offset` of a local store; with `fua`, durable first.
    pub fn write_local(store: &dyn Store, offset: u64, data: &[u8], fua: bool) -> Result<(), u32> {
        let r = store
            .write_at(data, offset)
            .and_then(|()| if fua { store.sync() } else { Ok(()) });
        r.map_err(|e| {
            tracing::warn!(error = %e, "local store error");
            e.nbd_errno()
        })
    }

    /// Reads `len` bytes at `offset` (range already validated).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, u32> {
        if let Some(p) = &self.primary {
            return p.read(offset, len).await;
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || Self::read_local(&*store, offset, len))
            .await
            .unwrap_or(Err(NBD_EIO))
    }

    /// Writes `data` at `offset`; with `fua`, durable (on both copies) before returning.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), u32> {
        if let Some(p) = &self.primary {
            return Self::mirrored_op(p, move |p| p.write_blocking(offset, data, fua)).await;
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || Self::write_local(&*store, offset, &data, fua))
            .await
            .unwrap_or(Err(NBD_EIO))
    }

    /// Makes all completed writes durable.
    pub async fn flush(&self) -> Result<(), u32> {
        if let Some(p) = &self.primary {
            return Self::mirrored_op(p, Primary::flush_blocking).await;
        }
        self.blocking(Store::sync).await
    }

    /// Zeroes (`punch`: may deallocate) a range.
    pub async fn zero(&self, offset: u64, len: u64, punch: bool, fua: bool) -> Result<(), u32> {
        if let Some(p) = &self.primary {
            return Self::mirrored_op(p, move |p| p.zero_blocking(offset, len, punch, fua)).await;
        }
        self.blocking(move |s| {
            s.zero(offset, len, punch)?;
            if fua {
                s.sync()?;
            }
            Ok(())
        })
        .await
    }

    /// The `base:allocation` extents of `[offset, offset + len)` (range validated, `len > 0`),
    /// from the local store's holes. In remote mode (the local store failed, reads come from
    /// the peer) and when the store cannot tell, the whole range is reported allocated data:
    /// never a hole that is not one, which a client would skip when copying.
    pub async fn block_status(&self, offset: u64, len: u32, req_one: bool) -> Vec<Extent> {
        let whole = vec![Extent {
            length: len,
            flags: DATA,
        }];
        if self.primary.as_ref().is_some_and(|p| !p.serves_locally()) {
            return whole;
        }
        let store = self.store.clone();
        let r = tokio::task::spawn_blocking(move || {
            allocation_extents(offset, len, req_one, MAX_EXTENTS, |pos| {
                store.next_data(pos)
            })
        })
        .await;
        match r {
            Ok(Ok(e)) if !e.is_empty() => e,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "block status: reporting the range as data");
                whole
            }
            _ => whole,
        }
    }
}
