//! The VM's disk on this host: a `xenft-blkback` process — the primary serving the VM's disk
//! over NBD and mirroring it, or the secondary holding the copy — driven by the agent through
//! the production driver ([`BlkbackDriver`]) and the production event follower, and read and
//! written by the VM's service over NBD ([`NbdDisk`]).
//!
//! The blkback processes mirror over an A-link of their own ([`BLKBACK_PORT`] on both A-link
//! interfaces). A node starts its blkback as the primary when it boots the VM, as the
//! secondary when it becomes the replica (with its consistency state removed: the primary
//! then copies everything, as there is no bitmap exchange between former roles); on a
//! take-over the agent promotes the secondary (`promote`), which then serves the disk.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenft_agent::drivers::blkback::BlkbackDriver;
use xenft_agent::drivers::BlkbackFile;
use xenft_control::blkback::{NodeStatus as BlkStatus, PeerLink};
use xenft_control::Client;

use super::process::{args, stop_component};
use super::{Node, PATH_TIMEOUT, SYNC_TIMEOUT};
use crate::service::NbdDisk;
use crate::LabError;

/// Port of the blkback processes' own A-link (on both A-link interfaces).
pub const BLKBACK_PORT: u16 = 7130;
/// One control request to blkback at most this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the NBD export may take to accept the service.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A blkback role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Serves the VM's disk and mirrors it.
    Primary,
    /// Holds the copy.
    Secondary,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Secondary => "secondary",
        }
    }
}

impl Node {
    fn blk_ctl(&self) -> PathBuf {
        self.file("blk.ctl")
    }

    fn nbd_sock(&self) -> PathBuf {
        self.file("nbd.sock")
    }

    /// The agent's configuration of this host's blkback driver.
    pub(super) fn blkback_file(&self) -> BlkbackFile {
        BlkbackFile {
            control: self.blk_ctl(),
            request_timeout_ms: 5000,
            sync_timeout_ms: u64::try_from(SYNC_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The production driver of this host's blkback.
    pub(super) fn blkback(&self) -> BlkbackDriver {
        BlkbackDriver::new(Client::new(self.blk_ctl(), REQUEST_TIMEOUT), SYNC_TIMEOUT)
    }

    /// (Re)starts this host's blkback in `role` and waits until it answers.
    pub(super) fn start_blkback(&self, role: Role) -> Result<(), LabError> {
        self.stop_blkback();
        let disk = self.file("disk");
        if role == Role::Secondary {
            // The copy is stale: declare it fresh so that the primary copies everything.
            let _ = std::fs::remove_file(self.file("disk.xenft-state"));
        }
        let _ = std::fs::remove_file(self.blk_ctl());
        let _ = std::fs::remove_file(self.nbd_sock());
        let (me, peer) = (self.me(), self.me().peer());
        let mut args = args(
            &[
                "--role",
                role.as_str(),
                "--size",
                &self.cfg.disk_bytes.to_string(),
                "--host",
                me.name(),
                "--peer-host",
                peer.name(),
                "--alink-path-timeout-ms",
                &PATH_TIMEOUT.as_millis().to_string(),
                "--ack-timeout-ms",
                "3000",
            ],
            &[
                ("--disk", disk),
                ("--nbd-unix", self.nbd_sock()),
                ("--control", self.blk_ctl()),
                ("--secret-file", self.cfg.dir.file("secret")),
            ],
        );
        args.extend(self.alink_path_args(BLKBACK_PORT));
        self.start_component(
            &self.blk,
            "blkback",
            &self.cfg.blkback_binary,
            &args,
            || self.blkback().status().is_ok(),
        )?;
        self.event(
            &format!("xenft-blkback started ({})", role.as_str()),
            match role {
                Role::Primary => "serves the VM's disk over NBD and mirrors it to the peer",
                Role::Secondary => "holds the disk copy; the primary syncs it",
            },
        );
        Ok(())
    }

    /// Stops this host's blkback, if this node started one.
    pub(super) fn stop_blkback(&self) {
        stop_component(&self.blk);
    }

    /// Connects to this host's NBD export (blkback serving as primary).
    pub(super) fn open_disk(&self) -> Result<Arc<NbdDisk>, LabError> {
        let start = Instant::now();
        loop {
            match self.handle.block_on(NbdDisk::connect(&self.nbd_sock())) {
                Ok(d) => return Ok(Arc::new(d)),
                Err(e) if start.elapsed() > START_TIMEOUT => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The disk's state for the status file: `remote` (the local store failed, I/O served by
    /// the peer's copy), `local` (not replicating), `in_sync`, `resyncing`, `degraded`, or
    /// `copy` (the secondary); and blkback's own status.
    pub(super) fn disk_view(&self, replicating: bool) -> (String, serde_json::Value) {
        let st = match self.blkback().status() {
            Ok(st) => st,
            Err(e) => {
                return (
                    "unknown".into(),
                    serde_json::json!({"error": e.to_string()}),
                )
            }
        };
        let state = match &st {
            BlkStatus::Primary { primary: p } if p.local_failure.is_some() => "remote",
            BlkStatus::Primary { .. } | BlkStatus::Local if !replicating => "local",
            BlkStatus::Primary { primary: p } => match p.peer {
                PeerLink::InSync => "in_sync",
                PeerLink::Resyncing => "resyncing",
                PeerLink::Degraded => "degraded",
            },
            BlkStatus::Local => "local",
            BlkStatus::Secondary { .. } => "copy",
        };
        let detail = match &st {
            BlkStatus::Primary { primary } => serde_json::to_value(primary),
            BlkStatus::Secondary { secondary } => serde_json::to_value(secondary),
            BlkStatus::Local => Ok(serde_json::Value::Null),
        };
        (state.into(), detail.unwrap_or_default())
    }
}
