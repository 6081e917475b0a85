//! The checkpoint engine (level 3's memory) in a VM's plan ([`super::components::plan`]):
//! where the VM runs, `xenft-checkpoint primary --control <run_dir>/<vm>/checkpoint.sock`;
//! on its secondary, `xenft-checkpoint secondary --control ...` — over an A-link of the
//! VM's own (its blkback's port slot, `base + 100 + 3 * slot`, plus one), stamping the VM's
//! blkback (`--blkback-control <run_dir>/<vm>/blkback.sock`). The agent drives both through
//! their control sockets ([`crate::drivers::supervised_checkpoints`]).
//!
//! The guest comes from host-local configuration ([`EngineFile`], `xapi.components.checkpoint`
//! in the agent's config): a synthetic guest (the local pool), or the Xen domain — on the
//! primary the VM's running domain (`--xen-domid` from the VM's `domid`); on a Xen secondary
//! the engine would receive into a paused replica domain that the agent cannot build, so the
//! plan names that problem instead of starting anything.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::components::{HostFacts, ProcSpec};
use super::desired::{Desired, VmDesired};

/// The engine's A-link port: the blkback's (`base + 100 + 3 * slot`) plus this.
const ENGINE_PORT_OFFSET: u64 = 101;
/// Longest accepted epoch (ms).
const MAX_EPOCH_MS: u64 = 60_000;
/// Most synthetic guest memory (MiB).
const MAX_MEMORY_MIB: u64 = 1 << 16;
/// Most vCPUs of a Xen domain.
const MAX_VCPUS: u32 = 512;

/// `xapi.components.checkpoint` in the agent's config: the engine of level-3 VMs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineFile {
    /// `xenft-checkpoint` (default: beside the agent's own binary).
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// The guest the engine protects: `{"synthetic": {"binary": .., "memory_mib": ..}}` or
    /// `{"xen": {"vcpus": ..}}`.
    pub guest: GuestFile,
    /// Epoch length (ms, default 25).
    #[serde(default = "default_epoch_ms")]
    pub epoch_ms: u64,
}

fn default_epoch_ms() -> u64 {
    25
}

/// Which guest the engine protects.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestFile {
    /// A synthetic guest (the local pool's stand-in for a VM).
    Synthetic {
        /// `xenft-synthetic-guest` (default: beside the engine's binary).
        #[serde(default)]
        binary: Option<PathBuf>,
        /// Its memory (MiB).
        memory_mib: u64,
    },
    /// The VM's Xen domain.
    Xen {
        /// The domain's vCPU count (default 1).
        #[serde(default = "one")]
        vcpus: u32,
    },
}

fn one() -> u32 {
    1
}

/// The validated engine settings the plan uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineFacts {
    /// `xenft-checkpoint`.
    pub binary: PathBuf,
    /// The guest.
    pub guest: EngineGuest,
    /// Epoch length (ms).
    pub epoch_ms: u64,
}

/// The validated guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineGuest {
    /// A synthetic guest.
    Synthetic {
        /// `xenft-synthetic-guest`.
        binary: PathBuf,
        /// Its memory (MiB).
        memory_mib: u64,
    },
    /// The VM's Xen domain.
    Xen {
        /// vCPUs.
        vcpus: u32,
    },
}

impl EngineFile {
    /// Checks the settings; `beside`: the directory of the agent's binary (default place of
    /// the engine).
    ///
    /// # Errors
    /// The setting at fault, named as in the config file.
    pub fn facts(&self, beside: &Path) -> Result<EngineFacts, String> {
        const AT: &str = "xapi.components.checkpoint";
        let binary = self
            .binary
            .clone()
            .unwrap_or_else(|| beside.join("xenft-checkpoint"));
        if !binary.is_absolute() {
            return Err(format!(
                "{AT}.binary: {} is not an absolute path",
                binary.display()
            ));
        }
        if self.epoch_ms == 0 || self.epoch_ms > MAX_EPOCH_MS {
            return Err(format!(
                "{AT}.epoch_ms: must be 1..={MAX_EPOCH_MS}, not {}",
                self.epoch_ms
            ));
        }
        let guest = match &self.guest {
            GuestFile::Synthetic {
                binary: g,
                memory_mib,
            } => {
                let g = g.clone().unwrap_or_else(|| {
                    binary
                        .parent()
                        .unwrap_or(Path::new("/"))
                        .join("xenft-synthetic-guest")
                });
                if !g.is_absolute() {
                    return Err(format!(
                        "{AT}.guest.synthetic.binary: {} is not an absolute path",
                        g.display()
                    ));
                }
                if *memory_mib == 0 || *memory_mib > MAX_MEMORY_MIB {
                    return Err(format!(
                        "{AT}.guest.synthetic.memory_mib: must be 1..={MAX_MEMORY_MIB}, not \
                         {memory_mib}"
                    ));
                }
                EngineGuest::Synthetic {
                    binary: g,
                    memory_mib: *memory_mib,
                }
            }
            GuestFile::Xen { vcpus } => {
                if *vcpus == 0 || *vcpus > MAX_VCPUS {
                    return Err(format!(
                        "{AT}.guest.xen.vcpus: must be 1..={MAX_VCPUS}, not {vcpus}"
                    ));
                }
                EngineGuest::Xen { vcpus: *vcpus }
            }
        };
        Ok(EngineFacts {
            binary,
            guest,
            epoch_ms: self.epoch_ms,
        })
    }
}

