//! The local pool's stand-in for xenopsd (`xenft-lab hypervisor`), one per host: it makes
//! xapi's record of the VMs true on this host, as xenopsd does on a XenServer / XCP-ng host.
//! A VM xapi records as resident here and `Running` runs here (its process, [`super::vm`],
//! in the VM's namespace); `Paused` is SIGSTOPped; anything else (halted, resident
//! elsewhere, deleted) is killed. So the agents drive the VM only through XenAPI
//! (`VM.start_on`, `VM.pause`, `VM.hard_shutdown`, the production
//! `xenft_agent::xapi::domain::XapiDomain`), exactly as on a real pool.
//!
//! It reads xapi's VM and host records every [`POLL`]; while xapi is unreachable the VMs
//! keep doing what they did (domains outlive their toolstack).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::topology::Host;
use crate::LabError;

/// How often xapi's records are read.
pub const POLL: Duration = Duration::from_millis(100);

/// A hypervisor stand-in's settings.
#[derive(Debug, Clone)]
pub struct HypervisorConfig {
    /// The host it runs on.
    pub host: Host,
    /// The pool's xapi.
    pub url: String,
    /// User on the first line, password on the second.
    pub credential_file: PathBuf,
    /// The agent's per-VM runtime directories (the VM's disk: `<run_dir>/<uuid>/nbd.sock`).
    pub run_dir: PathBuf,
    /// `xenft-lab` (runs the VM process).
    pub exe: PathBuf,
    /// The lab's state directory (the VM processes' logs and status files).
    pub log_dir: PathBuf,
}

/// One VM process.
struct Proc {
    child: Child,
    stopped: bool,
}

/// What xapi says about one VM for this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Runs here.
    Running,
    /// Runs here, paused.
    Paused,
    /// Does not run here.
    Absent,
}

/// What xapi's record says for this host (`me`: this host's ref).
#[must_use]
pub fn wanted(rec: &xenft_xapi::api::VmRecord, me: &str) -> Wanted {
    if !rec.is_guest() || rec.resident_on != me {
        return Wanted::Absent;
    }
    match rec.power_state.as_str() {
        "Running" => Wanted::Running,
        "Paused" => Wanted::Paused,
        _ => Wanted::Absent,
    }
}

/// Runs the stand-in until killed.
///
/// # Errors
/// Bad settings (URL, credential file); xapi being unreachable is not an error.
pub fn run(cfg: &HypervisorConfig) -> Result<(), LabError> {
    let api = super::connect(&cfg.url, &cfg.credential_file, Duration::from_secs(3))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LabError::component("hypervisor runtime", e))?;
    let mut procs: BTreeMap<String, Proc> = BTreeMap::new();
    let mut me: Option<String> = None;
    let mut complained = false;
    let mut exited = BTreeMap::new();
    loop {
        std::thread::sleep(POLL);
        reap(&mut procs, &mut exited);
        let read = rt.block_on(async {
            if me.is_none() {
                let hosts = api.host_get_all_records().await?;
                me = hosts
                    .into_iter()
                    .find(|(_, h)| h.name_label == cfg.host.name())
                    .map(|(r, _)| r);
            }
            api.vm_get_all_records().await
        });
        let vms = match read {
            Ok(v) => {
                complained = false;
                v
            }
            Err(e) => {
                if !complained {
                    tracing::warn!(error = %e, "xapi unreachable: the VMs keep running as they are");
                    complained = true;
                }
                continue;
            }
        };
        let Some(me) = me.as_deref() else {
            tracing::warn!(host = cfg.host.name(), "xapi has no such host");
            continue;
        };
        let mut seen = std::collections::BTreeSet::new();
        for rec in vms.values() {
            seen.insert(rec.uuid.clone());
            if exited.contains_key(&rec.uuid) {
                continue;
            }
            apply(cfg, &mut procs, &rec.uuid, &rec.name_label, wanted(rec, me));
        }
        let gone: Vec<String> = procs
            .keys()
            .filter(|u| !seen.contains(*u))
            .cloned()
            .collect();
        for uuid in gone {
            apply(cfg, &mut procs, &uuid, "(deleted)", Wanted::Absent);
        }
    }
}

