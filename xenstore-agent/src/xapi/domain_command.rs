//! The [`DomainStarter`] seam for hosts whose domains the agent runs itself (upstream Xen with
//! `xl`) while the pool's registry lives in a XenAPI server: `"domains": {"command": {...}}`
//! in the agent's `xapi` section. One host-wide template ([`DomainCommands`]) gives every
//! protected VM its command lines, filled from the registry — no per-VM section in the
//! agent's config.
//!
//! | seam call | what happens |
//! |---|---|
//! | `start` | xapi records the VM on this host (`XapiDomain::record_here`: `VM.power_state_reset` if still recorded on the old host, the roles swapped in `xenft.secondary`, `VM.start_on`), then the `start` command runs as the VM's process (e.g. `xl create -F`, which lives as long as the domain; adopted by a restarted agent through its pid file). One that exits with a failure within 2 s fails the start (the core retries). Retried, it does neither twice |
//! | `pause` / `resume` | the `pause` / `resume` commands (e.g. `xl pause {name}`), bounded; without them SIGSTOP / SIGCONT of the VM's process |
//! | `destroy` | the `destroy` command (e.g. `xl destroy {name}`), then the VM's process is killed |
//! | `resumed` (level 3) | `after_resume`: `"nothing"` (the resumed replica is the domain): xapi records the VM here; `"start"`: as `start` |
//!
//! Placeholders, each replaced by one argument's text (no shell ever sees them): `{vm}` the
//! VM's uuid, `{name}` its name, `{mac}` its first interface's MAC, `{memory_mib}` its
//! memory, `{run}` its runtime directory and `{nbd}` its disk mirror's NBD export
//! (`<run_dir>/<uuid>/nbd.sock`, served by the VM's `xenft-blkback`, `super::components`).
//! Values come from xapi and are checked before use: a name that is empty, too long, has
//! control characters or `/`, or starts with `-` (it would read as an option) starts nothing
//! and says why.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use super::desired::{Desired, VmDesired};
use super::domain::{run_bounded, XapiDomain};
use crate::drivers::domain::{seam, AfterResume, CommandDomain};
use crate::drivers::MAX_COMMAND_ARGS;
use crate::ids::VmId;
use crate::seams::{DomainStarter, SeamError};

/// Longest a `pause`, `resume` or `destroy` command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// A start command that exits with a failure this soon did not start the domain.
const START_CHECK: Duration = Duration::from_secs(2);
/// Longest VM name put into a command.
const MAX_NAME: usize = 128;
/// The placeholders a template may use.
const PLACEHOLDERS: [&str; 6] = ["{vm}", "{name}", "{mac}", "{memory_mib}", "{run}", "{nbd}"];

/// The host-wide domain commands (`xapi.domains.command` in the agent's config).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DomainCommands {
    /// Runs the VM on this host; the process lives as long as the domain (`xl create -F`).
    pub start: Vec<String>,
    /// Pauses the VM's domain (default: SIGSTOP of the `start` process).
    #[serde(default)]
    pub pause: Option<Vec<String>>,
    /// Unpauses it (default: SIGCONT).
    #[serde(default)]
    pub resume: Option<Vec<String>>,
    /// Destroys it (default: the `start` process is killed, nothing else).
    #[serde(default)]
    pub destroy: Option<Vec<String>>,
    /// After a level-3 take-over: `"nothing"` (default, the resumed replica is the domain)
    /// or `"start"` (the `start` command runs beside the resumed memory).
    #[serde(default = "nothing")]
    pub after_resume: AfterResume,
}

fn nothing() -> AfterResume {
    AfterResume::Nothing
}

