//! The relay of a protected VM (level 2 or 3) in the component plan: one `xenft-netback` per
//! VM on each of its two hosts, between the VM's first network interface and this host's
//! uplink — pass-through where the VM runs, standby (holding the VM's network presence for a
//! take-over) where its copy is — with its control socket `<run_dir>/<vm uuid>/netback.sock`
//! and an A-link of its own (the VM's port slot, `+2`) for the uplink redirect.
//!
//! The vif's name on the host comes from a template ([`RelayFile::vif_name`], default
//! `vif{domid}.{device}`, as xenopsd and xl name backend interfaces). Where the VM does not
//! run, its domid is unknown: the standby relay is given a name no interface has
//! (`xfsb<slot>`); when the VM starts here the plan changes and the supervisor restarts the
//! relay, pass-through, on the real name. A template without `{domid}` (xl's `vifname=`, the
//! local pool's `vif0`) names the same interface on both hosts.
//!
//! Only the VM's first interface (lowest device number) is relayed today; further ones are
//! reported in the VM's problems.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::components::ProcSpec;
use super::desired::VmDesired;

/// Default of [`RelayFile::vif_name`].
pub const DEFAULT_VIF_NAME: &str = "vif{domid}.{device}";

/// The relay's host-local settings (`xapi.components.relay` in the agent's config).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    /// `xenft-netback` (default: beside the agent's own binary).
    #[serde(default)]
    pub netback: Option<PathBuf>,
    /// The uplink interface the VM's traffic leaves on (e.g. `eth0`).
    pub uplink: String,
    /// The vif's name on the host, `{domid}` and `{device}` replaced.
    #[serde(default = "default_vif_name")]
    pub vif_name: String,
}

fn default_vif_name() -> String {
    DEFAULT_VIF_NAME.into()
}

/// Linux interface names: 1 to 15 bytes, no `/`, no whitespace, no `:`.
fn check_ifname(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "{what} {name:?}: an interface name has 1 to 15 characters"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{what} {name:?} is not an interface name"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{what} {name:?}: an interface name has no '/', ':' or whitespace"
        ));
    }
    Ok(())
}

impl RelayFile {
    /// Checks the settings.
    ///
    /// # Errors
    /// The problem, named.
    pub fn check(&self) -> Result<(), String> {
        check_ifname("relay.uplink", &self.uplink)?;
        let rest = self.vif_name.replace("{domid}", "").replace("{device}", "");
        if rest.contains(['{', '}']) {
            return Err(format!(
                "relay.vif_name {:?}: only {{domid}} and {{device}} can be replaced",
                self.vif_name
            ));
        }
        // The longest name the template can give (domid up to 5 digits, device up to 3).
        let longest = self
            .vif_name
            .replace("{domid}", "65535")
            .replace("{device}", "999");
        check_ifname("relay.vif_name", &longest)
    }
}

/// The relay's settings as the plan uses them (binary resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayFacts {
    /// `xenft-netback`.
    pub netback: PathBuf,
    /// The uplink interface.
    pub uplink: String,
    /// The vif name template.
    pub vif_name: String,
}

/// What the relay of one VM needs from the rest of the plan.
pub struct RelayContext<'a> {
    /// `primary` (the VM runs here) or `secondary`.
    pub role: &'a str,
    /// This host's and the peer's names on the A-link.
    pub me: &'a str,
    /// The peer's name.
    pub peer: &'a str,
    /// The relay's A-link paths, `LOCAL=PEER`.
    pub paths: &'a [String],
    /// The VM's runtime directory.
    pub dir: &'a Path,
    /// The pool secret file.
    pub secret_file: &'a Path,
    /// The VM's A-link port slot.
    pub slot: u64,
}

