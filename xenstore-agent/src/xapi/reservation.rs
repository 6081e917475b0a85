//! Capacity kept for a take-over: every protected VM reserves its memory
//! (`memory_static_max`) on its secondary host, which must be able to start it when the
//! primary fails. `xenft vm-protect` refuses a protection the secondary cannot hold; this
//! re-checks it while the pool changes — a VM started on the secondary, a protected VM grown
//! — from the secondary's free memory as xapi computes it (`host.compute_free_memory`,
//! which counts what runs there). The VMs a secondary can no longer cover are reported
//! `degraded` with the numbers; protection itself goes on (a take-over may still succeed if
//! memory frees up).
//!
//! Who is covered when the memory is short: VMs in name order (then uuid), so the report is
//! stable from one check to the next and the same on every host.

use std::collections::BTreeMap;

use super::desired::Desired;

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// For each protected VM whose secondary cannot hold it (with every VM before it in order),
/// why — given each secondary's free memory in bytes, by host uuid (a host missing from
/// `free` is not judged).
#[must_use]
pub fn shortfalls(d: &Desired, free: &BTreeMap<String, i64>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (host, &free) in free {
        let free = u64::try_from(free).unwrap_or(0);
        let mut on_host: Vec<_> = d
            .vms
            .values()
            .filter(|v| v.secondary == *host && v.resident_on.as_deref() != Some(host))
            .collect();
        on_host.sort_by(|a, b| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)));
        let host_name = d.hosts.get(host).map_or(host.as_str(), |h| h.name.as_str());
        let mut reserved = 0u64;
        let mut covered: Vec<&str> = Vec::new();
        for v in on_host {
            if reserved.saturating_add(v.memory_bytes) <= free {
                reserved += v.memory_bytes;
                covered.push(&v.name);
            } else {
                out.insert(
                    v.uuid.clone(),
                    format!(
                        "reservation short: {host_name} has {} free, {} of it kept for {} [{}], this VM needs {}",
                        gib(free),
                        gib(reserved),
                        covered.len(),
                        covered.join(", "),
                        gib(v.memory_bytes)
                    ),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xapi::desired::{HostInfo, VmDesired};
    use crate::xapi::devices::VmDevices;

    const GIB: u64 = 1 << 30;

    fn desired(vms: &[(&str, u64, &str)]) -> Desired {
        let mut d = Desired::default();
        for (u, n) in [("u1", "h1"), ("u2", "h2")] {
            d.hosts.insert(
                u.into(),
                HostInfo {
                    name: n.into(),
                    address: String::new(),
                },
            );
        }
        for (name, mem, secondary) in vms {
            d.vms.insert(
                format!("uuid-{name}"),
                VmDesired {
                    uuid: format!("uuid-{name}"),
                    vm_ref: format!("OpaqueRef:{name}"),
                    name: (*name).into(),
                    level: 1,
                    secondary: (*secondary).into(),
                    resident_on: Some("u1".into()),
                    power_state: "Running".into(),
                    memory_bytes: *mem,
                    devices: VmDevices::default(),
                },
            );
        }
        d
    }

    #[test]
    fn vms_beyond_the_secondarys_free_memory_are_named_with_the_numbers() {
        let d = desired(&[("a", 2 * GIB, "u2"), ("b", 3 * GIB, "u2"), ("c", GIB, "u2")]);
        let free = BTreeMap::from([("u2".to_string(), i64::try_from(4 * GIB).unwrap())]);
        let s = shortfalls(&d, &free);
        // a (2) fits, b (3) does not, c (1) still fits after a.
        assert_eq!(s.keys().collect::<Vec<_>>(), vec!["uuid-b"]);
        let why = &s["uuid-b"];
        assert!(why.contains("h2 has 4.0 GiB free"), "{why}");
        assert!(why.contains("2.0 GiB of it kept for 1 [a]"), "{why}");
        assert!(why.contains("needs 3.0 GiB"), "{why}");
    }

    #[test]
    fn enough_memory_or_an_unknown_host_reports_nothing() {
        let d = desired(&[("a", 2 * GIB, "u2"), ("b", 2 * GIB, "u2")]);
        let free = BTreeMap::from([("u2".to_string(), i64::try_from(4 * GIB).unwrap())]);
        assert!(shortfalls(&d, &free).is_empty());
        assert!(shortfalls(&d, &BTreeMap::new()).is_empty());
        // A negative answer from xapi is no memory at all.
        let free = BTreeMap::from([("u2".to_string(), -1)]);
        assert_eq!(shortfalls(&d, &free).len(), 2);
    }
}
