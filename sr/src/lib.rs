//! # xenft-sr: the xenft SR for XenServer / XCP-ng
//!
//! The mirrored volumes of a protected pair, presented to xapi as one SR that both hosts
//! attach (so VMs on it are agile between them), each volume served by `xenft-blkback`
//! (primary where the VM runs, secondary holding the copy on the other host) and read by
//! tapdisk over NBD.
//!
//! ## Why SMAPIv3
//! SMAPIv3 (xapi-project/xen-api `ocaml/xapi-storage`, run by `ocaml/xapi-storage-script`)
//! rather than an SMAPIv1 driver beside those of xcp-ng/sm (LinstorSR and friends):
//! - its datapath plugin's `Datapath.attach` returns the device to use (`data.ml`:
//!   `XenDisk`, `BlockDevice`, `File` or `Nbd {uri = "nbd:unix:<socket>:exportname=<name>"}`),
//!   which is exactly what our blkback serves: no kernel NBD device (`/dev/nbdN`) in between,
//!   as an SMAPIv1 driver would need to hand tapdisk a block device path;
//! - `Datapath.activate` / `deactivate` are the per-host hand-over points the design needs
//!   ("the primary side follows where the VM runs"), called in the migration downtime window;
//! - a plugin is any executable taking JSON on stdin: one Rust binary, no Python driver
//!   framework (SMAPIv1's `SR.py`/`VDI.py`, `lvutil`, `blktap2.py`) to track across releases.
//!   The cost: SMAPIv3 features such as storage migration into the SR go through xapi's
//!   `DATA.*`/mirror path, which this SR does not implement: xapi moves a disk into an SR only
//!   with `VDI_SNAPSHOT` and `VDI_MIRROR_IN` there (`assert_can_migrate`,
//!   `ocaml/xapi/xapi_vm_migrate.ml`), which xapi-storage-script grants for a `Volume.snapshot`
//!   script and a datapath plugin with `Datapath.import_activate` (`main.ml`), so `xenft
//!   vm-protect ... move=true` of a running VM is refused by xapi
//!   (`SR_DOES_NOT_SUPPORT_MIGRATION`) until this SR has both; a halted VM's disks are copied
//!   in with `VDI.copy`, which needs only `VDI_CREATE`.
//! - The xenft agent drives a volume's blkback through its control socket
//!   ([`blkback::control_socket_of`]) for a protected VM on the SR, and promotes the copy on
//!   take-over before xapi restarts the VM; `Datapath.activate` then finds it promoted and
//!   keeps it.
//!
//! ## Calling convention (assumptions, each with its source)
//! From xapi-project/xen-api `ocaml/xapi-storage-script/main.ml`, `fork_exec_rpc`:
//! - the executable named after the method (`Plugin.query`, `SR.attach`, `Volume.create`,
//!   `Datapath.activate`, ...) in the plugin's directory is run, the name matched without
//!   regard to case (`Script.path`, a caseless map); argv is `[path; "--json"]`, so the method
//!   is the basename of argv\[0\] (install symlinks named after the methods). `xenft-sr
//!   METHOD` works too, for tests and the peer conduit;
//! - stdin carries the call's named parameters as one JSON object (not the JSON-RPC
//!   envelope), e.g. `{"dbg": "...", "sr": "...", "key": "..."}`; parameter names from
//!   `ocaml/xapi-storage/generator/lib/{control,data,plugin}.ml` (`Volume.set` takes `k`, `v`;
//!   `Volume.resize` `new_size`; `SR.create` `uuid`, `configuration`, `name`, `description`);
//! - on success: exit 0 and the reply value alone on stdout (rpclib's JSON: records are
//!   objects, `(string * string) list` is an object, an option is the value or absent, a
//!   variant with an argument is `["Constructor", arg]`, unit is `null`);
//! - on failure: non-zero exit and the error object of [`error`] on stdout;
//! - `Volume.stat`'s `uri` list picks the datapath plugin: the URI scheme (`xenft`) names the
//!   directory `datapath/xenft/` (`choose_datapath`); the datapath methods get that `uri`
//!   and an opaque `domain`;
//! - `SR.attach` returns the string every later call receives as `sr` (here: the SR uuid);
//!   features for scripts present are added by xapi (`query_impl`), so `Volume.snapshot` and
//!   `Volume.clone` are not installed as scripts: xapi then never offers them. Called anyway,
//!   they fail with `Unimplemented` and a reason.
//! - tapdisk (xapi-project/blktap `drivers/block-nbd.c`) opens a Unix socket path or
//!   `IP:PORT`, speaks only the oldstyle NBD handshake and sends READ, WRITE and DISC, never
//!   FLUSH or FUA: the blkbacks run with `--nbd-oldstyle` and (SR default) `--write-through`.
//! - xenopsd with an `Nbd` implementation: `Storage_interface.parse_nbd_uri` splits the URI on
//!   ':' into exactly 4 parts (so socket paths must not contain ':'). `Datapath.attach` returns
//!   `XenDisk {backend_type = "vbd3"; params = "nbd:<socket>"}` first (tapdisk's `type:path`
//!   params, its NBD driver opening our socket) and the `Nbd` URI second. Which of the two
//!   xenopsd uses for a PV/HVM disk was read, not run: unverified here.
//!
//! ## Layout
//! Host-local facts in `/etc/xenft/sr.json` ([`config::HostConfig`]); the SR's pool-wide
//! configuration in xapi's device-config ([`config::DeviceConfig`]); per SR and host a state
//! file ([`state`]); one blkback per volume and host ([`blkback`]); the other host reached by
//! [`peer`]. Methods: [`volume_ops`] (Plugin, SR, Volume) and [`datapath`] (Datapath, Peer).