/// The relay of `v` on this host, or why it cannot be started.
///
/// # Errors
/// Why the VM gets no relay here (no network interface, no domain id where it runs, a name
/// the template cannot give).
pub fn spec(v: &VmDesired, f: &RelayFacts, c: &RelayContext<'_>) -> Result<ProcSpec, String> {
    let Some(vif) = v.devices.vifs.first() else {
        return Err("the VM has no network interface (VIF) to relay".into());
    };
    let primary = c.role == "primary";
    let name = if !f.vif_name.contains("{domid}") {
        f.vif_name.replace("{device}", &vif.device.to_string())
    } else if primary {
        let Some(domid) = v.devices.domid else {
            return Err("the VM runs here but xapi reports no domain id for it".into());
        };
        f.vif_name
            .replace("{domid}", &domid.to_string())
            .replace("{device}", &vif.device.to_string())
    } else {
        format!("xfsb{}", c.slot)
    };
    check_ifname("vif", &name)?;
    let s = |p: &Path| p.display().to_string();
    let mut args = vec![
        "--vif".into(),
        name,
        "--uplink".into(),
        f.uplink.clone(),
        "--mac".into(),
        vif.mac.clone(),
        "--mode".into(),
        if primary { "passthrough" } else { "standby" }.into(),
        "--control".into(),
        s(&c.dir.join("netback.sock")),
        "--alink-host".into(),
        c.me.into(),
        "--alink-peer".into(),
        c.peer.into(),
        "--alink-secret-file".into(),
        s(c.secret_file),
    ];
    for p in c.paths {
        args.push("--alink-path".into());
        args.push(p.clone());
    }
    Ok(ProcSpec {
        vm: v.uuid.clone(),
        name: "netback",
        program: f.netback.clone(),
        args,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xapi::devices::{Vif, VmDevices};

    fn vm(domid: Option<u32>, vifs: &[(u32, &str)]) -> VmDesired {
        VmDesired {
            uuid: "vm-a".into(),
            vm_ref: "OpaqueRef:a".into(),
            name: "web01".into(),
            level: 2,
            secondary: "u2".into(),
            resident_on: Some("u1".into()),
            power_state: "Running".into(),
            memory_bytes: 1 << 30,
            devices: VmDevices {
                domid,
                vifs: vifs
                    .iter()
                    .map(|(d, m)| Vif {
                        device: *d,
                        mac: (*m).into(),
                    })
                    .collect(),
                ..VmDevices::default()
            },
        }
    }

    fn facts(template: &str) -> RelayFacts {
        RelayFacts {
            netback: "/usr/bin/xenft-netback".into(),
            uplink: "eth0".into(),
            vif_name: template.into(),
        }
    }

    fn ctx<'a>(role: &'a str, paths: &'a [String]) -> RelayContext<'a> {
        RelayContext {
            role,
            me: "host1",
            peer: "host2",
            paths,
            dir: Path::new("/run/xenft/vm-a"),
            secret_file: Path::new("/etc/xenft/secret"),
            slot: 42,
        }
    }

    fn arg<'a>(s: &'a ProcSpec, flag: &str) -> &'a str {
        let i = s.args.iter().position(|a| a == flag).unwrap();
        &s.args[i + 1]
    }

    #[test]
    fn the_primary_relays_the_running_domains_vif_and_the_secondary_stands_by() {
        let paths = vec!["10.0.0.1:7702=10.0.0.2:7702".to_string()];
        let v = vm(
            Some(12),
            &[(0, "00:16:3e:00:00:01"), (1, "00:16:3e:00:00:02")],
        );
        let p = spec(&v, &facts(DEFAULT_VIF_NAME), &ctx("primary", &paths)).unwrap();
        assert_eq!(arg(&p, "--vif"), "vif12.0");
        assert_eq!(arg(&p, "--mac"), "00:16:3e:00:00:01");
        assert_eq!(arg(&p, "--mode"), "passthrough");
        assert_eq!(arg(&p, "--uplink"), "eth0");
        assert_eq!(arg(&p, "--control"), "/run/xenft/vm-a/netback.sock");
        assert_eq!(arg(&p, "--alink-path"), paths[0]);
        let s = spec(&v, &facts(DEFAULT_VIF_NAME), &ctx("secondary", &paths)).unwrap();
        assert_eq!(arg(&s, "--mode"), "standby");
        assert_eq!(arg(&s, "--vif"), "xfsb42");
        // A fixed name (xl's vifname=) is the same on both hosts.
        let s = spec(&v, &facts("vif0"), &ctx("secondary", &paths)).unwrap();
        assert_eq!(arg(&s, "--vif"), "vif0");
    }

    #[test]
    fn no_vif_or_no_domid_where_the_vm_runs_is_a_reason_not_a_relay() {
        let e = spec(
            &vm(Some(3), &[]),
            &facts(DEFAULT_VIF_NAME),
            &ctx("primary", &[]),
        )
        .unwrap_err();
        assert!(e.contains("no network interface"), "{e}");
        let e = spec(
            &vm(None, &[(0, "00:16:3e:00:00:01")]),
            &facts(DEFAULT_VIF_NAME),
            &ctx("primary", &[]),
        )
        .unwrap_err();
        assert!(e.contains("no domain id"), "{e}");
    }

    #[test]
    fn relay_settings_are_checked() {
        let ok = RelayFile {
            netback: None,
            uplink: "eth0".into(),
            vif_name: DEFAULT_VIF_NAME.into(),
        };
        ok.check().unwrap();
        for (uplink, tmpl, want) in [
            ("", DEFAULT_VIF_NAME, "1 to 15"),
            ("eth0/1", DEFAULT_VIF_NAME, "no '/'"),
            ("a-very-long-uplink0", DEFAULT_VIF_NAME, "1 to 15"),
            ("eth0", "vif{vm}", "only {domid}"),
            ("eth0", "xenft-vif-{domid}-{device}", "1 to 15"),
        ] {
            let e = RelayFile {
                netback: None,
                uplink: uplink.into(),
                vif_name: tmpl.into(),
            }
            .check()
            .unwrap_err();
            assert!(e.contains(want), "{uplink} {tmpl}: {e}");
        }
    }
}
