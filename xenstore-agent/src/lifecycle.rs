//! The protection lifecycle of one VM and its persistence.
//!
//! ```text
//! unprotected → syncing → protected ⇄ degraded → resyncing → protected
//!                             │  ⇅ level raised: syncing toward it, protected at the old one
//!                             │    meanwhile; level lowered: protected at the new one at once
//!   (primary host lost)       └→ failing-over → failed-over (running on the old secondary,
//!                                 roles swapped) → resyncing → protected
//! ```
//! A [`VmRecord`] holds the roles (primary, secondary), the role generation (bumped on every
//! take-over, so the host that returns after a failover learns it is now the secondary; a level
//! change does not bump it), the phase, and the level the VM is protected at, with the higher
//! one it syncs toward when its level was raised while it runs (`core::levels`; a raise does
//! not count as protected at the new level until synced). Records are written to a state file with write-to-temporary + fsync + rename, so an
//! agent that restarts (even mid-resync) resumes from the last decision it made.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::{HostId, VmId};

/// Largest accepted state file (bytes).
pub const MAX_STATE_FILE: u64 = 16 << 20;

/// Protection level of a VM (see PRODUCT.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Level {
    /// Basic HA: restart on the reserved host.
    L1,
    /// Component-level FT: disk mirrored synchronously, redirects on component faults.
    L2,
    /// System-level FT: level 2 plus checkpointed memory; take-over resumes the last epoch.
    L3,
}

impl TryFrom<u8> for Level {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            1 => Ok(Level::L1),
            2 => Ok(Level::L2),
            3 => Ok(Level::L3),
            _ => Err(format!("protection level {v} is not 1, 2 or 3")),
        }
    }
}

impl From<Level> for u8 {
    fn from(l: Level) -> u8 {
        match l {
            Level::L1 => 1,
            Level::L2 => 2,
            Level::L3 => 3,
        }
    }
}

/// Where a protected VM is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Configured but the first sync has not started.
    Unprotected,
    /// Initial disk (and memory) sync in progress.
    Syncing,
    /// Both copies in sync: a host loss is survived.
    Protected,
    /// The peer or a component is lost; the VM runs unprotected, changes are tracked.
    Degraded,
    /// Dirty regions are copied to the peer again.
    Resyncing,
    /// This host is taking the VM over.
    FailingOver,
    /// The VM runs on the old secondary (now primary); the old primary is still away.
    FailedOver,
    /// This host's copy is paused because it could not prove it may run it.
    Fenced,
}

/// What the agent persists about one protected VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    /// The VM.
    pub vm: VmId,
    /// The level it is protected at: what a take-over uses (a level-3 resume from the last
    /// checkpoint, a level-2 take-over of the mirrored disk, a level-1 restart). A VM that is
    /// not protected yet (`unprotected`, its first `syncing`) is being protected at this level.
    pub level: Level,
    /// A higher level asked for while the VM is protected at `level` (its level raised in the
    /// registry): the VM syncs toward it (the disk mirror, then the memory stream for 3) and
    /// `level` becomes it once that sync finished. Meanwhile `syncing` means "protected at
    /// `level`, syncing toward this level". Absent (and not written) otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raising_to: Option<Level>,
    /// The host running the VM.
    pub primary: HostId,
    /// The host holding the replica (level 2/3) or the reserved memory (level 1).
    pub secondary: HostId,
    /// Role generation: bumped on every take-over or restart; the higher one wins.
    pub generation: u64,
    /// The phase as seen by this host.
    pub phase: Phase,
    /// On the secondary: whether the local replica is consistent (not mid-resync), so that a
    /// take-over from it is allowed.
    pub consistent: bool,
    /// Memory the VM needs to run (MiB), checked before a restart or take-over.
    pub memory_mb: u64,
}

impl VmRecord {
    /// The other host of the pair, seen from `me`.
    #[must_use]
    pub fn other(&self, me: &HostId) -> &HostId {
        if &self.primary == me {
            &self.secondary
        } else {
            &self.primary
        }
    }
}

/// The state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O on the file.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_STATE_FILE`].
    #[error("state file {path} is {size} bytes (max {MAX_STATE_FILE})")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The content is not a valid record list.
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateDoc {
    version: u32,
    vms: Vec<VmRecord>,
}

/// The agent's persisted state: a JSON file replaced atomically.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file at `path`.
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Its path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the records; a missing file is an empty state.
    ///
    /// # Errors
    /// [`StateError`] on I/O errors, an oversized or a corrupt file.
    pub fn load(&self) -> Result<Vec<VmRecord>, StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let meta = match fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        if meta.len() > MAX_STATE_FILE {
            return Err(StateError::TooLarge {
                path: self.path.clone(),
                size: meta.len(),
            });
        }
        let bytes = fs::read(&self.path).map_err(io)?;
        let doc: StateDoc =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        Ok(doc.vms)
    }

    /// Replaces the file with `records`: write a temporary file, fsync, rename, fsync the
    /// directory. A crash leaves either the old or the new state, never a mix.
    ///
    /// # Errors
    /// [`StateError::Io`].
    pub fn save(&self, records: &[VmRecord]) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let doc = StateDoc {
            version: 1,
            vms: records.to_vec(),
        };
        let bytes = serde_json::to_vec_pretty(&doc).map_err(|e| io(std::io::Error::other(e)))?;
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut f = fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, &self.path).map_err(io)?;
        if let Ok(d) = fs::File::open(dir) {
            // Directory fsync makes the rename durable; not supported everywhere, so best effort.
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> VmRecord {
        VmRecord {
            vm: VmId::new("web01").unwrap(),
            level: Level::L3,
            primary: HostId::new("h1").unwrap(),
            secondary: HostId::new("h2").unwrap(),
            generation: 4,
            phase: Phase::Resyncing,
            consistent: false,
            memory_mb: 1024,
            raising_to: None,
        }
    }

    #[test]
    fn saved_state_loads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path().join("state.json"));
        assert!(f.load().unwrap().is_empty());
        f.save(&[rec()]).unwrap();
        assert_eq!(f.load().unwrap(), vec![rec()]);
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    #[test]
    fn a_raise_in_progress_is_kept_and_older_state_files_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let f = StateFile::new(&p);
        let raising = VmRecord {
            raising_to: Some(Level::L3),
            level: Level::L2,
            ..rec()
        };
        f.save(std::slice::from_ref(&raising)).unwrap();
        assert_eq!(f.load().unwrap(), vec![raising]);
        // Written without a raise (as before the field existed): no new key in the file.
        f.save(&[rec()]).unwrap();
        let text = fs::read_to_string(&p).unwrap();
        assert!(!text.contains("raising_to"), "{text}");
        fs::write(&p, br#"{"version":1,"vms":[{"vm":"a","level":2,"primary":"h","secondary":"g","generation":1,"phase":"protected","consistent":true,"memory_mb":1}]}"#).unwrap();
        assert_eq!(f.load().unwrap()[0].raising_to, None);
    }

    #[test]
    fn corrupt_or_hostile_state_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        fs::write(&p, b"{\"version\":1,\"vms\":[{\"vm\":\"a b\"}]}").unwrap();
        assert!(matches!(
            StateFile::new(&p).load(),
            Err(StateError::Corrupt { .. })
        ));
        fs::write(&p, br#"{"version":1,"vms":[{"vm":"a","level":9,"primary":"h","secondary":"g","generation":0,"phase":"protected","consistent":true,"memory_mb":1}]}"#).unwrap();
        assert!(matches!(
            StateFile::new(&p).load(),
            Err(StateError::Corrupt { .. })
        ));
    }
}