/// `ip:port` with the port moved to the VM's engine slot.
fn engine_addr(addr: &str, slot: u64) -> Option<String> {
    let sa: std::net::SocketAddr = addr.parse().ok()?;
    let port = u64::from(sa.port()) + ENGINE_PORT_OFFSET + 3 * slot;
    let port = u16::try_from(port).ok()?;
    Some(std::net::SocketAddr::new(sa.ip(), port).to_string())
}

/// The engine of level-3 VM `v` on this host (`primary`: the VM runs here; `peer`: the other
/// host's uuid; `slot`: the VM's A-link port slot). `Ok(None)`: not level 3, or no engine
/// configured; `Err`: why the engine cannot run here.
///
/// # Errors
/// The reason, for the plan's problems.
pub fn engine(
    d: &Desired,
    v: &VmDesired,
    primary: bool,
    peer: &str,
    slot: u64,
    f: &HostFacts,
) -> Result<Option<ProcSpec>, String> {
    if v.level < 3 {
        return Ok(None);
    }
    let Some(e) = &f.engine else {
        return Err(
            "level 3 needs the checkpoint engine: no xapi.components.checkpoint in this host's \
             agent config"
                .into(),
        );
    };
    let pool = d.pool.as_ref().ok_or("no xenft.pool: no A-links")?;
    let (Some(mine), Some(theirs)) = (pool.hosts.get(&f.me), pool.hosts.get(peer)) else {
        return Err("a host of the pair has no A-link".into());
    };
    let name = |u: &str| d.hosts.get(u).map_or(u.to_string(), |h| h.name.clone());
    let dir = f.run_dir.join(&v.uuid);
    let s = |p: &Path| p.display().to_string();
    let mut args: Vec<String> = vec![if primary { "primary" } else { "secondary" }.into()];
    match (&e.guest, primary) {
        (EngineGuest::Synthetic { binary, memory_mib }, _) => args.extend([
            "--guest-binary".into(),
            s(binary),
            "--memory-mib".into(),
            memory_mib.to_string(),
        ]),
        (EngineGuest::Xen { vcpus }, true) => {
            let Some(domid) = v.devices.domid else {
                return Err(
                    "the VM runs here but xapi reports no domid: the engine cannot attach to its \
                     domain"
                        .into(),
                );
            };
            args.extend([
                "--xen-domid".into(),
                domid.to_string(),
                "--xen-vcpus".into(),
                vcpus.to_string(),
            ]);
        }
        (EngineGuest::Xen { .. }, false) => {
            return Err(
                "a Xen secondary's engine receives into a paused replica domain (`xl create -p` \
                 of the VM's configuration), which the agent does not build yet: start \
                 `xenft-checkpoint secondary --control` on this host by hand"
                    .into(),
            );
        }
    }
    args.extend([
        "--control".into(),
        s(&dir.join("checkpoint.sock")),
        "--blkback-control".into(),
        s(&dir.join("blkback.sock")),
        if primary {
            "--epoch-ms"
        } else {
            "--protect-epoch-ms"
        }
        .into(),
        e.epoch_ms.to_string(),
        "--host".into(),
        name(&f.me),
        "--peer-host".into(),
        name(peer),
        "--secret-file".into(),
        s(&f.secret_file),
    ]);
    for (a, b) in mine.alinks.iter().zip(&theirs.alinks) {
        let (Some(a), Some(b)) = (engine_addr(a, slot), engine_addr(b, slot)) else {
            return Err(format!(
                "A-link address {a} or {b} unusable for the engine's port"
            ));
        };
        args.extend(["--alink-path".into(), format!("{a}={b}")]);
    }
    if !args.iter().any(|a| a == "--alink-path") {
        return Err("the two hosts share no A-link path".into());
    }
    Ok(Some(ProcSpec {
        vm: v.uuid.clone(),
        name: "checkpoint",
        program: e.binary.clone(),
        args,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xapi::components::{plan, port_slot};

    fn desired(level: u8, domid: Option<u32>) -> Desired {
        let mut d = crate::xapi::components::tests::desired(level, Some("u1"));
        d.vms
            .get_mut("vm-a")
            .expect("the fixture's VM")
            .devices
            .domid = domid;
        d
    }

    fn facts(me: &str, guest: Option<EngineGuest>) -> HostFacts {
        HostFacts {
            engine: guest.map(|guest| EngineFacts {
                binary: "/usr/bin/xenft-checkpoint".into(),
                guest,
                epoch_ms: 25,
            }),
            ..crate::xapi::components::tests::facts(me)
        }
    }

    fn synthetic() -> Option<EngineGuest> {
        Some(EngineGuest::Synthetic {
            binary: "/usr/bin/xenft-synthetic-guest".into(),
            memory_mib: 64,
        })
    }

    fn engine_of(p: &[ProcSpec]) -> Option<&ProcSpec> {
        p.iter().find(|s| s.name == "checkpoint")
    }

    #[test]
    fn a_level_3_vm_runs_the_engine_beside_its_blkback_on_both_hosts_over_its_own_port() {
        let d = desired(3, None);
        let port = 17500 + 101 + 3 * port_slot("vm-a");
        let (p1, problems) = plan(&d, &facts("u1", synthetic()));
        assert!(problems.is_empty(), "{problems:?}");
        let e = engine_of(&p1).expect("the primary's engine");
        assert_eq!(e.program, PathBuf::from("/usr/bin/xenft-checkpoint"));
        let a = &e.args;
        assert_eq!(a[0], "primary");
        for want in [
            "/run/xenft/vm-a/checkpoint.sock",
            "/run/xenft/vm-a/blkback.sock",
            "/usr/bin/xenft-synthetic-guest",
            "--epoch-ms",
            &format!("127.0.0.1:{port}=127.0.0.2:{port}"),
        ] {
            assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
        }
        // The blkback keeps its own port.
        let b = p1.iter().find(|s| s.name == "blkback").unwrap();
        assert!(!b.args.iter().any(|x| x.contains(&format!(":{port}"))));
        let (p2, problems) = plan(&d, &facts("u2", synthetic()));
        assert!(problems.is_empty(), "{problems:?}");
        let a = &engine_of(&p2).expect("the secondary's engine").args;
        assert_eq!(a[0], "secondary");
        assert!(a.iter().any(|x| x == "--protect-epoch-ms"), "{a:?}");
        assert!(
            a.contains(&format!("127.0.0.2:{port}=127.0.0.1:{port}")),
            "{a:?}"
        );
    }

    #[test]
    fn level_2_runs_no_engine_and_level_3_without_one_configured_says_so() {
        let (p, problems) = plan(&desired(2, None), &facts("u1", synthetic()));
        assert!(engine_of(&p).is_none() && problems.is_empty());
        let (p, problems) = plan(&desired(3, None), &facts("u1", None));
        assert!(engine_of(&p).is_none());
        assert!(
            problems["vm-a"].contains("xapi.components.checkpoint"),
            "{problems:?}"
        );
    }

    #[test]
    fn xen_attaches_to_the_vms_domain_and_names_what_it_cannot_build() {
        let xen = || Some(EngineGuest::Xen { vcpus: 2 });
        let (p, problems) = plan(&desired(3, Some(12)), &facts("u1", xen()));
        assert!(problems.is_empty(), "{problems:?}");
        let a = &engine_of(&p).unwrap().args;
        let at = a.iter().position(|x| x == "--xen-domid").unwrap();
        assert_eq!((a[at + 1].as_str(), a[at + 3].as_str()), ("12", "2"));
        let (p, problems) = plan(&desired(3, None), &facts("u1", xen()));
        assert!(engine_of(&p).is_none());
        assert!(problems["vm-a"].contains("domid"), "{problems:?}");
        let (p, problems) = plan(&desired(3, Some(12)), &facts("u2", xen()));
        assert!(engine_of(&p).is_none());
        assert!(problems["vm-a"].contains("paused replica"), "{problems:?}");
        // The blkback still runs there.
        assert!(p.iter().any(|s| s.name == "blkback"));
    }

    #[test]
    fn engine_settings_are_checked_with_the_setting_named() {
        let parse = |j: &str| serde_json::from_str::<EngineFile>(j).unwrap();
        let beside = Path::new("/opt/xenft/bin");
        let f = parse(r#"{"guest":{"synthetic":{"memory_mib":64}}}"#)
            .facts(beside)
            .unwrap();
        assert_eq!(f.binary, PathBuf::from("/opt/xenft/bin/xenft-checkpoint"));
        assert_eq!(
            f.guest,
            EngineGuest::Synthetic {
                binary: "/opt/xenft/bin/xenft-synthetic-guest".into(),
                memory_mib: 64
            }
        );
        assert_eq!(f.epoch_ms, 25);
        for (j, named) in [
            (r#"{"guest":{"xen":{}},"epoch_ms":0}"#, "epoch_ms"),
            (r#"{"guest":{"xen":{"vcpus":0}}}"#, "guest.xen.vcpus"),
            (
                r#"{"guest":{"synthetic":{"memory_mib":0}}}"#,
                "guest.synthetic.memory_mib",
            ),
            (
                r#"{"binary":"bin/ck","guest":{"xen":{}}}"#,
                "checkpoint.binary",
            ),
            (
                r#"{"guest":{"synthetic":{"binary":"g","memory_mib":1}}}"#,
                "guest.synthetic.binary",
            ),
        ] {
            let e = match serde_json::from_str::<EngineFile>(j) {
                Ok(f) => f.facts(beside).unwrap_err(),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(named), "{j}: {e}");
        }
        assert!(serde_json::from_str::<EngineFile>(r#"{"guest":{"kvm":{}}}"#).is_err());
    }
}