/// How long a VM whose process exited stays down before it is started again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Forgets VM processes that exited (started again after [`RESTART_DELAY`] if xapi still
/// wants them), noting when in `exited`.
fn reap(procs: &mut BTreeMap<String, Proc>, exited: &mut BTreeMap<String, std::time::Instant>) {
    procs.retain(|uuid, p| match p.child.try_wait() {
        Ok(None) => true,
        Ok(Some(st)) => {
            tracing::warn!(vm = %uuid, status = %st, "VM process exited");
            exited.insert(uuid.clone(), std::time::Instant::now());
            false
        }
        Err(_) => false,
    });
    exited.retain(|_, at| at.elapsed() < RESTART_DELAY);
}

fn signal(p: &Proc, s: Signal) {
    if let Ok(pid) = i32::try_from(p.child.id()) {
        let _ = kill(Pid::from_raw(pid), s);
    }
}

fn apply(
    cfg: &HypervisorConfig,
    procs: &mut BTreeMap<String, Proc>,
    uuid: &str,
    name: &str,
    want: Wanted,
) {
    match (want, procs.get_mut(uuid)) {
        (Wanted::Absent, Some(_)) => {
            if let Some(mut p) = procs.remove(uuid) {
                let _ = p.child.kill();
                let _ = p.child.wait();
                tracing::info!(vm = %uuid, name, "VM destroyed here (xapi: not running here)");
            }
        }
        (Wanted::Running | Wanted::Paused, None) => match start(cfg, uuid, name) {
            Ok(child) => {
                tracing::info!(vm = %uuid, name, pid = child.id(), "VM started here");
                procs.insert(
                    uuid.to_string(),
                    Proc {
                        child,
                        stopped: false,
                    },
                );
            }
            Err(e) => tracing::warn!(vm = %uuid, error = %e, "the VM could not start"),
        },
        (Wanted::Paused, Some(p)) if !p.stopped => {
            signal(p, Signal::SIGSTOP);
            p.stopped = true;
            tracing::info!(vm = %uuid, name, "VM paused");
        }
        // A VM paused without xapi (the host-local fence) runs again when xapi says so.
        (Wanted::Running, Some(p))
            if p.stopped || super::status::proc_state(p.child.id()) == Some(true) =>
        {
            signal(p, Signal::SIGCONT);
            p.stopped = false;
            tracing::info!(vm = %uuid, name, "VM unpaused");
        }
        _ => {}
    }
}

fn start(cfg: &HypervisorConfig, uuid: &str, name: &str) -> Result<Child, LabError> {
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let log_name = format!("{}.vm-{safe}.log", cfg.host.name());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.log_dir.join(&log_name))
        .map_err(|source| LabError::Io {
            path: cfg.log_dir.join(&log_name),
            source,
        })?;
    let nbd = cfg.run_dir.join(uuid).join("nbd.sock");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", cfg.host.vm_netns()])
        .arg(&cfg.exe)
        .arg("--dir")
        .arg(&cfg.log_dir)
        .args(["vm", "--host", cfg.host.name(), "--nbd"])
        .arg(&nbd);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    crate::spawn_logged(&mut cmd, log).map_err(|source| LabError::Spawn {
        cmd: format!("{} vm", cfg.exe.display()),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenft_xapi::api::VmRecord;

    fn vm(state: &str, on: &str) -> VmRecord {
        VmRecord {
            uuid: "u".into(),
            power_state: state.into(),
            resident_on: on.into(),
            ..VmRecord::default()
        }
    }

    #[test]
    fn only_a_guest_recorded_here_runs_here() {
        for (state, on, want) in [
            ("Running", "OpaqueRef:h1", Wanted::Running),
            ("Paused", "OpaqueRef:h1", Wanted::Paused),
            ("Running", "OpaqueRef:h2", Wanted::Absent),
            ("Halted", "OpaqueRef:NULL", Wanted::Absent),
        ] {
            assert_eq!(
                wanted(&vm(state, on), "OpaqueRef:h1"),
                want,
                "{state} on {on}"
            );
        }
        let mut dom0 = vm("Running", "OpaqueRef:h1");
        dom0.is_control_domain = true;
        assert_eq!(wanted(&dom0, "OpaqueRef:h1"), Wanted::Absent);
    }
}
