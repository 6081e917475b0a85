//! The device records xenft reads to run a VM's components: its network interfaces (`VIF`),
//! its disk attachments (`VBD`), the disks themselves (`VDI`) and the storage repositories
//! holding them (`SR`). Field names as in xapi's
//! datamodel (`ocaml/idl/datamodel.ml`: `vif`, `vbd`, `vdi`, `sr`); `int` fields travel as decimal
//! strings; refs are opaque. Absent or mistyped fields read as empty (the caller checks what
//! it needs and says what is missing).

use crate::api::{int_field, str_field, Ref};
use crate::error::XapiError;
use crate::xmlrpc::Value;

/// The `VIF` fields xenft uses.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct VifRecord {
    /// `uuid`.
    pub uuid: String,
    /// `device`: the interface's order in the guest (`"0"`, `"1"`, ...); the backend interface
    /// on the host is `vif<domid>.<device>`.
    pub device: String,
    /// `MAC`.
    pub mac: String,
    /// `VM`: the VM it belongs to.
    pub vm: Ref,
    /// `network`.
    pub network: Ref,
}

impl VifRecord {
    /// Reads a `VIF` record struct.
    ///
    /// # Errors
    /// [`XapiError`] when `v` is not a struct.
    pub fn from_value(v: &Value) -> Result<VifRecord, XapiError> {
        let m = v
            .as_struct()
            .ok_or_else(|| XapiError::type_err("VIF record", v))?;
        Ok(VifRecord {
            uuid: str_field(m, "uuid"),
            device: str_field(m, "device"),
            mac: str_field(m, "MAC"),
            vm: str_field(m, "VM"),
            network: str_field(m, "network"),
        })
    }
}

/// The `VBD` fields xenft uses.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct VbdRecord {
    /// `VM`.
    pub vm: Ref,
    /// `VDI` (`OpaqueRef:NULL` for an empty CD drive).
    pub vdi: Ref,
    /// `userdevice`: the disk's position (`"0"` boots).
    pub userdevice: String,
    /// `type`: `Disk`, `CD` or `Floppy`.
    pub kind: String,
}

impl VbdRecord {
    /// Reads a `VBD` record struct.
    ///
    /// # Errors
    /// [`XapiError`] when `v` is not a struct.
    pub fn from_value(v: &Value) -> Result<VbdRecord, XapiError> {
        let m = v
            .as_struct()
            .ok_or_else(|| XapiError::type_err("VBD record", v))?;
        Ok(VbdRecord {
            vm: str_field(m, "VM"),
            vdi: str_field(m, "VDI"),
            userdevice: str_field(m, "userdevice"),
            kind: str_field(m, "type"),
        })
    }

    /// A disk (not a CD or floppy drive).
    #[must_use]
    pub fn is_disk(&self) -> bool {
        self.kind == "Disk"
    }
}

/// The `VDI` fields xenft uses.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct VdiRecord {
    /// `uuid`.
    pub uuid: String,
    /// `name_label`.
    pub name_label: String,
    /// `virtual_size`: the disk's size as the guest sees it, bytes.
    pub virtual_size: i64,
    /// `SR`.
    pub sr: Ref,
    /// `location`: the disk's name within its SR. On an SMAPIv3 SR it is the volume's `key`
    /// (xen-api `ocaml/xapi-storage-script/main.ml` makes a volume's `key` the VDI's `vdi`,
    /// which xapi stores as `location`): for the xenft SR, the volume whose blkback serves it.
    pub location: String,
}

impl VdiRecord {
    /// Reads a `VDI` record struct.
    ///
    /// # Errors
    /// [`XapiError`] when `v` is not a struct.
    pub fn from_value(v: &Value) -> Result<VdiRecord, XapiError> {
        let m = v
            .as_struct()
            .ok_or_else(|| XapiError::type_err("VDI record", v))?;
        Ok(VdiRecord {
            uuid: str_field(m, "uuid"),
            name_label: str_field(m, "name_label"),
            virtual_size: int_field(m, "virtual_size"),
            sr: str_field(m, "SR"),
            location: str_field(m, "location"),
        })
    }
}

/// The `SR` fields xenft uses.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct SrRecord {
    /// `uuid`: for an SMAPIv3 SR also the `sr` its plugin's calls receive (the xenft SR's
    /// `SR.attach` returns it), so the name of its directories on each host.
    pub uuid: String,
    /// `name_label`.
    pub name_label: String,
    /// `type`: the driver (`lvm`, `ext`, `nfs`, ..., [`XENFT_SR_TYPE`] for ours).
    pub kind: String,
    /// `shared`: attached on every host of the pool.
    pub shared: bool,
}

/// The `type` of the xenft SR (`xe sr-create type=xenft`, crate `xenft-sr`).
pub const XENFT_SR_TYPE: &str = "xenft";

impl SrRecord {
    /// Reads an `SR` record struct.
    ///
    /// # Errors
    /// [`XapiError`] when `v` is not a struct.
    pub fn from_value(v: &Value) -> Result<SrRecord, XapiError> {
        let m = v
            .as_struct()
            .ok_or_else(|| XapiError::type_err("SR record", v))?;
        Ok(SrRecord {
            uuid: str_field(m, "uuid"),
            name_label: str_field(m, "name_label"),
            kind: str_field(m, "type"),
            shared: m.get("shared").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// The xenft SR.
    #[must_use]
    pub fn is_xenft(&self) -> bool {
        self.kind == XENFT_SR_TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rec(pairs: &[(&str, Value)]) -> Value {
        Value::Struct(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    #[test]
    fn records_read_the_datamodel_field_names() {
        let vif = VifRecord::from_value(&rec(&[
            ("device", Value::str("1")),
            ("MAC", Value::str("aa:bb:cc:00:11:22")),
            ("VM", Value::str("OpaqueRef:vm")),
        ]))
        .unwrap();
        assert_eq!(
            (vif.device.as_str(), vif.mac.as_str(), vif.vm.as_str()),
            ("1", "aa:bb:cc:00:11:22", "OpaqueRef:vm")
        );
        let vbd = VbdRecord::from_value(&rec(&[
            ("type", Value::str("CD")),
            ("userdevice", Value::str("3")),
        ]))
        .unwrap();
        assert!(!vbd.is_disk());
        // int fields travel as decimal strings.
        let vdi =
            VdiRecord::from_value(&rec(&[("virtual_size", Value::str("1073741824"))])).unwrap();
        assert_eq!(vdi.virtual_size, 1 << 30);
    }

    #[test]
    fn a_record_that_is_not_a_struct_is_an_error_naming_the_class() {
        let e = VifRecord::from_value(&Value::str("garbage")).unwrap_err();
        assert!(e.to_string().contains("VIF record"), "{e}");
        assert!(VbdRecord::from_value(&Value::Array(vec![])).is_err());
        assert!(VdiRecord::from_value(&Value::Bool(true)).is_err());
        assert!(SrRecord::from_value(&Value::str("x")).is_err());
    }

    #[test]
    fn an_sr_is_the_xenft_sr_by_its_type() {
        let sr = SrRecord::from_value(&rec(&[
            ("type", Value::str("xenft")),
            ("name_label", Value::str("mirrored")),
            ("shared", Value::Bool(true)),
        ]))
        .unwrap();
        assert!(sr.is_xenft() && sr.shared);
        let nfs = SrRecord::from_value(&rec(&[("type", Value::str("nfs"))])).unwrap();
        assert!(!nfs.is_xenft());
    }
}
