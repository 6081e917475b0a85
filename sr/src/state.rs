//! The SR's state on one host: `<state_dir>/<sr uuid>/sr.json` (name, description, device
//! config, volumes), written atomically (temp file, fsync, rename) under an exclusive lock
//! (`lock` beside it: xapi may run several calls at once). The file may have been damaged or
//! edited: it is parsed strictly and every key and size re-checked.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{check_id, DeviceConfig, HostConfig, MAX_SLOTS};
use crate::error::{io, SrError, SrResult};

/// One volume's metadata (the same on both hosts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMeta {
    /// Its uuid (also its key).
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// A-link port slot of its blkback pair.
    pub slot: u16,
    /// `Volume.set` keys (not interpreted).
    #[serde(default)]
    pub keys: BTreeMap<String, String>,
    /// Whether xapi created it sharable.
    #[serde(default)]
    pub sharable: bool,
}

/// The SR's state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrState {
    /// SR uuid.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// The device config it was created with (xapi's dictionary form).
    pub config: Value,
    /// Attached on this host.
    #[serde(default)]
    pub attached: bool,
    /// Volumes by key.
    #[serde(default)]
    pub volumes: BTreeMap<String, VolumeMeta>,
}

/// Where an SR lives on this host.
#[derive(Debug, Clone)]
pub struct SrDir {
    /// The SR's uuid.
    pub uuid: String,
    /// `<state_dir>/<uuid>`.
    pub dir: PathBuf,
    /// `<run_dir>/<uuid>`.
    pub run: PathBuf,
}

/// Largest volume: 16 TiB (the blkback's bitmap is sized from it).
pub const MAX_SIZE: u64 = 16 << 40;

impl SrDir {
    /// The SR `uuid` on this host (the uuid is checked: it becomes a path component).
    pub fn new(host: &HostConfig, uuid: &str) -> SrResult<Self> {
        let uuid = check_id("SR", uuid)?.to_string();
        Ok(Self {
            dir: host.state_dir.join(&uuid),
            run: host.run_dir.join(&uuid),
            uuid,
        })
    }

    fn file(&self) -> PathBuf {
        self.dir.join("sr.json")
    }

    /// Takes the SR's lock (blocking) for one call.
    pub fn lock(&self) -> SrResult<Flock<File>> {
        std::fs::create_dir_all(&self.dir).map_err(io(self.dir.display()))?;
        let p = self.dir.join("lock");
        let f = File::create(&p).map_err(io(p.display()))?;
        Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| SrError::failed(format!("lock {}: {e}", p.display())))
    }

    /// Whether the SR exists on this host.
    pub fn exists(&self) -> bool {
        self.file().exists()
    }

    /// Reads and checks the state.
    pub fn load(&self) -> SrResult<SrState> {
        let p = self.file();
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SrError::failed(format!(
                    "SR {} does not exist on this host ({} missing)",
                    self.uuid,
                    p.display()
                )))
            }
            Err(e) => return Err(io(p.display())(e)),
        };
        let st: SrState = serde_json::from_str(&text)
            .map_err(|e| SrError::failed(format!("SR state {} is damaged: {e}", p.display())))?;
        if st.uuid != self.uuid {
            return Err(SrError::failed(format!(
                "SR state {} names SR {:?}",
                p.display(),
                st.uuid
            )));
        }
        let mut slots = std::collections::BTreeSet::new();
        for (k, v) in &st.volumes {
            check_id("volume key in the SR state", k)
                .map_err(|e| SrError::failed(e.params.join(": ")))?;
            if *k != v.uuid || v.size > MAX_SIZE || v.slot >= MAX_SLOTS || !slots.insert(v.slot) {
                return Err(SrError::failed(format!(
                    "SR state {}: volume {k} is inconsistent (uuid, size or slot)",
                    p.display()
                )));
            }
        }
        Ok(st)
    }

    /// The state's device config, parsed.
    pub fn device_config(st: &SrState) -> SrResult<DeviceConfig> {
        DeviceConfig::parse(&st.config)
    }

    /// Writes the state atomically.
    pub fn save(&self, st: &SrState) -> SrResult<()> {
        std::fs::create_dir_all(&self.dir).map_err(io(self.dir.display()))?;
        let p = self.file();
        let tmp = self.dir.join("sr.json.tmp");
        let text = serde_json::to_vec_pretty(st)
            .map_err(|e| SrError::failed(format!("encoding the SR state: {e}")))?;
        let mut f = File::create(&tmp).map_err(io(tmp.display()))?;
        f.write_all(&text).map_err(io(tmp.display()))?;
        f.sync_all().map_err(io(tmp.display()))?;
        std::fs::rename(&tmp, &p).map_err(io(p.display()))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(self.dir.display()))
    }

    /// Volume `key`'s disk file.
    pub fn disk(&self, key: &str) -> SrResult<PathBuf> {
        Ok(self.dir.join(format!("{}.img", check_id("volume", key)?)))
    }

    /// Volume `key`'s runtime directory (sockets, pid, log).
    pub fn vol_run(&self, key: &str) -> SrResult<PathBuf> {
        Ok(self.run.join(check_id("volume", key)?))
    }

    /// Creates the disk file (sparse) or grows it to `size`; never shrinks.
    pub fn ensure_disk(&self, key: &str, size: u64) -> SrResult<()> {
        let p = self.disk(key)?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io(p.display()))?;
        let len = f.metadata().map_err(io(p.display()))?.len();
        if len < size {
            f.set_len(size).map_err(io(p.display()))?;
            f.sync_all().map_err(io(p.display()))?;
        }
        Ok(())
    }

    /// Removes the volume's files (disk, bitmap, state, runtime directory).
    pub fn remove_volume_files(&self, key: &str) -> SrResult<()> {
        let disk = self.disk(key)?;
        for ext in ["", ".xenft-bitmap", ".xenft-state"] {
            let mut p = disk.clone().into_os_string();
            p.push(ext);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(Path::new(&p).display())(e)),
            }
        }
        let _ = std::fs::remove_dir_all(self.vol_run(key)?);
        Ok(())
    }
}

/// A fresh random uuid (version 4 form).
#[must_use]
pub fn new_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[16..20],
        &h[20..32]
    )
}
