//! VMs whose disk the xenft SR mirrors: no blkback of the agent's own (the plan leaves it out,
//! [`super::components::plan`]), and the agent's disk seam drives the SR volume's blkback.
//!
//! The xenft SR (crate `xenft-sr`) runs one `xenft-blkback` per volume on each host of its
//! pair, its control socket at `<SR run_dir>/<sr uuid>/<volume key>/ctl.sock`
//! ([`xenft_sr::blkback::control_socket_of`]); the one where xapi activated the volume (where
//! the VM runs) is the primary, the other holds the copy. The agent's disk seam finds a VM's
//! blkback at `<run_dir>/<vm>/blkback.sock` (`crate::drivers::supervised_disks`), and so does a
//! level-3 checkpoint engine (`--blkback-control`): for an SR-backed VM that path is made a
//! symbolic link to the volume's control socket ([`apply`]), so the seam's sync wait, remote
//! mode and take-over promotion reach the SR's blkback through the same control contract. A
//! promotion by the agent on take-over is then found done by the SR's `Datapath.activate`
//! when xapi restarts the VM on this host (the SR accepts a blkback already promoted).
//!
//! The volume is the one of the VM's boot disk (the disk the agent's seam drives, as it
//! mirrors one disk per VM); the SR mirrors every volume of the VM alike, and xapi's
//! activation promotes each where the VM starts.

use std::path::{Path, PathBuf};

use super::components::HostFacts;
use super::desired::{Desired, VmDesired};
use super::devices::SrVolume;

/// The seam's socket name in a VM's runtime directory.
pub const SEAM_SOCKET: &str = "blkback.sock";

/// The xenft SR's `run_dir` on this host, from its host configuration (`XENFT_SR_CONFIG` or
/// `/etc/xenft/sr.json`, read as the SR plugin reads it); the SR's default when the file is
/// missing, and — logged — when it cannot be read.
#[must_use]
pub fn sr_run_dir() -> PathBuf {
    match xenft_sr::config::HostConfig::load() {
        Ok(h) => h.run_dir,
        Err(e) => {
            tracing::warn!(error = %e, "the xenft SR's host configuration: using its defaults");
            xenft_sr::config::HostConfig::defaults().run_dir
        }
    }
}

/// The xenft SR volume of `v`'s disk, if the SR holds it.
#[must_use]
pub fn volume(v: &VmDesired) -> Option<&SrVolume> {
    v.devices.disk.as_ref().and_then(|k| k.xenft.as_ref())
}

/// One seam socket to link: `<run_dir>/<vm>/blkback.sock` → the volume's control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The VM (uuid).
    pub vm: String,
    /// The SR volume's blkback control socket.
    pub target: PathBuf,
}

/// The links this host needs: each level-2/3 VM it runs or holds the copy of whose disk is on
/// the xenft SR.
#[must_use]
pub fn links(d: &Desired, f: &HostFacts) -> Vec<Link> {
    d.vms
        .values()
        .filter(|v| v.level >= 2 && d.role(&v.uuid, &f.me).is_some())
        .filter_map(|v| {
            let vol = volume(v)?;
            match xenft_sr::blkback::control_socket_of(&f.sr_run_dir, &vol.sr, &vol.key) {
                Ok(target) => Some(Link {
                    vm: v.uuid.clone(),
                    target,
                }),
                Err(e) => {
                    tracing::warn!(vm = %v.uuid, error = %e, "SR volume unusable");
                    None
                }
            }
        })
        .collect()
}

/// What [`apply`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    /// The VM's seam socket now leads to its SR volume's blkback.
    Linked {
        /// The VM.
        vm: String,
        /// The control socket.
        target: PathBuf,
    },
    /// A link no longer wanted was removed.
    Unlinked {
        /// The VM.
        vm: String,
    },
}

