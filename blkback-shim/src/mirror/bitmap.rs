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
//! Failover (dirty-only resync of a returning old primary): every bitmap has a random
//! *lineage* id, which the primary announces to its secondary at each session
//! ([`super::wire::PeerMsg::Lineage`]). A secondary stopped cleanly while consistent leaves a
//! bitmap for its own promotion ([`DirtyBitmap::create_for_promotion`]): peer synced, nothing
//! dirty, *expecting a report* from that lineage. Promoted, it records every write as dirty
//! (degraded). When the old primary comes back as a secondary it reads its own bitmap
//! ([`DirtyBitmap::read_report`]: dirty bits plus active activity-log extents, trusted only if
//! it was stopped cleanly or written during this boot) and sends it
//! ([`super::wire::PeerMsg::DirtyReport`]); the new primary ORs it in
//! ([`DirtyBitmap::accept_report`], durable before any copy) and resyncs only the union. A
//! promoted bitmap that receives no report of the expected lineage falls back to a full sync.
//!
//! File layout: a 4096-byte header (`XFTBMAP1`, version, chunk size, disk size, flags, lineage,
//! expected report lineage, boot id of the last writer), the dirty bitmap bytes (chunk `i` in
//! byte `i / 8`, bit `i % 8`), then the activity-log bytes (extent `e` in byte `e / 8`, bit
//! `e % 8`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Default chunk (resync granularity).
pub const DEFAULT_CHUNK: u64 = 64 * 1024;
const MAGIC: &[u8; 8] = b"XFTBMAP1";
const HEADER: u64 = 4096;
const HEADER_BYTES: usize = 4096;
const FLAG_PEER_SYNCED: u64 = 1;
/// The primary that used the file stopped cleanly (its store was synced).
const FLAG_CLEAN: u64 = 2;
/// A primary has used the file (a promotion bitmap never opened by one reports nothing).
const FLAG_USED: u64 = 4;
/// Header bytes in use: magic 0..8, version 8..12, chunk 12..20, size 20..28, flags 28..36,
/// lineage 36..44, expected report lineage 44..52, boot id 52..88.
const HEADER_USED: usize = 88;
const BOOT_LEN: usize = 36;
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
    lineage: u64,
    expect_report: u64,
    clean: bool,
    used: bool,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`); empty if unknown.
pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn new_lineage() -> u64 {
    loop {
        let v = rand::random::<u64>();
        if v != 0 {
            return v;
        }
    }
}

fn be64(h: &[u8], at: usize) -> u64 {
    h.get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
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
            lineage: new_lineage(),
            expect_report: 0,
            clean: false,
            used: false,
        }
    }

    fn header(&self) -> [u8; HEADER_USED] {
        let mut h = [0u8; HEADER_USED];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&1u32.to_be_bytes());
        h[12..20].copy_from_slice(&self.chunk.to_be_bytes());
        h[20..28].copy_from_slice(&self.size.to_be_bytes());
        let mut flags = 0;
        if self.peer_synced {
            flags |= FLAG_PEER_SYNCED;
        }
        if self.clean {
            flags |= FLAG_CLEAN;
        }
        if self.used {
            flags |= FLAG_USED;
        }
        h[28..36].copy_from_slice(&flags.to_be_bytes());
        h[36..44].copy_from_slice(&self.lineage.to_be_bytes());
        h[44..52].copy_from_slice(&self.expect_report.to_be_bytes());
        let boot = boot_id();
        let n = boot.len().min(BOOT_LEN);
        h[52..52 + n].copy_from_slice(&boot.as_bytes()[..n]);
        h
    }

    /// Reads and checks a file's header and its bits and activity log.
    fn read_file(
        file: &File,
        path: &Path,
        size: u64,
        chunk: u64,
    ) -> Result<(Self, [u8; HEADER_USED], Vec<u8>), BitmapError> {
        let io = |source| BitmapError::Io {
            path: path.display().to_string(),
            source,
        };
        let invalid = |reason: String| BitmapError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let mut bm = Self::volatile(size, chunk);
        let mut h = [0u8; HEADER_USED];
        file.read_exact_at(&mut h, 0).map_err(io)?;
        if &h[0..8] != MAGIC {
            return Err(invalid("bad magic".into()));
        }
        let fchunk = be64(&h, 12);
        let fsize = be64(&h, 20);
        let flags = be64(&h, 28);
        if fchunk != chunk || fsize != size {
            return Err(invalid(format!(
                "made for size {fsize} chunk {fchunk}, disk is size {size} chunk {chunk}"
            )));
        }
        file.read_exact_at(&mut bm.bits, HEADER).map_err(io)?;
        let mut al = vec![0u8; bm.al.len()];
        file.read_exact_at(&mut al, bm.al_offset()).map_err(io)?;
        bm.peer_synced = flags & FLAG_PEER_SYNCED != 0;
        bm.clean = flags & FLAG_CLEAN != 0;
        bm.used = flags & FLAG_USED != 0;
        // Files from before lineages keep a fresh one.
        bm.lineage = match be64(&h, 36) {
            0 => bm.lineage,
            l => l,
        };
        bm.expect_report = be64(&h, 44);
        Ok((bm, h, al))
    }

    /// Folds active activity-log extents (`al`, as read from a file) into the dirty bits.
    fn fold_al(&mut self, al: &[u8]) {
        for e in 0..self.size.div_ceil(AL_EXTENT) {
            let active = usize::try_from(e / 8)
                .ok()
                .and_then(|b| al.get(b))
                .is_some_and(|byte| byte & (1 << (e % 8)) != 0);
            if active {
                self.recovered_extents += 1;
                self.mark_volatile(e * AL_EXTENT, AL_EXTENT);
            }
        }
        self.dirty = self.bits.iter().map(|b| u64::from(b.count_ones())).sum();
    }

    /// The old primary's side of a failover: what this host, when it last ran as primary with
    /// the bitmap at `path`, may have written that its peer never acknowledged (dirty bits and
    /// active activity-log extents), with the bitmap's lineage. `None` when there is nothing
    /// trustworthy to report: no file, never used by a primary (a promotion bitmap not yet
    /// promoted), never fully synced to a peer, or written during another
    /// boot without a clean stop (writes in the page cache may have been lost with the host,
    /// so only a full sync is safe). Reads only.
    pub fn read_report(
        path: &Path,
        size: u64,
        chunk: u64,
    ) -> Result<Option<(u64, Vec<u8>)>, BitmapError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(BitmapError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let (mut bm, h, al) = Self::read_file(&file, path, size, chunk)?;
        let boot = boot_id();
        let stamp = &h[52..52 + BOOT_LEN.min(boot.len())];
        let same_boot = !boot.is_empty() && stamp == boot.as_bytes();
        if be64(&h, 36) == 0 || !bm.used || !bm.peer_synced || !(bm.clean || same_boot) {
            return Ok(None);
        }
        bm.fold_al(&al);
        Ok(Some((bm.lineage, bm.bits)))
    }

    /// The promoted secondary's side of a failover: (re)creates the bitmap at `path` for a
    /// copy that was consistent with the primary of lineage `expect` when it stopped cleanly:
    /// peer synced, nothing dirty, accepting a dirty report from that lineage only (without
    /// one the first session is a full sync). `dirty` ranges are marked (level 3: epoch-mode
    /// writes this copy discarded, which the old primary has). Written to a temporary file and
    /// renamed.
    pub fn create_for_promotion(
        path: &Path,
        size: u64,
        chunk: u64,
        expect: u64,
        dirty: &[(u64, u64)],
    ) -> Result<(), BitmapError> {
        let io = |source| BitmapError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut bm = Self::volatile(size, chunk);
        bm.peer_synced = true;
        bm.clean = true;
        bm.expect_report = expect;
        for &(offset, len) in dirty {
            bm.mark_volatile(offset, len);
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        let mut h = vec![0u8; HEADER_BYTES];
        h[..HEADER_USED].copy_from_slice(&bm.header());
        file.write_all_at(&h, 0).map_err(io)?;
        file.write_all_at(&bm.bits, HEADER).map_err(io)?;
        file.write_all_at(&bm.al, bm.al_offset()).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }

    /// This bitmap's lineage id (announced to the secondary).
    #[must_use]
    pub fn lineage(&self) -> u64 {
        self.lineage
    }

    /// The lineage whose dirty report this bitmap still needs before a dirty-only resync is
    /// safe (a promoted secondary's), if any.
    #[must_use]
    pub fn expected_report(&self) -> Option<u64> {
        (self.expect_report != 0).then_some(self.expect_report)
    }

    /// Merges a returning old primary's dirty report if it is the expected one: ORs `bits`
    /// in and stops expecting a report, durably (bits first). Returns whether it was merged.
    pub fn accept_report(&mut self, lineage: u64, bits: &[u8]) -> Result<bool, BitmapError> {
        if self.expect_report == 0 || lineage != self.expect_report || bits.len() != self.bits.len()
        {
            return Ok(false);
        }
        for (b, r) in self.bits.iter_mut().zip(bits) {
            *b |= r;
        }
        // Bits past the last chunk are not chunks.
        let tail = self.nchunks % 8;
        if tail != 0 {
            if let Some(last) = self.bits.last_mut() {
                *last &= (1u8 << tail) - 1;
            }
        }
        self.dirty = self.bits.iter().map(|b| u64::from(b.count_ones())).sum();
        if let Some((file, path)) = &self.file {
            let io = |source| BitmapError::Io {
                path: path.display().to_string(),
                source,
            };
            file.write_all_at(&self.bits, HEADER).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        self.expect_report = 0;
        self.persist()?;
        Ok(true)
    }

    /// Records a clean stop (the store was synced): a later report from this file is trusted
    /// across a reboot.
    pub fn mark_clean(&mut self) -> Result<(), BitmapError> {
        self.clean = true;
        self.persist()
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut bm = if len == 0 {
            let bm = Self::volatile(size, chunk);
            let mut h = vec![0u8; HEADER_BYTES];
            h[..HEADER_USED].copy_from_slice(&bm.header());
            file.write_all_at(&h, 0).map_err(io)?;
            file.write_all_at(&bm.bits, HEADER).map_err(io)?;
            file.write_all_at(&bm.al, bm.al_offset()).map_err(io)?;
            file.sync_all().map_err(io)?;
            bm
        } else {
            let (mut bm, _, al) = Self::read_file(&file, path, size, chunk)?;
            // Extents active at a crash may differ between the copies: resync them.
            bm.fold_al(&al);
            if bm.recovered_extents > 0 {
                file.write_all_at(&bm.bits, HEADER).map_err(io)?;
                file.write_all_at(&bm.al, bm.al_offset()).map_err(io)?;
                file.sync_data().map_err(io)?;
            }
            bm
        };
        // In use by a primary from now on: not clean, stamped with this boot.
        bm.clean = false;
        bm.used = true;
        file.write_all_at(&bm.header(), 0).map_err(io)?;
        file.sync_data().map_err(io)?;
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
            file.write_all_at(&self.header(), 0).map_err(io)?;
            file.write_all_at(&self.bits, HEADER).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        Ok(())
    }

    /// Records whether the secondary holds a complete copy, durably. A completed full sync
    /// also ends the wait for a failover dirty report.
    pub fn set_peer_synced(&mut self, v: bool) -> Result<(), BitmapError> {
        self.peer_synced = v;
        if v {
            self.expect_report = 0;
        }
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

    fn chunk_set(bits: &[u8]) -> Vec<u64> {
        (0..bits.len() as u64 * 8)
            .filter(|&i| bits[usize::try_from(i / 8).unwrap()] & (1 << (i % 8)) != 0)
            .collect()
    }

    #[test]
    fn a_killed_primarys_report_holds_its_dirty_chunks_and_active_extents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let mut bm = DirtyBitmap::open(&p, 64 << 20, DEFAULT_CHUNK).unwrap();
        bm.set_peer_synced(true).unwrap();
        bm.mark(40 << 20, 1).unwrap();
        bm.al_update(&[2], &[]).unwrap();
        let lineage = bm.lineage();
        drop(bm); // no clean stop: a SIGKILL in this boot
        let (l, bits) = DirtyBitmap::read_report(&p, 64 << 20, DEFAULT_CHUNK)
            .unwrap()
            .expect("same boot: trusted");
        assert_eq!(l, lineage);
        let per_extent = AL_EXTENT / DEFAULT_CHUNK;
        let mut want: Vec<u64> = (2 * per_extent..3 * per_extent).collect();
        want.push((40 << 20) / DEFAULT_CHUNK);
        assert_eq!(chunk_set(&bits), want);
        // Reading does not change the file.
        let again = DirtyBitmap::read_report(&p, 64 << 20, DEFAULT_CHUNK).unwrap();
        assert_eq!(again, Some((lineage, bits)));
    }

    #[test]
    fn no_report_without_a_file_or_a_synced_peer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        assert_eq!(
            DirtyBitmap::read_report(&p, 1 << 20, DEFAULT_CHUNK).unwrap(),
            None
        );
        let mut bm = DirtyBitmap::open(&p, 1 << 20, DEFAULT_CHUNK).unwrap();
        bm.mark(0, 1).unwrap();
        drop(bm);
        assert_eq!(
            DirtyBitmap::read_report(&p, 1 << 20, DEFAULT_CHUNK).unwrap(),
            None,
            "a peer that never completed a full sync cannot take a dirty-only resync"
        );
    }

    #[test]
    fn a_promotion_bitmap_merges_only_the_expected_report_durably() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let size = 8 << 20;
        DirtyBitmap::create_for_promotion(&p, size, DEFAULT_CHUNK, 77, &[(0, 1)]).unwrap();
        let mut bm = DirtyBitmap::open(&p, size, DEFAULT_CHUNK).unwrap();
        assert!(bm.peer_synced());
        assert_eq!(bm.expected_report(), Some(77));
        assert_eq!(bm.dirty_chunks(), 1, "the range given at creation");
        bm.mark(0, 1).unwrap(); // written since the promotion
        let mut report = vec![0u8; 16];
        report[1] = 0b0000_0011; // chunks 8 and 9
        assert!(!bm.accept_report(78, &report).unwrap(), "other lineage");
        assert!(
            !bm.accept_report(77, &report[..3]).unwrap(),
            "other geometry"
        );
        assert_eq!(bm.expected_report(), Some(77));
        assert!(bm.accept_report(77, &report).unwrap());
        assert_eq!(bm.expected_report(), None);
        assert!(!bm.accept_report(77, &report).unwrap(), "only once");
        drop(bm);
        let bm = DirtyBitmap::open(&p, size, DEFAULT_CHUNK).unwrap();
        assert_eq!(bm.expected_report(), None);
        assert_eq!(chunk_set(&bm.bits), vec![0, 8, 9]);
        assert_eq!(bm.dirty_chunks(), 3);
    }

    #[test]
    fn a_promotion_bitmap_never_opened_by_a_primary_reports_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        DirtyBitmap::create_for_promotion(&p, 1 << 20, DEFAULT_CHUNK, 5, &[(0, 1)]).unwrap();
        assert_eq!(
            DirtyBitmap::read_report(&p, 1 << 20, DEFAULT_CHUNK).unwrap(),
            None
        );
        drop(DirtyBitmap::open(&p, 1 << 20, DEFAULT_CHUNK).unwrap());
        let (_, bits) = DirtyBitmap::read_report(&p, 1 << 20, DEFAULT_CHUNK)
            .unwrap()
            .expect("promoted: it reports what it wrote");
        assert_eq!(chunk_set(&bits), vec![0]);
    }

    #[test]
    fn a_completed_full_sync_ends_the_wait_for_a_report() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        DirtyBitmap::create_for_promotion(&p, 1 << 20, DEFAULT_CHUNK, 5, &[]).unwrap();
        let mut bm = DirtyBitmap::open(&p, 1 << 20, DEFAULT_CHUNK).unwrap();
        bm.set_peer_synced(true).unwrap();
        drop(bm);
        let bm = DirtyBitmap::open(&p, 1 << 20, DEFAULT_CHUNK).unwrap();
        assert_eq!(bm.expected_report(), None);
    }
}
