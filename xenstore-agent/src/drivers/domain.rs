//! [`CommandDomain`]: the [`DomainStarter`] seam for the local pool — the VM is a process
//! (the synthetic guest, or any configured command) that this agent spawns (`start`), stops
//! with SIGSTOP (`pause`), continues with SIGCONT (`resume`) and kills (`destroy`).
//!
//! Like a real domain, the process outlives the agent: with a state directory each started
//! VM's pid and kernel start time are recorded (`<dir>/<vm>.pid`), and a restarted agent adopts
//! the processes still alive (`running`), so it neither loses nor duplicates them. The start
//! time guards against a recycled pid.
//!
//! After a level-3 take-over (`resumed`) what to do depends on what the command is, so each
//! VM says it ([`AfterResume`]): in the local pool the VM is a process beside the synthetic
//! guest whose memory the checkpoint engine resumed, and it is started (unless it runs); on an
//! xl host the command is the toolstack's and the resumed replica already is the domain, so
//! nothing is started (starting it would build a second domain of the VM).
//!
//! On xapi hosts the seam is XenAPI instead (`crate::xapi::domain`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::ids::VmId;
use crate::seams::{DomainStarter, SeamError};

/// A VM process: spawned by this agent instance, or adopted from a previous one.
#[derive(Debug)]
struct VmProc {
    pid: i32,
    start_time: u64,
    child: Option<Child>,
}

impl VmProc {
    fn alive(&mut self) -> bool {
        if let Some(c) = &mut self.child {
            return matches!(c.try_wait(), Ok(None));
        }
        proc_start_time(self.pid) == Some(self.start_time)
    }
}

/// The kernel start time of `pid` (field 22 of `/proc/<pid>/stat`), if it exists.
fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What `resumed` does for a VM after a level-3 take-over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterResume {
    /// Start the VM's command unless its process runs here (the local pool: the VM is a
    /// process beside the resumed memory replica).
    Start,
    /// Nothing to start: the resumed replica is the domain (xl hosts).
    Nothing,
}

/// Starts, pauses, resumes and kills each VM's configured command.
#[derive(Debug, Default)]
pub struct CommandDomain {
    commands: BTreeMap<VmId, Vec<String>>,
    after_resume: BTreeMap<VmId, AfterResume>,
    state_dir: Option<PathBuf>,
    procs: Mutex<BTreeMap<VmId, VmProc>>,
}

/// A failed domain operation, with why.
pub(crate) fn seam(op: &'static str, vm: &VmId, e: &dyn std::fmt::Display) -> SeamError {
    SeamError {
        component: "domain",
        operation: op,
        vm: vm.clone(),
        reason: e.to_string(),
    }
}

impl CommandDomain {
    /// One command line (program and arguments) per VM; with `state_dir`, pids are recorded
    /// there and live processes of a previous agent are adopted.
    #[must_use]
    pub fn new(commands: BTreeMap<VmId, Vec<String>>, state_dir: Option<PathBuf>) -> Self {
        let mut procs = BTreeMap::new();
        if let Some(dir) = &state_dir {
            for vm in commands.keys() {
                if let Some(p) = Self::read_pid_file(&dir.join(format!("{vm}.pid"))) {
                    tracing::info!(%vm, pid = p.pid, "adopted the VM process of a previous agent");
                    procs.insert(vm.clone(), p);
                }
            }
        }
        Self {
            commands,
            after_resume: BTreeMap::new(),
            state_dir,
            procs: Mutex::new(procs),
        }
    }