#![deny(missing_docs)]

pub mod blkback;
pub mod config;
pub mod datapath;
pub mod error;
pub mod peer;
pub mod state;
pub mod volume_ops;

use serde_json::Value;

use config::{Args, HostConfig};
use error::{SrError, SrResult};

/// Runs one method with its JSON arguments on this host.
pub fn call(host: &HostConfig, method: &str, args: &Value) -> SrResult<Value> {
    let m = method.to_ascii_lowercase();
    let a = Args::new(args)?;
    match m.as_str() {
        "plugin.query" => Ok(volume_ops::query()),
        "plugin.diagnostics" => Ok(Value::String(diagnostics(host))),
        "plugin.ls" => Ok(Value::Array(
            attached_srs(host).into_iter().map(Value::String).collect(),
        )),
        m if m.starts_with("sr.") || m.starts_with("volume.") => volume_ops::call(host, m, &a),
        m if m.starts_with("datapath.") => datapath::call(host, m, &a),
        m if m.starts_with("peer.") => datapath::peer_call(host, m, &a),
        _ => Err(SrError::unimplemented(format!("unknown method {method:?}"))),
    }
}

fn attached_srs(host: &HostConfig) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(&host.state_dir) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|u| {
            state::SrDir::new(host, u)
                .and_then(|d| d.load())
                .is_ok_and(|s| s.attached)
        })
        .collect()
}

/// A readable summary: each SR on this host, its volumes and their blkbacks.
fn diagnostics(host: &HostConfig) -> String {
    let mut out = format!(
        "xenft-sr {}, host {:?}\n",
        env!("CARGO_PKG_VERSION"),
        host.me()
    );
    let Ok(rd) = std::fs::read_dir(&host.state_dir) else {
        return out + "no SR on this host\n";
    };
    for u in rd
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
    {
        let Ok(d) = state::SrDir::new(host, &u) else {
            continue;
        };
        match d.load() {
            Err(e) => out += &format!("SR {u}: {e}\n"),
            Ok(st) => {
                out += &format!(
                    "SR {u} attached={} volumes={}\n",
                    st.attached,
                    st.volumes.len()
                );
                let Ok(dc) = state::SrDir::device_config(&st) else {
                    continue;
                };
                for v in st.volumes.values() {
                    let b = blkback::Volume {
                        host,
                        sr: &d,
                        dc: &dc,
                        key: &v.uuid,
                        slot: v.slot,
                    };
                    out += &format!(
                        "  volume {} size={} slot={} blkback={:?}\n",
                        v.uuid,
                        v.size,
                        v.slot,
                        b.running()
                    );
                }
            }
        }
    }
    out
}
