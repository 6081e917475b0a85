//! A protected VM's devices, as its components need them: its domain id, its network
//! interfaces (`VIF`: device number and MAC, for the relay) and its disk (`VBD` → `VDI`: the
//! size the mirror must have; `VDI` → `SR`: whether the xenft SR mirrors it already, and as
//! which volume). Derived purely from the registry snapshot; a device xapi
//! describes badly (a MAC that is not one, a negative size) is left out with the reason in
//! [`VmDevices::problems`], never passed to a component.

use serde::Serialize;
use xenft_xapi::api::Ref;

use super::desired::Snapshot;

/// One network interface of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vif {
    /// Its device number in the guest (`vif<domid>.<device>` on the host).
    pub device: u32,
    /// Its MAC, lower case `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// A volume of the xenft SR: where its blkbacks live on each host
/// (`<SR run_dir>/<sr>/<key>/`, crate `xenft-sr`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SrVolume {
    /// The SR's uuid (the `sr` of the SR plugin's calls).
    pub sr: String,
    /// The volume's key: the VDI's `location`.
    pub key: String,
}

/// The VM's boot disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disk {
    /// The VBD's `userdevice`.
    pub userdevice: u32,
    /// The VDI's uuid.
    pub vdi: String,
    /// The VDI's `virtual_size`, bytes.
    pub size: u64,
    /// On the xenft SR: the volume (its blkbacks mirror the disk already).
    pub xenft: Option<SrVolume>,
}

/// What the components need to know of a VM's devices.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct VmDevices {
    /// The running domain's id (`None` when the VM does not run).
    pub domid: Option<u32>,
    /// Network interfaces, by device number.
    pub vifs: Vec<Vif>,
    /// The disk at the lowest `userdevice` (the one xenft mirrors).
    pub disk: Option<Disk>,
    /// Further disks (userdevices) the VM has: xenft mirrors one disk per VM.
    pub other_disks: Vec<u32>,
    /// The disks (userdevices) on no xenft SR.
    pub off_xenft_sr: Vec<u32>,
    /// Devices left out, with why.
    pub problems: Vec<String>,
}

/// `aa:bb:cc:dd:ee:ff` in lower case, or why not.
pub fn normalise_mac(mac: &str) -> Result<String, String> {
    let parts: Vec<&str> = mac.trim().split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(mac.trim().to_ascii_lowercase())
    } else {
        Err(format!(
            "MAC {mac:?} is not six hex octets separated by ':'"
        ))
    }
}

/// The xenft SR's volume `key` of SR `sr`, both checked: they become path components
/// (`xenft_sr::config::check_id`, the SR's own rule).
fn sr_volume(sr: &str, key: &str) -> Result<SrVolume, String> {
    let sr = xenft_sr::config::check_id("SR uuid", sr).map_err(|e| e.to_string())?;
    let key = xenft_sr::config::check_id("VDI location (the volume key)", key)
        .map_err(|e| e.to_string())?;
    Ok(SrVolume {
        sr: sr.to_string(),
        key: key.to_string(),
    })
}

