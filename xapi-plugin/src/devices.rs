//! The device records xenft reads to run a VM's components: its network interfaces (`VIF`),
//! its disk attachments (`VBD`) and the disks themselves (`VDI`). Field names as in xapi's
//! datamodel (`ocaml/idl/datamodel.ml`: `vif`, `vbd`, `vdi`); `int` fields travel as decimal
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
    /// `virtual_size`: the disk's size as the guest sees it, bytes.
    pub virtual_size: i64,
    /// `SR`.
    pub sr: Ref,
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
            virtual_size: int_field(m, "virtual_size"),
            sr: str_field(m, "SR"),
        })
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
    }
}