/// Makes `<run_dir>/<vm>/blkback.sock` a link to each wanted target, and removes the links (only
/// links: never a socket of a blkback the agent runs) of VMs no longer SR-backed here. A real
/// socket left at the path is replaced only when `own_blkback(vm)` says no blkback of the
/// agent's serves it (a stale one, left by the agent's own mirror before the disk moved to the
/// SR).
///
/// # Errors
/// The first file-system error (the rest is still done).
pub fn apply(
    run_dir: &Path,
    wanted: &[Link],
    own_blkback: impl Fn(&str) -> bool,
) -> (Vec<LinkChange>, Result<(), String>) {
    fn keep_first(result: &mut Result<(), String>, e: String) {
        if result.is_ok() {
            *result = Err(e);
        }
    }
    let mut changes = Vec::new();
    let mut result = Ok(());
    for l in wanted {
        let dir = run_dir.join(&l.vm);
        let path = dir.join(SEAM_SOCKET);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if std::fs::read_link(&path).is_ok_and(|t| t == l.target) {
                    continue;
                }
            }
            Ok(_) if own_blkback(&l.vm) => continue,
            Ok(_) | Err(_) => {}
        }
        let made = std::fs::create_dir_all(&dir)
            .and_then(|()| match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            })
            .and_then(|()| std::os::unix::fs::symlink(&l.target, &path));
        match made {
            Ok(()) => changes.push(LinkChange::Linked {
                vm: l.vm.clone(),
                target: l.target.clone(),
            }),
            Err(e) => keep_first(&mut result, format!("{}: {e}", path.display())),
        }
    }
    let Ok(rd) = std::fs::read_dir(run_dir) else {
        return (changes, result);
    };
    for e in rd.filter_map(Result::ok) {
        let Ok(vm) = e.file_name().into_string() else {
            continue;
        };
        if wanted.iter().any(|l| l.vm == vm) {
            continue;
        }
        let path = e.path().join(SEAM_SOCKET);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            match std::fs::remove_file(&path) {
                Ok(()) => changes.push(LinkChange::Unlinked { vm }),
                Err(e) => keep_first(&mut result, format!("{}: {e}", path.display())),
            }
        }
    }
    (changes, result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xapi::components::plan;
    use crate::xapi::components::tests::desired;
    use crate::xapi::devices::Disk;

    fn facts(me: &str) -> HostFacts {
        HostFacts {
            relay: Some(crate::xapi::relay_plan::RelayFacts {
                netback: "/usr/bin/xenft-netback".into(),
                uplink: "eth0".into(),
                vif_name: crate::xapi::relay_plan::DEFAULT_VIF_NAME.into(),
            }),
            ..crate::xapi::components::tests::facts(me)
        }
    }

    /// web01 at `level` running on u1, its disk 0 on the xenft SR as volume `vol-7` (and
    /// disk 1 elsewhere when `also_off_sr`), with a vif.
    fn on_sr(level: u8, also_off_sr: bool) -> Desired {
        let mut d = desired(level, Some("u1"));
        let v = d.vms.get_mut("vm-a").unwrap();
        v.devices.domid = Some(5);
        v.devices.vifs = vec![crate::xapi::devices::Vif {
            device: 0,
            mac: "aa:bb:cc:00:00:01".into(),
        }];
        v.devices.disk = Some(Disk {
            userdevice: 0,
            vdi: "vdi-0".into(),
            size: 1 << 30,
            xenft: Some(SrVolume {
                sr: "sr-x".into(),
                key: "vol-7".into(),
            }),
        });
        if also_off_sr {
            v.devices.other_disks = vec![1];
            v.devices.off_xenft_sr = vec![1];
        }
        d
    }

    #[test]
    fn a_vm_on_the_xenft_sr_gets_no_blkback_of_ours_but_keeps_its_relay() {
        for me in ["u1", "u2"] {
            let (p, problems) = plan(&on_sr(2, false), &facts(me));
            let names: Vec<_> = p.iter().map(|s| s.name).collect();
            assert_eq!(names, vec!["netback"], "{me}: {p:?}");
            assert!(problems.is_empty(), "{problems:?}");
        }
        // The same VM with its disk elsewhere: the agent mirrors it itself.
        let mut d = on_sr(2, false);
        d.vms
            .get_mut("vm-a")
            .unwrap()
            .devices
            .disk
            .as_mut()
            .unwrap()
            .xenft = None;
        let (p, _) = plan(&d, &facts("u1"));
        assert_eq!(p[0].name, "blkback");
        // A second disk off the SR is said to be unmirrored.
        let (p, problems) = plan(&on_sr(2, true), &facts("u1"));
        assert!(p.iter().all(|s| s.name != "blkback"));
        assert!(
            problems["vm-a"].contains("[1] are not on the xenft SR"),
            "{problems:?}"
        );
    }

    #[test]
    fn both_hosts_link_the_seam_to_the_volume_and_others_do_not() {
        let want = vec![Link {
            vm: "vm-a".into(),
            target: "/run/xenft/sr/sr-x/vol-7/ctl.sock".into(),
        }];
        assert_eq!(links(&on_sr(2, false), &facts("u1")), want);
        assert_eq!(links(&on_sr(3, false), &facts("u2")), want);
        assert!(links(&on_sr(1, false), &facts("u1")).is_empty(), "level 1");
        assert!(
            links(&on_sr(2, false), &facts("u3")).is_empty(),
            "a third host"
        );
    }

    #[test]
    fn links_are_made_replaced_and_removed_and_a_running_blkbacks_socket_is_kept() {
        let run = tempfile::tempdir().unwrap();
        let link = |vm: &str, t: &str| Link {
            vm: vm.into(),
            target: t.into(),
        };
        let seam = |vm: &str| run.path().join(vm).join(SEAM_SOCKET);
        let (ch, r) = apply(run.path(), &[link("a", "/sr/1/ctl.sock")], |_| false);
        r.unwrap();
        assert_eq!(ch.len(), 1);
        assert_eq!(
            std::fs::read_link(seam("a")).unwrap(),
            Path::new("/sr/1/ctl.sock")
        );
        // Unchanged: nothing to do. Another volume: replaced.
        assert!(apply(run.path(), &[link("a", "/sr/1/ctl.sock")], |_| false)
            .0
            .is_empty());
        apply(run.path(), &[link("a", "/sr/2/ctl.sock")], |_| false)
            .1
            .unwrap();
        assert_eq!(
            std::fs::read_link(seam("a")).unwrap(),
            Path::new("/sr/2/ctl.sock")
        );
        // A real socket file of VM b: kept while the agent's own blkback runs, replaced after.
        std::fs::create_dir_all(run.path().join("b")).unwrap();
        std::fs::write(seam("b"), "").unwrap();
        let (ch, _) = apply(run.path(), &[link("b", "/sr/3/ctl.sock")], |vm| vm == "b");
        assert!(
            ch.iter()
                .all(|c| !matches!(c, LinkChange::Linked { vm, .. } if vm == "b")),
            "{ch:?}"
        );
        assert!(!std::fs::symlink_metadata(seam("b")).unwrap().is_symlink());
        assert_eq!(
            ch,
            vec![LinkChange::Unlinked { vm: "a".into() }],
            "a is no longer wanted"
        );
        assert!(std::fs::symlink_metadata(seam("a")).is_err());
        apply(run.path(), &[link("b", "/sr/3/ctl.sock")], |_| false)
            .1
            .unwrap();
        assert_eq!(
            std::fs::read_link(seam("b")).unwrap(),
            Path::new("/sr/3/ctl.sock")
        );
        // Nothing wanted: only links go; a real file stays.
        std::fs::create_dir_all(run.path().join("c")).unwrap();
        std::fs::write(seam("c"), "").unwrap();
        apply(run.path(), &[], |_| false).1.unwrap();
        assert!(std::fs::symlink_metadata(seam("b")).is_err());
        assert!(seam("c").exists());
    }
}
