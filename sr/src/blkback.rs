//! One `xenft-blkback` per volume on each host, started and stopped by the plugin and left
//! running between calls (its own process group and session: it outlives the plugin call
//! that started it, as the agent's components outlive the agent).
//!
//! Per volume, in `<run_dir>/<sr>/<volume>/`: `nbd.sock` (the NBD socket tapdisk opens,
//! oldstyle handshake), `ctl.sock` (the control contract, `xenft_control::blkback`),
//! `blkback.json` (pid and role), `blkback.log`. The disk copy is `<state_dir>/<sr>/<volume>.img`
//! with the blkback's default bitmap and state files beside it. Both hosts' blkbacks of a
//! volume talk over the SR's A-link paths, their ports moved by the volume's slot.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use xenft_control::blkback::{Reply, Request};
use xenft_control::{Blkback, Client};

use crate::config::{DeviceConfig, HostConfig};
use crate::error::{io, SrError, SrResult};
use crate::state::SrDir;

/// How long a started blkback may take to open its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a stopped blkback may take to exit (it syncs its store first).
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Promotion waits for the old primary's session to drain (the blkback's own bound is 5 s).
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(30);

/// The control socket's name in a volume's runtime directory.
pub const CONTROL_SOCKET: &str = "ctl.sock";

/// The control socket of volume `key` of SR `sr` under the SR's `run_dir` (the host
/// configuration's): where another program on the host (the xenft agent) drives the volume's
/// blkback through the control contract. `sr` and `key` are checked (they become path
/// components); the layout is [`SrDir`]'s.
///
/// # Errors
/// [`SrError`] when `sr` or `key` is not a safe name.
pub fn control_socket_of(run_dir: &Path, sr: &str, key: &str) -> SrResult<PathBuf> {
    let host = HostConfig {
        run_dir: run_dir.to_path_buf(),
        ..HostConfig::defaults()
    };
    Ok(SrDir::new(&host, sr)?.vol_run(key)?.join(CONTROL_SOCKET))
}

/// The role a running blkback has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Serves the VM's disk and mirrors to the peer.
    Primary,
    /// Holds the copy.
    Secondary,
}

/// `blkback.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProcFile {
    pid: i32,
    role: Role,
}

/// One volume's blkback on this host.
pub struct Volume<'a> {
    /// Host facts.
    pub host: &'a HostConfig,
    /// The SR.
    pub sr: &'a SrDir,
    /// Its device config.
    pub dc: &'a DeviceConfig,
    /// Volume key.
    pub key: &'a str,
    /// A-link slot.
    pub slot: u16,
}