/// The devices of the VM `vm_ref` in `s`.
#[must_use]
pub fn of(s: &Snapshot, vm_ref: &Ref) -> VmDevices {
    let mut d = VmDevices::default();
    if let Some(vm) = s.vms.get(vm_ref) {
        d.domid = (vm.power_state != "Halted")
            .then(|| u32::try_from(vm.domid).ok())
            .flatten()
            .filter(|&id| id > 0);
    }
    for v in s.vifs.values().filter(|v| v.vm == *vm_ref) {
        let Ok(device) = v.device.trim().parse::<u32>() else {
            d.problems.push(format!(
                "VIF {} has device {:?}, not a number",
                v.uuid, v.device
            ));
            continue;
        };
        match normalise_mac(&v.mac) {
            Ok(mac) => d.vifs.push(Vif { device, mac }),
            Err(e) => d.problems.push(format!("VIF {device}: {e}")),
        }
    }
    d.vifs.sort_by_key(|v| v.device);
    d.vifs.dedup_by_key(|v| v.device);
    let mut disks = Vec::new();
    for b in s.vbds.values().filter(|b| b.vm == *vm_ref && b.is_disk()) {
        let Ok(userdevice) = b.userdevice.trim().parse::<u32>() else {
            d.problems.push(format!(
                "a disk has userdevice {:?}, not a number",
                b.userdevice
            ));
            continue;
        };
        let Some(vdi) = s.vdis.get(&b.vdi) else {
            d.problems
                .push(format!("disk {userdevice}: its VDI {} is not known", b.vdi));
            continue;
        };
        let xenft = match s.srs.get(&vdi.sr) {
            Some(sr) if sr.is_xenft() => match sr_volume(&sr.uuid, &vdi.location) {
                Ok(v) => Some(v),
                Err(why) => {
                    d.problems.push(format!("disk {userdevice}: {why}"));
                    continue;
                }
            },
            _ => None,
        };
        match u64::try_from(vdi.virtual_size) {
            Ok(size) if size > 0 => disks.push(Disk {
                userdevice,
                vdi: vdi.uuid.clone(),
                size,
                xenft,
            }),
            _ => d.problems.push(format!(
                "disk {userdevice}: VDI {} has virtual_size {}",
                vdi.uuid, vdi.virtual_size
            )),
        }
    }
    disks.sort_by_key(|k| k.userdevice);
    d.off_xenft_sr = disks
        .iter()
        .filter(|k| k.xenft.is_none())
        .map(|k| k.userdevice)
        .collect();
    let mut disks = disks.into_iter();
    d.disk = disks.next();
    d.other_disks = disks.map(|k| k.userdevice).collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenft_xapi::api::VmRecord;
    use xenft_xapi::devices::{SrRecord, VbdRecord, VdiRecord, VifRecord};

    fn snap() -> Snapshot {
        let mut s = Snapshot::default();
        s.vms.insert(
            "OpaqueRef:vm".into(),
            VmRecord {
                uuid: "u".into(),
                power_state: "Running".into(),
                domid: 7,
                ..VmRecord::default()
            },
        );
        for (r, dev, mac) in [
            ("OpaqueRef:vif1", "1", "AA:BB:CC:00:00:01"),
            ("OpaqueRef:vif0", "0", "aa:bb:cc:00:00:00"),
            ("OpaqueRef:vifbad", "2", "aa:bb:cc"),
        ] {
            s.vifs.insert(
                r.into(),
                VifRecord {
                    uuid: r.into(),
                    device: dev.into(),
                    mac: mac.into(),
                    vm: "OpaqueRef:vm".into(),
                    ..VifRecord::default()
                },
            );
        }
        for (r, dev, vdi, size, kind) in [
            ("OpaqueRef:vbd1", "1", "OpaqueRef:vdi1", "2048", "Disk"),
            ("OpaqueRef:vbd0", "0", "OpaqueRef:vdi0", "1048576", "Disk"),
            ("OpaqueRef:cd", "3", "OpaqueRef:NULL", "0", "CD"),
        ] {
            s.vbds.insert(
                r.into(),
                VbdRecord {
                    vm: "OpaqueRef:vm".into(),
                    vdi: vdi.into(),
                    userdevice: dev.into(),
                    kind: kind.into(),
                },
            );
            s.vdis.insert(
                vdi.into(),
                VdiRecord {
                    uuid: format!("uuid-{dev}"),
                    virtual_size: size.parse().unwrap(),
                    location: format!("vol-{dev}"),
                    ..VdiRecord::default()
                },
            );
        }
        s
    }

    #[test]
    fn the_boot_disk_sizes_the_mirror_and_vifs_come_in_device_order() {
        let d = of(&snap(), &"OpaqueRef:vm".to_string());
        assert_eq!(d.domid, Some(7));
        assert_eq!(
            d.vifs,
            vec![
                Vif {
                    device: 0,
                    mac: "aa:bb:cc:00:00:00".into()
                },
                Vif {
                    device: 1,
                    mac: "aa:bb:cc:00:00:01".into()
                }
            ]
        );
        let disk = d.disk.unwrap();
        assert_eq!((disk.userdevice, disk.size), (0, 1_048_576));
        assert_eq!(d.other_disks, vec![1]);
        // The CD drive is no disk; the bad MAC is reported, not used.
        assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
        assert!(d.problems[0].contains("aa:bb:cc"), "{:?}", d.problems);
    }

    #[test]
    fn hostile_device_records_are_reported_and_left_out() {
        let mut s = snap();
        s.vdis.get_mut("OpaqueRef:vdi0").unwrap().virtual_size = -5;
        s.vifs.get_mut("OpaqueRef:vif0").unwrap().device = "eth0".into();
        s.vbds.get_mut("OpaqueRef:vbd1").unwrap().vdi = "OpaqueRef:gone".into();
        let d = of(&s, &"OpaqueRef:vm".to_string());
        assert!(d.disk.is_none(), "{d:?}");
        assert_eq!(d.vifs.len(), 1);
        let all = d.problems.join("\n");
        assert!(all.contains("virtual_size -5"), "{all}");
        assert!(all.contains("\"eth0\""), "{all}");
        assert!(all.contains("OpaqueRef:gone"), "{all}");
    }

    #[test]
    fn a_disk_on_the_xenft_sr_is_its_volume_and_a_hostile_location_is_refused() {
        let mut s = snap();
        for (r, uuid, kind) in [
            ("OpaqueRef:x", "sr-x", "xenft"),
            ("OpaqueRef:n", "sr-n", "nfs"),
        ] {
            s.srs.insert(
                r.into(),
                SrRecord {
                    uuid: uuid.into(),
                    kind: kind.into(),
                    ..SrRecord::default()
                },
            );
        }
        s.vdis.get_mut("OpaqueRef:vdi0").unwrap().sr = "OpaqueRef:x".into();
        s.vdis.get_mut("OpaqueRef:vdi1").unwrap().sr = "OpaqueRef:n".into();
        let d = of(&s, &"OpaqueRef:vm".to_string());
        let disk = d.disk.unwrap();
        assert_eq!(
            disk.xenft,
            Some(SrVolume {
                sr: "sr-x".into(),
                key: "vol-0".into()
            })
        );
        s.vdis.get_mut("OpaqueRef:vdi0").unwrap().location = "../../etc".into();
        let d = of(&s, &"OpaqueRef:vm".to_string());
        assert_eq!(d.disk.map(|k| k.userdevice), Some(1), "disk 0 left out");
        assert!(
            d.problems.iter().any(|p| p.contains("../../etc")),
            "{:?}",
            d.problems
        );
    }

    #[test]
    fn a_halted_vm_has_no_domain() {
        let mut s = snap();
        let vm = s.vms.get_mut("OpaqueRef:vm").unwrap();
        vm.power_state = "Halted".into();
        vm.domid = -1;
        assert_eq!(of(&s, &"OpaqueRef:vm".to_string()).domid, None);
    }

    #[test]
    fn macs_are_checked() {
        assert_eq!(
            normalise_mac(" 00:16:3E:AA:bb:01 ").unwrap(),
            "00:16:3e:aa:bb:01"
        );
        for bad in ["", "00:16:3e:aa:bb", "00:16:3e:aa:bb:0g", "0016.3eaa.bb01"] {
            assert!(normalise_mac(bad).is_err(), "{bad}");
        }
    }
}
