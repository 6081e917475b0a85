//! A component that took the VM over keeps running: after a take-over the registry records
//! the VM on the surviving host, so the plan there asks for the primary form of each
//! component — but the secondary form already running there *became* the primary (blkback
//! promoted, the checkpoint engine resumed the guest, the relay switched to pass-through).
//! Replacing it would cut the running VM's disk or kill its memory. [`standby_form`] gives,
//! for a primary spec, the secondary spec that counts as the same process; the supervisor
//! keeps (and adopts) such a process instead of restarting it.
//!
//! A component whose primary form differs in more than its role (the relay's vif named after
//! a new domain id, a Xen engine attached to a domain id) has no standby form: it is
//! restarted, as it must be.

use super::components::ProcSpec;

/// Replaces the value after `flag` (`from` → `to`); `None` if `flag from` is not there.
fn swap_value(args: &mut [String], flag: &str, from: &str, to: &str) -> Option<()> {
    let i = args.iter().position(|a| a == flag)?;
    let v = args.get_mut(i + 1)?;
    (v == from).then(|| *v = to.to_string())
}

/// The secondary form of the primary spec `w` that, once taken over, is the same process.
#[must_use]
pub fn standby_form(w: &ProcSpec) -> Option<ProcSpec> {
    let mut s = w.clone();
    match w.name {
        "blkback" => swap_value(&mut s.args, "--role", "primary", "secondary")?,
        "netback" => swap_value(&mut s.args, "--mode", "passthrough", "standby")?,
        "checkpoint" => {
            if s.args.first().map(String::as_str) != Some("primary")
                || s.args.iter().any(|a| a == "--xen-domid")
            {
                return None;
            }
            s.args[0] = "secondary".into();
            let i = s.args.iter().position(|a| a == "--epoch-ms")?;
            s.args[i] = "--protect-epoch-ms".into();
        }
        _ => return None,
    }
    Some(s)
}

/// Whether `running` (as launched) satisfies `wanted`: the same, or its standby form.
#[must_use]
pub fn satisfies(running: &ProcSpec, wanted: &ProcSpec) -> bool {
    running == wanted || standby_form(wanted).as_ref() == Some(running)
}

/// Whether `spec` is a component's standby (secondary) form.
#[must_use]
pub fn is_standby(spec: &ProcSpec) -> bool {
    let after = |flag: &str| {
        spec.args
            .iter()
            .position(|a| a == flag)
            .and_then(|i| spec.args.get(i + 1))
            .map(String::as_str)
    };
    match spec.name {
        "blkback" => after("--role") == Some("secondary"),
        "netback" => after("--mode") == Some("standby"),
        "checkpoint" => spec.args.first().map(String::as_str) == Some("secondary"),
        _ => false,
    }
}

/// Whether the component launched as `spec` (a standby form, its control socket in `dir`)
/// took the VM over since: a promoted disk, a relay in pass-through, an engine that resumed
/// the guest. Such a process no longer is the secondary its argv says: when the plan wants
/// the secondary again (the VM went back to the other host) it must be replaced. A
/// component that does not answer is taken at its word (its supervisor restarts it if it
/// died).
#[must_use]
pub fn took_over(dir: &std::path::Path, spec: &ProcSpec) -> bool {
    use std::time::Duration;
    use xenft_control::{blkback, checkpoint, netback, Blkback, Checkpoint, Client, Netback};
    const T: Duration = Duration::from_millis(500);
    let sock = dir.join(format!("{}.sock", spec.name));
    match spec.name {
        "blkback" => matches!(
            Client::<Blkback>::new(&sock, T).call(&blkback::Request::Status),
            Ok(blkback::Reply::Status(s)) if !matches!(s.node, blkback::NodeStatus::Secondary { .. })
        ),
        "netback" => matches!(
            Client::<Netback>::new(&sock, T).call(&netback::Request::Counters),
            Ok(netback::Reply::Counters { counters }) if counters.mode != netback::Mode::Standby
        ),
        "checkpoint" => matches!(
            Client::<Checkpoint>::new(&sock, T).call(&checkpoint::Request::Status),
            Ok(checkpoint::Reply::Status(s)) if matches!(
                s.state,
                checkpoint::State::Stopped | checkpoint::State::Running | checkpoint::State::Protecting
            )
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &'static str, args: &[&str]) -> ProcSpec {
        ProcSpec {
            vm: "vm".into(),
            name,
            program: "/bin/x".into(),
            args: args.iter().map(|s| (*s).to_string()).collect(),
        }
    }

    #[test]
    fn a_promoted_secondary_satisfies_the_primary_the_plan_now_wants() {
        let sec = spec("blkback", &["--role", "secondary", "--disk", "d"]);
        let pri = spec("blkback", &["--role", "primary", "--disk", "d"]);
        assert!(satisfies(&sec, &pri));
        assert!(
            !satisfies(&pri, &sec),
            "a primary is never taken for a secondary"
        );
        let sec = spec(
            "checkpoint",
            &["secondary", "--protect-epoch-ms", "50", "--c", "s"],
        );
        let pri = spec("checkpoint", &["primary", "--epoch-ms", "50", "--c", "s"]);
        assert!(satisfies(&sec, &pri));
        let sec = spec("netback", &["--vif", "vif0", "--mode", "standby"]);
        let pri = spec("netback", &["--vif", "vif0", "--mode", "passthrough"]);
        assert!(satisfies(&sec, &pri));
    }

    #[test]
    fn standby_forms_are_recognised() {
        assert!(is_standby(&spec("blkback", &["--role", "secondary"])));
        assert!(!is_standby(&spec("blkback", &["--role", "primary"])));
        assert!(is_standby(&spec(
            "netback",
            &["--vif", "v", "--mode", "standby"]
        )));
        assert!(!is_standby(&spec("netback", &["--mode", "passthrough"])));
        assert!(is_standby(&spec("checkpoint", &["secondary", "--x"])));
        assert!(!is_standby(&spec("checkpoint", &["primary"])));
        assert!(!is_standby(&spec("other", &["secondary"])));
    }

    #[test]
    fn a_component_that_differs_in_more_than_its_role_is_not_kept() {
        // The relay's vif is named after the new domain: it must bind the new name.
        let sec = spec("netback", &["--vif", "xfsb3", "--mode", "standby"]);
        let pri = spec("netback", &["--vif", "vif7.0", "--mode", "passthrough"]);
        assert!(!satisfies(&sec, &pri));
        // Another disk is another disk.
        let sec = spec("blkback", &["--role", "secondary", "--disk", "a"]);
        let pri = spec("blkback", &["--role", "primary", "--disk", "b"]);
        assert!(!satisfies(&sec, &pri));
        // A Xen engine attaches to a domain id.
        let pri = spec(
            "checkpoint",
            &["primary", "--xen-domid", "5", "--epoch-ms", "9"],
        );
        assert!(standby_form(&pri).is_none());
        assert!(standby_form(&spec("other", &[])).is_none());
    }
}