    /// No configured commands: each VM's command line is given when it starts
    /// ([`Self::spawn`], the registry's VMs through a host-wide template,
    /// `crate::xapi::domain_command`). With `state_dir`, every live process recorded there by
    /// a previous agent is adopted.
    #[must_use]
    pub fn adopting(state_dir: Option<PathBuf>) -> Self {
        let mut procs = BTreeMap::new();
        if let Some(dir) = &state_dir {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = entry.file_name();
                let Some(vm) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".pid"))
                    .and_then(|n| VmId::new(n).ok())
                else {
                    continue;
                };
                if let Some(p) = Self::read_pid_file(&entry.path()) {
                    tracing::info!(%vm, pid = p.pid, "adopted the VM process of a previous agent");
                    procs.insert(vm, p);
                }
            }
        }
        Self {
            commands: BTreeMap::new(),
            after_resume: BTreeMap::new(),
            state_dir,
            procs: Mutex::new(procs),
        }
    }

    /// Starts `argv` as the VM's process unless one runs; returns whether it started one.
    ///
    /// # Errors
    /// The command is empty or cannot be spawned.
    pub fn spawn(&self, vm: &VmId, argv: &[String]) -> Result<bool, SeamError> {
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| seam("start", vm, &"empty command"))?;
        let mut procs = self.procs();
        if procs.get_mut(vm).is_some_and(VmProc::alive) {
            return Ok(false);
        }
        let child = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| seam("start", vm, &format!("{prog}: {e}")))?;
        let pid = i32::try_from(child.id()).map_err(|_| seam("start", vm, &"pid out of range"))?;
        let start_time = proc_start_time(pid).unwrap_or(0);
        if let Some(f) = self.pid_file(vm) {
            if let Err(e) = std::fs::write(&f, format!("{pid} {start_time}\n")) {
                tracing::warn!(%vm, file = %f.display(), error = %e, "cannot record the VM's pid");
            }
        }
        tracing::info!(%vm, pid, %prog, "VM process started");
        procs.insert(
            vm.clone(),
            VmProc {
                pid,
                start_time,
                child: Some(child),
            },
        );
        Ok(true)
    }

    /// Waits at most `within` for the VM's process (started by this agent) to exit; its exit
    /// status if it did. A start command that fails at once (a missing disk export, a bad
    /// config) is told apart from one that runs the domain.
    #[must_use]
    pub fn exit_within(
        &self,
        vm: &VmId,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            {
                let mut procs = self.procs();
                let child = procs.get_mut(vm)?.child.as_mut()?;
                if let Ok(Some(st)) = child.try_wait() {
                    procs.remove(vm);
                    if let Some(f) = self.pid_file(vm) {
                        let _ = std::fs::remove_file(f);
                    }
                    return Some(st);
                }
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Whether the VM's process runs.
    #[must_use]
    pub fn is_running(&self, vm: &VmId) -> bool {
        let mut procs = self.procs();
        let alive = procs.get_mut(vm).is_some_and(VmProc::alive);
        if !alive {
            procs.remove(vm);
        }
        alive
    }

    /// SIGSTOP (`pause`) or SIGCONT (`resume`) to the VM's live process.
    ///
    /// # Errors
    /// No live process of the VM, or the signal failed.
    pub fn stop_or_continue(
        &self,
        op: &'static str,
        vm: &VmId,
        stop: bool,
    ) -> Result<(), SeamError> {
        self.signal(
            op,
            vm,
            if stop {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            },
        )
    }

    /// What `resumed` does for each VM after a level-3 take-over; a VM left out fails its
    /// level-3 take-over with that reason (the config requires the choice at level 3).
    #[must_use]
    pub fn with_after_resume(mut self, after_resume: BTreeMap<VmId, AfterResume>) -> Self {
        self.after_resume = after_resume;
        self
    }

    /// A live process recorded in `path` (pid and start time), or `None`.
    fn read_pid_file(path: &Path) -> Option<VmProc> {
        let meta = std::fs::metadata(path).ok()?;
        if meta.len() > 64 {
            return None;
        }
        let text = std::fs::read_to_string(path).ok()?;
        let mut w = text.split_whitespace();
        let pid: i32 = w.next()?.parse().ok()?;
        let start_time: u64 = w.next()?.parse().ok()?;
        let mut p = VmProc {
            pid,
            start_time,
            child: None,
        };
        (pid > 1 && p.alive()).then_some(p)
    }

    fn pid_file(&self, vm: &VmId) -> Option<PathBuf> {
        self.state_dir.as_ref().map(|d| d.join(format!("{vm}.pid")))
    }

    fn procs(&self) -> std::sync::MutexGuard<'_, BTreeMap<VmId, VmProc>> {
        self.procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `sig` to the VM's live process.
    fn signal(&self, op: &'static str, vm: &VmId, sig: Signal) -> Result<(), SeamError> {
        let mut procs = self.procs();
        let p = procs
            .get_mut(vm)
            .ok_or_else(|| seam(op, vm, &"not started by this agent"))?;
        if !p.alive() {
            procs.remove(vm);
            return Err(seam(op, vm, &"the VM's process exited"));
        }
        kill(Pid::from_raw(p.pid), sig).map_err(|e| seam(op, vm, &e))
    }
}

impl DomainStarter for CommandDomain {
    fn running(&self) -> Vec<VmId> {
        let mut procs = self.procs();
        procs.retain(|_, p| p.alive());
        procs.keys().cloned().collect()
    }

    fn start(&self, vm: &VmId) -> Result<(), SeamError> {
        let argv = self
            .commands
            .get(vm)
            .ok_or_else(|| seam("start", vm, &"no command configured"))?;
        self.spawn(vm, argv).map(drop)
    }

    fn pause(&self, vm: &VmId) -> Result<(), SeamError> {
        self.signal("pause", vm, Signal::SIGSTOP)
    }

    fn resume(&self, vm: &VmId) -> Result<(), SeamError> {
        self.signal("resume", vm, Signal::SIGCONT)
    }

    fn resumed(&self, vm: &VmId) -> Result<(), SeamError> {
        match self.after_resume.get(vm) {
            Some(AfterResume::Start) => {
                tracing::warn!(%vm, "memory resumed here: starting the VM's process");
                self.start(vm).map_err(|e| SeamError {
                    operation: "resumed",
                    ..e
                })
            }
            Some(AfterResume::Nothing) => {
                tracing::info!(%vm, "memory resumed here: the resumed replica is the domain");
                Ok(())
            }
            None => Err(seam(
                "resumed",
                vm,
                &"no after_resume configured: cannot tell whether the resumed replica is the \
                  domain or the VM's process must be started",
            )),
        }
    }

    fn destroy(&self, vm: &VmId) -> Result<(), SeamError> {
        let Some(mut p) = self.procs().remove(vm) else {
            return Ok(());
        };
        if p.alive() {
            let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
        }
        if let Some(mut c) = p.child.take() {
            let _ = c.wait();
        }
        if let Some(f) = self.pid_file(vm) {
            let _ = std::fs::remove_file(f);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmId {
        VmId::new("vm1").unwrap()
    }

    fn sleeper(dir: Option<PathBuf>) -> CommandDomain {
        CommandDomain::new(
            BTreeMap::from([(vm(), vec!["sleep".to_string(), "30".to_string()])]),
            dir,
        )
    }

    #[test]
    fn a_started_command_runs_pauses_resumes_and_dies() {
        let d = sleeper(None);
        d.start(&vm()).unwrap();
        assert_eq!(d.running(), vec![vm()]);
        d.pause(&vm()).unwrap();
        d.resume(&vm()).unwrap();
        d.destroy(&vm()).unwrap();
        assert!(d.running().is_empty());
        assert!(d.pause(&vm()).is_err());
    }

    #[test]
    fn a_restarted_agent_adopts_the_running_vm_instead_of_starting_another() {
        let dir = tempfile::tempdir().unwrap();
        let first = sleeper(Some(dir.path().to_path_buf()));
        first.start(&vm()).unwrap();
        drop(first); // the agent dies; the VM process lives on
        let second = sleeper(Some(dir.path().to_path_buf()));
        assert_eq!(second.running(), vec![vm()]);
        second.pause(&vm()).unwrap();
        second.destroy(&vm()).unwrap();
        assert!(second.running().is_empty());
        assert!(sleeper(Some(dir.path().to_path_buf())).running().is_empty());
    }

    #[test]
    fn a_recycled_or_garbage_pid_file_is_not_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let own = std::process::id();
        std::fs::write(dir.path().join("vm1.pid"), format!("{own} 1\n")).unwrap();
        assert!(sleeper(Some(dir.path().to_path_buf())).running().is_empty());
        std::fs::write(dir.path().join("vm1.pid"), "not a pid").unwrap();
        assert!(sleeper(Some(dir.path().to_path_buf())).running().is_empty());
    }

    #[test]
    fn after_a_level3_resume_the_vm_process_is_started_once_or_left_to_the_replica() {
        let start = sleeper(None).with_after_resume(BTreeMap::from([(vm(), AfterResume::Start)]));
        start.resumed(&vm()).unwrap();
        assert_eq!(start.running(), vec![vm()]);
        let pid = start.procs().get(&vm()).map(|p| p.pid);
        start.resumed(&vm()).unwrap(); // already running: not started twice
        assert_eq!(start.procs().get(&vm()).map(|p| p.pid), pid);
        start.pause(&vm()).unwrap(); // the seam owns the copy it started
        start.destroy(&vm()).unwrap();

        let replica =
            sleeper(None).with_after_resume(BTreeMap::from([(vm(), AfterResume::Nothing)]));
        replica.resumed(&vm()).unwrap();
        assert!(replica.running().is_empty(), "the replica is the domain");

        let e = sleeper(None).resumed(&vm()).unwrap_err();
        assert!(e.reason.contains("after_resume"), "{e}");
    }

    #[test]
    fn a_missing_program_is_a_start_error() {
        let d = CommandDomain::new(
            BTreeMap::from([(vm(), vec!["/nonexistent/guest".to_string()])]),
            None,
        );
        let e = d.start(&vm()).unwrap_err();
        assert!(e.reason.contains("/nonexistent/guest"), "{e}");
    }
}