impl DomainCommands {
    /// Checks the template; `with_run_dir`: the agent runs the VMs' components (so `{run}`
    /// and `{nbd}` name something).
    ///
    /// # Errors
    /// The problem, named.
    pub fn check(&self, with_run_dir: bool) -> Result<(), String> {
        let all = [
            ("start", Some(&self.start)),
            ("pause", self.pause.as_ref()),
            ("resume", self.resume.as_ref()),
            ("destroy", self.destroy.as_ref()),
        ];
        for (what, argv) in all {
            let Some(argv) = argv else { continue };
            if argv.first().is_none_or(String::is_empty) {
                return Err(format!("domains.command.{what} is empty"));
            }
            if argv.len() > MAX_COMMAND_ARGS {
                return Err(format!(
                    "domains.command.{what} has more than {MAX_COMMAND_ARGS} arguments"
                ));
            }
            for a in argv {
                let mut rest = a.clone();
                for p in PLACEHOLDERS {
                    rest = rest.replace(p, "");
                }
                if rest.contains(['{', '}']) {
                    return Err(format!(
                        "domains.command.{what}: {a:?} has an unknown placeholder (known: {})",
                        PLACEHOLDERS.join(" ")
                    ));
                }
                if !with_run_dir && (a.contains("{run}") || a.contains("{nbd}")) {
                    return Err(format!(
                        "domains.command.{what}: {a:?} uses {{run}} or {{nbd}}, which need \
                         xapi.components (the agent runs the VMs' components)"
                    ));
                }
                if a.chars().any(char::is_control) {
                    return Err(format!(
                        "domains.command.{what}: {a:?} has a control character"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Domains run by this agent from the template, recorded in the pool's xapi.
pub struct RegistryCommandDomain {
    commands: DomainCommands,
    run_dir: Option<PathBuf>,
    desired: watch::Receiver<Option<Arc<Desired>>>,
    xapi: XapiDomain,
    procs: CommandDomain,
}

/// A VM name as xapi gave it, if it is safe as one argument.
fn checked_name(name: &str) -> Result<&str, String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!(
            "the VM's name {name:?} must have 1 to {MAX_NAME} bytes to be used in a command"
        ));
    }
    if name.starts_with('-') || name.contains('/') || name.chars().any(char::is_control) {
        return Err(format!(
            "the VM's name {name:?} starts with '-' or holds '/' or a control character: not \
             used in a command"
        ));
    }
    Ok(name)
}

/// A MAC address `xx:xx:xx:xx:xx:xx`.
fn checked_mac(mac: &str) -> Result<&str, String> {
    let ok = mac.len() == 17
        && mac.split(':').count() == 6
        && mac
            .split(':')
            .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
    if ok {
        Ok(mac)
    } else {
        Err(format!("the VM's MAC {mac:?} is not xx:xx:xx:xx:xx:xx"))
    }
}

/// `argv` with the placeholders replaced from `v`.
///
/// # Errors
/// A placeholder whose value is missing or unsafe: why.
pub fn expand(
    argv: &[String],
    v: &VmDesired,
    run_dir: Option<&PathBuf>,
) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(argv.len());
    for a in argv {
        let mut s = a.replace("{vm}", &v.uuid);
        if s.contains("{name}") {
            s = s.replace("{name}", checked_name(&v.name)?);
        }
        if s.contains("{mac}") {
            let vif = v
                .devices
                .vifs
                .first()
                .ok_or("the VM has no network interface for {mac}")?;
            s = s.replace("{mac}", checked_mac(&vif.mac)?);
        }
        s = s.replace("{memory_mib}", &(v.memory_bytes >> 20).to_string());
        if s.contains("{run}") || s.contains("{nbd}") {
            let dir = run_dir
                .ok_or("{run} and {nbd} need the agent's components (xapi.components)")?
                .join(&v.uuid);
            s = s
                .replace("{nbd}", &dir.join("nbd.sock").display().to_string())
                .replace("{run}", &dir.display().to_string());
        }
        out.push(s);
    }
    Ok(out)
}

impl RegistryCommandDomain {
    /// Domains from `commands` for the registry's VMs (`desired`), recorded in xapi through
    /// `xapi`; the VMs' processes' pids in `state_dir` (adopted after an agent restart);
    /// `run_dir`: the components' runtime directories, if the agent runs them.
    #[must_use]
    pub fn new(
        commands: DomainCommands,
        run_dir: Option<PathBuf>,
        desired: watch::Receiver<Option<Arc<Desired>>>,
        xapi: XapiDomain,
        state_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            commands,
            run_dir,
            desired,
            xapi,
            procs: CommandDomain::adopting(state_dir),
        }
    }

    /// `argv` filled for `vm` from the registry.
    fn argv(&self, op: &'static str, vm: &VmId, argv: &[String]) -> Result<Vec<String>, SeamError> {
        let d = self
            .desired
            .borrow()
            .clone()
            .ok_or_else(|| seam(op, vm, &"the registry was never read"))?;
        let v = d
            .vms
            .get(vm.as_str())
            .ok_or_else(|| seam(op, vm, &"no such protected VM in the registry"))?;
        expand(argv, v, self.run_dir.as_ref()).map_err(|e| seam(op, vm, &e))
    }

    /// Runs `args` (a template filled by [`Self::argv`]) for `op`, bounded.
    fn run(op: &'static str, vm: &VmId, args: &[String]) -> Result<(), SeamError> {
        tracing::warn!(%vm, op, command = ?args, "domain command");
        run_bounded(op, vm, args, COMMAND_TIMEOUT)
    }

    /// The configured command for `op`, or the signal to the VM's process.
    fn fence(
        &self,
        op: &'static str,
        vm: &VmId,
        argv: Option<&Vec<String>>,
    ) -> Result<(), SeamError> {
        match argv {
            Some(argv) => Self::run(op, vm, &self.argv(op, vm, argv)?),
            None => self.procs.stop_or_continue(op, vm, op == "pause"),
        }
    }
}

impl DomainStarter for RegistryCommandDomain {
    fn running(&self) -> Vec<VmId> {
        self.procs.running()
    }

    fn start(&self, vm: &VmId) -> Result<(), SeamError> {
        // The command is filled first: bad data from xapi records nothing and starts nothing.
        let argv = self.argv("start", vm, &self.commands.start)?;
        self.xapi.record_here(vm)?;
        if self.procs.spawn(vm, &argv)? {
            // The start command lives as long as the domain: one that fails at once did not
            // start it, and the core retries.
            if let Some(st) = self.procs.exit_within(vm, START_CHECK) {
                if !st.success() {
                    return Err(seam(
                        "start",
                        vm,
                        &format!("the start command {} exited with {st}", argv[0]),
                    ));
                }
            }
            tracing::warn!(%vm, command = ?argv, "VM started here; xapi records it here");
        }
        Ok(())
    }

    fn pause(&self, vm: &VmId) -> Result<(), SeamError> {
        self.fence("pause", vm, self.commands.pause.as_ref())
    }

    fn resume(&self, vm: &VmId) -> Result<(), SeamError> {
        self.fence("resume", vm, self.commands.resume.as_ref())
    }

    fn destroy(&self, vm: &VmId) -> Result<(), SeamError> {
        let result = match &self.commands.destroy {
            Some(argv) => Self::run("destroy", vm, &self.argv("destroy", vm, argv)?),
            None => Ok(()),
        };
        self.procs.destroy(vm)?;
        result
    }

    fn resumed(&self, vm: &VmId) -> Result<(), SeamError> {
        match self.commands.after_resume {
            AfterResume::Nothing => {
                tracing::info!(%vm, "memory resumed here: the replica is the domain; recording it here in xapi");
                self.xapi.record_here(vm).map(drop)
            }
            AfterResume::Start => self.start(vm).map_err(|e| SeamError {
                operation: "resumed",
                ..e
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xapi::devices::{Vif, VmDevices};

    fn vm(name: &str, mac: Option<&str>) -> VmDesired {
        VmDesired {
            uuid: "0b6f-uuid".into(),
            vm_ref: "OpaqueRef:a".into(),
            name: name.into(),
            level: 2,
            secondary: "u2".into(),
            resident_on: Some("u1".into()),
            power_state: "Running".into(),
            memory_bytes: 128 << 20,
            devices: VmDevices {
                vifs: mac
                    .map(|m| Vif {
                        device: 0,
                        mac: m.into(),
                    })
                    .into_iter()
                    .collect(),
                ..VmDevices::default()
            },
        }
    }

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn every_placeholder_is_filled_from_the_registry_as_one_argument() {
        let run = PathBuf::from("/run/xenft");
        let out = expand(
            &argv(&[
                "start-vm",
                "{name}",
                "mac={mac}",
                "{nbd}",
                "{run}/x",
                "{memory_mib}",
                "{vm}",
            ]),
            &vm("web 01", Some("00:16:3e:00:99:11")),
            Some(&run),
        )
        .unwrap();
        assert_eq!(
            out,
            argv(&[
                "start-vm",
                "web 01",
                "mac=00:16:3e:00:99:11",
                "/run/xenft/0b6f-uuid/nbd.sock",
                "/run/xenft/0b6f-uuid/x",
                "128",
                "0b6f-uuid"
            ])
        );
    }

    #[test]
    fn a_hostile_or_missing_value_starts_nothing_and_says_why() {
        let run = PathBuf::from("/run/xenft");
        for (name, why) in [
            ("-x", "starts with '-'"),
            ("../etc", "'/'"),
            ("", "1 to 128 bytes"),
            ("a\nb", "control character"),
        ] {
            let e = expand(
                &argv(&["xl", "destroy", "{name}"]),
                &vm(name, None),
                Some(&run),
            )
            .unwrap_err();
            assert!(e.contains(why), "{name:?}: {e}");
        }
        let e = expand(&argv(&["{mac}"]), &vm("web01", None), Some(&run)).unwrap_err();
        assert!(e.contains("no network interface"), "{e}");
        let e = expand(
            &argv(&["{mac}"]),
            &vm("web01", Some("00:16:3e:zz:00:01")),
            Some(&run),
        )
        .unwrap_err();
        assert!(e.contains("is not xx:xx"), "{e}");
        let e = expand(&argv(&["{nbd}"]), &vm("web01", None), None).unwrap_err();
        assert!(e.contains("xapi.components"), "{e}");
        // A name is never split or re-parsed: spaces stay inside its one argument.
        let ok = expand(&argv(&["{name}"]), &vm("a b;rm -rf", None), None).unwrap();
        assert_eq!(ok, argv(&["a b;rm -rf"]));
    }

    #[test]
    fn the_template_is_checked_before_the_agent_starts() {
        let t = |start: &[&str]| DomainCommands {
            start: argv(start),
            pause: Some(argv(&["xl", "pause", "{name}"])),
            resume: None,
            destroy: None,
            after_resume: AfterResume::Nothing,
        };
        t(&["xl", "create", "-F", "/etc/xen/{name}.cfg"])
            .check(false)
            .unwrap();
        let e = t(&[]).check(true).unwrap_err();
        assert!(e.contains("start is empty"), "{e}");
        let e = t(&["x", "{domid}"]).check(true).unwrap_err();
        assert!(e.contains("unknown placeholder"), "{e}");
        let e = t(&["x", "{nbd}"]).check(false).unwrap_err();
        assert!(e.contains("need"), "{e}");
        t(&["x", "{nbd}"]).check(true).unwrap();
        let mut long = t(&["x"]);
        long.destroy = Some(vec!["a".into(); MAX_COMMAND_ARGS + 1]);
        assert!(long
            .check(true)
            .unwrap_err()
            .contains("destroy has more than"));
    }
}
