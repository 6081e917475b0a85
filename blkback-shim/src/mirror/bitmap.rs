//! The persistent dirty bitmap: which regions of the disk the secondary may lack.
//!
//! One bit per chunk (64 KiB by default). A bit is set, and the changed bitmap bytes written and
//! `fdatasync`ed, *before* the write that dirtied it is acknowledged to the client, so a crash
//! of the primary while degraded still knows what to resync. Like DRBD's activity log this is
//! cheap: a write to an already-dirty chunk costs nothing, and only the few changed bytes are
//! written. Bits are cleared (in memory, persisted at the end of a resync) only when the
//! secondary acknowledged the resync copy of the chunk; a crash before that persist only means
//! a few chunks are copied twice.
//!
//! Activity log (for a crash of the primary while *connected*): writes in flight to the
//! secondary may be on one copy and not the other. Before a write touches a 4 MiB extent that
//! is not yet "active", the extent's bit in the activity log is set and made durable; extents
//! stay active while recently used (up to [`AL_MAX_EXTENTS`]) and are retired only when no
//! write in them awaits an acknowledgement. On open, every active extent is folded into the
//! dirty bitmap, so a restarted primary resyncs whatever might have been in flight. Sequential
//! writing costs one small sync per 4 MiB; a working set within the active extents costs none.
//!
//! File layout: a 4096-byte header (`XFTBMAP1`, version, chunk size, disk size, flags), the
//! dirty bitmap bytes (chunk `i` in byte `i / 8`, bit `i % 8`), then the activity-log bytes
//! (extent `e` in byte `e / 8`, bit `e % 8`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Default chunk (resync granularity).
pub const DEFAULT_CHUNK: u64 = 64 * 1024;
const MAGIC: &[u8; 8] = b"XFTBMAP1";
const HEADER: u64 = 4096;
const FLAG_PEER_SYNCED: u64 = 1;
/// Activity-log extent size.
pub const AL_EXTENT: u64 = 4 << 20;
/// Active extents kept at most (DRBD's default `al-extents`).
pub const AL_MAX_EXTENTS: usize = 1237;

/// Errors of the bitmap file.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// I/O on the bitmap file.
    #[error("dirty bitmap {path}: {source}")]
    Io {
        /// File path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file belongs to another disk or is corrupt.
    #[error("dirty bitmap {path}: {reason}")]
    Invalid {
        /// File path.
        path: String,
        /// What does not match.
        reason: String,
    },
}

/// The dirty bitmap of one disk.
#[derive(Debug)]
pub struct DirtyBitmap {
    file: Option<(File, PathBuf)>,
    bits: Vec<u8>,
    chunk: u64,
    size: u64,
    nchunks: u64,
    dirty: u64,
    peer_synced: bool,
    al: Vec<u8>,
    recovered_extents: u64,
}

impl DirtyBitmap {
    /// An in-memory bitmap (tests, or a disk without metadata).
    #[must_use]
    pub fn volatile(size: u64, chunk: u64) -> Self {
        let nchunks = size.div_ceil(chunk);
        Self {
            file: None,
            bits: vec![0; usize::try_from(nchunks.div_ceil(8)).unwrap_or(0)],
            chunk,
            size,
            nchunks,
            dirty: 0,
            peer_synced: false,
            al: vec![0; usize::try_from(size.div_ceil(AL_EXTENT).div_ceil(8)).unwrap_or(0)],
            recovered_extents: 0,
        }
    }