impl Volume<'_> {
    fn run(&self) -> SrResult<PathBuf> {
        self.sr.vol_run(self.key)
    }

    /// The NBD socket tapdisk opens.
    pub fn nbd_socket(&self) -> SrResult<PathBuf> {
        Ok(self.run()?.join("nbd.sock"))
    }

    /// The control socket.
    pub fn control_socket(&self) -> SrResult<PathBuf> {
        Ok(self.run()?.join(CONTROL_SOCKET))
    }

    fn proc_file(&self) -> SrResult<PathBuf> {
        Ok(self.run()?.join("blkback.json"))
    }

    /// The running blkback's pid and role, if one runs for this volume's disk.
    pub fn running(&self) -> SrResult<Option<(i32, Role)>> {
        let p = self.proc_file()?;
        let Ok(text) = std::fs::read_to_string(&p) else {
            return Ok(None);
        };
        let Ok(pf) = serde_json::from_str::<ProcFile>(&text) else {
            return Ok(None);
        };
        Ok(alive(pf.pid, &self.sr.disk(self.key)?).then_some((pf.pid, pf.role)))
    }

    fn write_proc(&self, pid: i32, role: Role) -> SrResult<()> {
        let p = self.proc_file()?;
        let text = serde_json::to_string(&ProcFile { pid, role })
            .map_err(|e| SrError::failed(format!("encoding {}: {e}", p.display())))?;
        std::fs::write(&p, text).map_err(io(p.display()))
    }

    /// Starts a blkback in `role` (none may run).
    pub fn start(&self, role: Role) -> SrResult<i32> {
        let run = self.run()?;
        std::fs::create_dir_all(&run).map_err(io(run.display()))?;
        let me = self.host.me()?;
        let peer = self.dc.peer_of(&me)?;
        let (nbd, ctl) = (self.nbd_socket()?, self.control_socket()?);
        for s in [&nbd, &ctl] {
            if s.as_os_str().len() > 107 {
                return Err(SrError::failed(format!(
                    "socket path {} is longer than a Unix socket allows: shorten run_dir",
                    s.display()
                )));
            }
            let _ = std::fs::remove_file(s);
        }
        let disk = self.sr.disk(self.key)?;
        let mut cmd = Command::new(&self.host.blkback);
        cmd.arg("--role")
            .arg(match role {
                Role::Primary => "primary",
                Role::Secondary => "secondary",
            })
            .arg("--disk")
            .arg(&disk)
            .arg("--nbd-unix")
            .arg(&nbd)
            .arg("--nbd-oldstyle")
            .arg("--export")
            .arg(self.key)
            .arg("--control")
            .arg(&ctl)
            .arg("--host")
            .arg(&me)
            .arg("--peer-host")
            .arg(peer)
            .arg("--secret-file")
            .arg(&self.dc.secret_file);
        if self.dc.write_through {
            cmd.arg("--write-through");
        }
        for p in self.dc.alink_paths(&me, self.slot)? {
            cmd.arg("--alink-path").arg(p);
        }
        let logp = run.join("blkback.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&logp)
            .map_err(io(logp.display()))?;
        let log2 = log.try_clone().map_err(io(logp.display()))?;
        let mut child = {
            use std::os::unix::process::CommandExt;
            cmd.stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .process_group(0)
                .spawn()
                .map_err(io(self.host.blkback.display()))?
        };
        let pid =
            i32::try_from(child.id()).map_err(|_| SrError::failed("blkback pid out of range"))?;
        self.write_proc(pid, role)?;
        let want = match role {
            Role::Primary => nbd,
            Role::Secondary => ctl,
        };
        // While this call runs we are its parent: its exit is seen (and reaped) here. After
        // the call it outlives us (init reaps it).
        let start = Instant::now();
        while !want.exists() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || start.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(self.proc_file()?);
                return Err(SrError::failed(format!(
                    "xenft-blkback ({role:?}) for volume {} did not start ({}): {}",
                    self.key,
                    exited.map_or("timeout".to_string(), |s| s.to_string()),
                    log_tail(&logp)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(pid)
    }

    /// Stops the running blkback (SIGTERM: a clean stop, store synced), if any.
    pub fn stop(&self) -> SrResult<()> {
        let Some((pid, _)) = self.running()? else {
            let _ = std::fs::remove_file(self.proc_file()?);
            return Ok(());
        };
        let disk = self.sr.disk(self.key)?;
        let target = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while alive(pid, &disk) {
            if start.elapsed() > STOP_TIMEOUT {
                let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(self.proc_file()?);
        Ok(())
    }

    /// Promotes the running secondary in place (it then serves NBD as the primary).
    pub fn promote(&self, pid: i32) -> SrResult<()> {
        let client = Client::<Blkback>::new(self.control_socket()?, PROMOTE_TIMEOUT);
        match client.call(&Request::Promote {
            epoch: None,
            force: false,
        }) {
            Ok(Reply::Promoted { .. }) => self.write_proc(pid, Role::Primary),
            // Promoted already, by the xenft agent taking the VM over through this same
            // control socket (before xapi restarts the VM here and activates the volume).
            _ if self.serves_as_primary() => self.write_proc(pid, Role::Primary),
            Ok(other) => Err(SrError::failed(format!(
                "promote of volume {}: unexpected reply {other:?}",
                self.key
            ))),
            Err(e) => Err(SrError::failed(format!(
                "promote of volume {} refused or failed: {e}",
                self.key
            ))),
        }
    }
}

impl Volume<'_> {
    /// Whether the running blkback says it is a primary.
    fn serves_as_primary(&self) -> bool {
        let Ok(sock) = self.control_socket() else {
            return false;
        };
        matches!(
            Client::<Blkback>::new(sock, START_TIMEOUT).call(&Request::Status),
            Ok(Reply::Status(s)) if matches!(s.node, xenft_control::blkback::NodeStatus::Primary { .. })
        )
    }
}

/// Whether `pid` is a live (not zombie) blkback serving `disk`.
fn alive(pid: i32, disk: &Path) -> bool {
    if pid <= 1 {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = disk.as_os_str().as_encoded_bytes();
    let ours = cmdline.split(|b| *b == 0).any(|a| a == want);
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    });
    ours && !zombie
}

/// The last lines of a log, for an error message.
fn log_tail(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let mut lines = lines;
    lines.reverse();
    format!("{} (log {})", lines.join(" | "), p.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_socket_is_in_the_volume_runtime_directory_and_names_are_checked() {
        let host = HostConfig {
            run_dir: "/run/x".into(),
            ..HostConfig::defaults()
        };
        let d = SrDir::new(&host, "sr-1").unwrap();
        assert_eq!(
            control_socket_of(Path::new("/run/x"), "sr-1", "vol-1").unwrap(),
            d.vol_run("vol-1").unwrap().join("ctl.sock")
        );
        for (sr, key) in [
            ("..", "v"),
            ("sr-1", "../../etc"),
            ("sr/1", "v"),
            ("sr-1", ""),
        ] {
            assert!(
                control_socket_of(Path::new("/run/x"), sr, key).is_err(),
                "{sr:?} {key:?}"
            );
        }
    }
}
