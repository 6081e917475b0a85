//! Online verify (like `drbdadm verify`): both copies compared by block checksums, window by
//! window, while client I/O continues.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::{lock, Primary};
use crate::mirror::wire::{block_checksum, PeerMsg};

pub use xenft_control::blkback::VerifyReport;

/// Why a verify could not complete.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// No session with the secondary.
    #[error("no peer session")]
    NoPeer,
    /// Block size zero or over 32 MiB.
    #[error("invalid verify block size {0}")]
    BadBlock(u64),
    /// The local store failed.
    #[error("local store: {0}")]
    Local(String),
    /// The secondary could not checksum a range, or the session ended.
    #[error("secondary did not checksum offset {0}")]
    Peer(u64),
}

impl Primary {
    /// Online verify (like `drbdadm verify`): compares both copies by checksums of `block`-byte
    /// blocks, window by window, while client I/O continues. Each window is read locally and
    /// checksummed by the secondary at the same point of the write sequence, so concurrent
    /// writes do not produce false differences.
    pub async fn verify(self: &Arc<Self>, block: u64) -> Result<VerifyReport, VerifyError> {
        const WINDOW: u64 = 4 << 20;
        let block32 = u32::try_from(block)
            .ok()
            .filter(|b| *b > 0 && u64::from(*b) <= WINDOW)
            .ok_or(VerifyError::BadBlock(block))?;
        let size = self.size();
        let mut report = VerifyReport {
            block,
            ..VerifyReport::default()
        };
        let mut off = 0u64;
        while off < size {
            let len = (size - off).min(WINDOW);
            let me = self.clone();
            let (local, rx) =
                tokio::task::spawn_blocking(move || me.verify_window(off, len, block32))
                    .await
                    .map_err(|_| VerifyError::Local("verify task failed".into()))??;
            let remote = rx.await.map_err(|_| VerifyError::Peer(off))?;
            if remote.len() != local.len() {
                return Err(VerifyError::Peer(off));
            }
            for (i, (a, b)) in local.iter().zip(&remote).enumerate() {
                if a != b {
                    let start = off + i as u64 * block;
                    let l = block.min(size - start);
                    report.differing_bytes += l;
                    match report.differing.last_mut() {
                        Some((o, ol)) if *o + *ol == start => *ol += l,
                        _ => report.differing.push((start, l)),
                    }
                }
            }
            report.bytes_checked += len;
            off += len;
        }
        Ok(report)
    }

    fn verify_window(
        &self,
        offset: u64,
        len: u64,
        block: u32,
    ) -> Result<(Vec<u64>, oneshot::Receiver<Vec<u64>>), VerifyError> {
        let len32 = u32::try_from(len).map_err(|_| VerifyError::BadBlock(len))?;
        let mut buf = vec![0u8; len32 as usize];
        let rx = {
            let _o = lock(&self.order);
            self.store
                .read_at(&mut buf, offset)
                .map_err(|e| VerifyError::Local(e.to_string()))?;
            let mut st = lock(&self.state);
            let tx = st.tx.clone().ok_or(VerifyError::NoPeer)?;
            let id = st.next_read;
            st.next_read += 1;
            let (done, rx) = oneshot::channel();
            st.verifies.insert(id, done);
            let req = PeerMsg::VerifyReq {
                id,
                offset,
                len: len32,
                block,
            };
            if tx.send(req.frame()).is_err() {
                st.verifies.remove(&id);
                return Err(VerifyError::NoPeer);
            }
            rx
        };
        let sums = buf.chunks(block as usize).map(block_checksum).collect();
        Ok((sums, rx))
    }
}