    /// Opens or creates the bitmap file for a disk of `size` bytes.
    pub fn open(path: &Path, size: u64, chunk: u64) -> Result<Self, BitmapError> {
        let io = |source| BitmapError::Io {
            path: path.display().to_string(),
            source,
        };
        let invalid = |reason: String| BitmapError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        if chunk == 0 || !chunk.is_power_of_two() {
            return Err(invalid(format!("chunk size {chunk} is not a power of two")));
        }
        let mut bm = Self::volatile(size, chunk);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            let mut h = vec![0u8; 4096];
            h[0..8].copy_from_slice(MAGIC);
            h[8..12].copy_from_slice(&1u32.to_be_bytes());
            h[12..20].copy_from_slice(&chunk.to_be_bytes());
            h[20..28].copy_from_slice(&size.to_be_bytes());
            file.write_all_at(&h, 0).map_err(io)?;
            file.write_all_at(&bm.bits, HEADER).map_err(io)?;
            file.write_all_at(&bm.al, bm.al_offset()).map_err(io)?;
            file.sync_all().map_err(io)?;
        } else {
            let mut h = [0u8; 36];
            file.read_exact_at(&mut h, 0).map_err(io)?;
            if &h[0..8] != MAGIC {
                return Err(invalid("bad magic".into()));
            }
            let fchunk = u64::from_be_bytes(h[12..20].try_into().unwrap_or_default());
            let fsize = u64::from_be_bytes(h[20..28].try_into().unwrap_or_default());
            let flags = u64::from_be_bytes(h[28..36].try_into().unwrap_or_default());
            if fchunk != chunk || fsize != size {
                return Err(invalid(format!(
                    "made for size {fsize} chunk {fchunk}, disk is size {size} chunk {chunk}"
                )));
            }
            file.read_exact_at(&mut bm.bits, HEADER).map_err(io)?;
            let mut al = vec![0u8; bm.al.len()];
            file.read_exact_at(&mut al, bm.al_offset()).map_err(io)?;
            bm.peer_synced = flags & FLAG_PEER_SYNCED != 0;
            // Extents active at a crash may differ between the copies: resync them.
            for e in 0..size.div_ceil(AL_EXTENT) {
                let active = usize::try_from(e / 8)
                    .ok()
                    .and_then(|b| al.get(b))
                    .is_some_and(|byte| byte & (1 << (e % 8)) != 0);
                if active {
                    bm.recovered_extents += 1;
                    bm.mark_volatile(e * AL_EXTENT, AL_EXTENT);
                }
            }
            bm.dirty = bm.bits.iter().map(|b| u64::from(b.count_ones())).sum();
            if bm.recovered_extents > 0 {
                file.write_all_at(&bm.bits, HEADER).map_err(io)?;
                file.write_all_at(&bm.al, bm.al_offset()).map_err(io)?;
                file.sync_data().map_err(io)?;
            }
        }
        bm.file = Some((file, path.to_path_buf()));
        Ok(bm)
    }

    fn al_offset(&self) -> u64 {
        HEADER + self.bits.len() as u64
    }

    /// Activity-log extents found active when the file was opened (an unclean stop while
    /// connected); their chunks were marked dirty.
    #[must_use]
    pub fn recovered_extents(&self) -> u64 {
        self.recovered_extents
    }

    /// Whether activity-log extent `e` is active.
    #[must_use]
    pub fn al_active(&self, e: u64) -> bool {
        usize::try_from(e / 8)
            .ok()
            .and_then(|b| self.al.get(b))
            .is_some_and(|byte| byte & (1 << (e % 8)) != 0)
    }

    /// Activates extents `activate` and retires extents `retire` in the activity log, durably
    /// (one write and one sync, only if a bit changed).
    pub fn al_update(&mut self, activate: &[u64], retire: &[u64]) -> Result<(), BitmapError> {
        let mut changed = false;
        for (list, on) in [(retire, false), (activate, true)] {
            for &e in list {
                let Some(byte) = usize::try_from(e / 8).ok().and_then(|b| self.al.get_mut(b))
                else {
                    continue;
                };
                let mask = 1u8 << (e % 8);
                if (*byte & mask != 0) != on {
                    *byte ^= mask;
                    changed = true;
                }
            }
        }
        if !changed {
            return Ok(());
        }
        if let Some((file, path)) = &self.file {
            let io = |source| BitmapError::Io {
                path: path.display().to_string(),
                source,
            };
            file.write_all_at(&self.al, HEADER + self.bits.len() as u64)
                .map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        Ok(())
    }

    /// Chunk size in bytes.
    #[must_use]
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// Number of chunks.
    #[must_use]
    pub fn nchunks(&self) -> u64 {
        self.nchunks
    }

    /// Dirty chunk count.
    #[must_use]
    pub fn dirty_chunks(&self) -> u64 {
        self.dirty
    }

    /// Bytes covered by dirty chunks (the last chunk may be short).
    #[must_use]
    pub fn dirty_bytes(&self) -> u64 {
        let mut b = self.dirty * self.chunk;
        if self.nchunks > 0 && self.is_dirty(self.nchunks - 1) {
            b -= self.nchunks * self.chunk - self.size;
        }
        b
    }

    /// Whether the secondary was fully synced at least once (cleared: full sync needed).
    #[must_use]
    pub fn peer_synced(&self) -> bool {
        self.peer_synced
    }

    /// Whether chunk `i` is dirty.
    #[must_use]
    pub fn is_dirty(&self, i: u64) -> bool {
        usize::try_from(i / 8)
            .ok()
            .and_then(|b| self.bits.get(b))
            .is_some_and(|byte| byte & (1 << (i % 8)) != 0)
    }

    /// Whether any chunk covering `[offset, offset+len)` is dirty.
    #[must_use]
    pub fn any_dirty(&self, offset: u64, len: u64) -> bool {
        self.chunks(offset, len)
            .is_some_and(|(a, b)| (a..=b).any(|i| self.is_dirty(i)))
    }

    /// Chunk range `[first, last]` covering `[offset, offset+len)`, clamped to the disk.
    fn chunks(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset / self.chunk, (end - 1) / self.chunk))
    }

    fn set_range(&mut self, first: u64, last: u64, value: bool) -> Option<(usize, usize)> {
        let mut changed: Option<(usize, usize)> = None;
        for i in first..=last {
            let Ok(byte) = usize::try_from(i / 8) else {
                continue;
            };
            let mask = 1u8 << (i % 8);
            let Some(b) = self.bits.get_mut(byte) else {
                continue;
            };
            if (*b & mask != 0) != value {
                *b ^= mask;
                if value {
                    self.dirty += 1;
                } else {
                    self.dirty -= 1;
                }
                changed = Some(changed.map_or((byte, byte), |(a, _)| (a, byte)));
            }
        }
        changed
    }

    /// Marks `[offset, offset+len)` dirty and makes it durable before returning. Returns
    /// whether any bit changed (false: the cheap path, no I/O).
    pub fn mark(&mut self, offset: u64, len: u64) -> Result<bool, BitmapError> {
        let Some((first, last)) = self.chunks(offset, len) else {
            return Ok(false);
        };
        let Some((a, b)) = self.set_range(first, last, true) else {
            return Ok(false);
        };
        if let Some((file, path)) = &self.file {
            let io = |source| BitmapError::Io {
                path: path.display().to_string(),
                source,
            };
            file.write_all_at(&self.bits[a..=b], HEADER + a as u64)
                .map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        Ok(true)
    }

    /// Marks dirty in memory only (a following [`DirtyBitmap::persist`] makes it durable).
    pub fn mark_volatile(&mut self, offset: u64, len: u64) {
        if let Some((first, last)) = self.chunks(offset, len) {
            self.set_range(first, last, true);
        }
    }

    /// Clears the chunks covering `[offset, offset+len)` in memory.
    pub fn clear(&mut self, offset: u64, len: u64) {
        if let Some((first, last)) = self.chunks(offset, len) {
            self.set_range(first, last, false);
        }
    }

    /// The first dirty chunk at or after chunk `from`.
    #[must_use]
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.nchunks {
            let byte = usize::try_from(i / 8).ok()?;
            if i.is_multiple_of(8) && self.bits[byte] == 0 {
                i += 8;
                continue;
            }
            if self.is_dirty(i) {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// Writes the whole bitmap and header flags and syncs.
    pub fn persist(&mut self) -> Result<(), BitmapError> {
        if let Some((file, path)) = &self.file {
            let io = |source| BitmapError::Io {
                path: path.display().to_string(),
                source,
            };
            let flags = if self.peer_synced {
                FLAG_PEER_SYNCED
            } else {
                0
            };
            file.write_all_at(&flags.to_be_bytes(), 28).map_err(io)?;
            file.write_all_at(&self.bits, HEADER).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        Ok(())
    }

    /// Records whether the secondary holds a complete copy, durably.
    pub fn set_peer_synced(&mut self, v: bool) -> Result<(), BitmapError> {
        self.peer_synced = v;
        self.persist()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let mut bm = DirtyBitmap::open(&p, 10 << 20, DEFAULT_CHUNK).unwrap();
        assert!(bm.mark(65_536 * 3 + 10, 100_000).unwrap());
        assert!(!bm.mark(65_536 * 3, 1).unwrap(), "already dirty: no I/O");
        drop(bm);
        let bm = DirtyBitmap::open(&p, 10 << 20, DEFAULT_CHUNK).unwrap();
        assert_eq!(bm.dirty_chunks(), 2);
        assert_eq!(bm.next_dirty(0), Some(3));
        assert_eq!(bm.next_dirty(4), Some(4));
        assert_eq!(bm.next_dirty(5), None);
    }

    #[test]
    fn reopen_with_other_geometry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        DirtyBitmap::open(&p, 1 << 20, DEFAULT_CHUNK).unwrap();
        assert!(matches!(
            DirtyBitmap::open(&p, 2 << 20, DEFAULT_CHUNK),
            Err(BitmapError::Invalid { .. })
        ));
    }

    #[test]
    fn dirty_bytes_counts_short_last_chunk() {
        let mut bm = DirtyBitmap::volatile(100_000, DEFAULT_CHUNK);
        bm.mark_volatile(0, 100_000);
        assert_eq!(bm.dirty_bytes(), 100_000);
        bm.clear(0, 1);
        assert_eq!(bm.dirty_bytes(), 100_000 - 65_536);
        assert_eq!(bm.next_dirty(0), Some(1));
    }

    #[test]
    fn peer_synced_flag_persists() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let mut bm = DirtyBitmap::open(&p, 1 << 20, DEFAULT_CHUNK).unwrap();
        assert!(!bm.peer_synced());
        bm.set_peer_synced(true).unwrap();
        drop(bm);
        assert!(DirtyBitmap::open(&p, 1 << 20, DEFAULT_CHUNK)
            .unwrap()
            .peer_synced());
    }
}

#[cfg(test)]
mod al_tests {
    use super::*;

    #[test]
    fn active_extents_become_dirty_after_an_unclean_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let mut bm = DirtyBitmap::open(&p, 64 << 20, DEFAULT_CHUNK).unwrap();
        bm.al_update(&[2, 5], &[]).unwrap();
        bm.al_update(&[7], &[5]).unwrap();
        assert!(bm.al_active(2) && !bm.al_active(5) && bm.al_active(7));
        drop(bm);
        let bm = DirtyBitmap::open(&p, 64 << 20, DEFAULT_CHUNK).unwrap();
        assert_eq!(bm.recovered_extents(), 2);
        assert_eq!(bm.dirty_bytes(), 2 * AL_EXTENT);
        assert!(bm.is_dirty(2 * AL_EXTENT / DEFAULT_CHUNK));
        assert!(!bm.is_dirty(5 * AL_EXTENT / DEFAULT_CHUNK));
        assert!(!bm.al_active(2), "folded extents are retired");
        drop(bm);
        // Folding was made durable: a second reopen finds the dirty bits, no active extents.
        let bm = DirtyBitmap::open(&p, 64 << 20, DEFAULT_CHUNK).unwrap();
        assert_eq!(bm.recovered_extents(), 0);
        assert_eq!(bm.dirty_bytes(), 2 * AL_EXTENT);
    }
}
