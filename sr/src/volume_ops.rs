//! `Plugin.*`, `SR.*` and `Volume.*`: the volume plugin (`ocaml/xapi-storage/generator/lib/
//! control.ml` and `plugin.ml` name the parameters and reply types).

use serde_json::{json, Value};

use crate::blkback::{self, Role};
use crate::config::{check_id, Args, DeviceConfig, HostConfig, MAX_SLOTS};
use crate::error::{io, SrError, SrResult};
use crate::peer;
use crate::state::{new_uuid, SrDir, SrState, VolumeMeta, MAX_SIZE};

/// The SR type xapi shows (`plugin` in `Plugin.query`) and the volume plugin's directory
/// suffix (`/usr/libexec/xapi-storage-script/volume/org.xen.xapi.storage.xenft/`).
pub const SR_TYPE: &str = "xenft";
/// The URI scheme of volumes, also the datapath plugin's directory name
/// (`/usr/libexec/xapi-storage-script/datapath/xenft/`): `main.ml`'s `choose_datapath`.
pub const SCHEME: &str = "xenft";

/// `Plugin.query`: `plugin.ml`'s `query_result`.
pub fn query() -> Value {
    json!({
        "plugin": SR_TYPE,
        "name": "xenft mirrored volumes",
        "description": "Volumes mirrored synchronously between the two hosts of a xenft protected pair, served by xenft-blkback over NBD",
        "vendor": "xenft",
        "copyright": "GPL-3.0-or-later",
        "version": env!("CARGO_PKG_VERSION"),
        "required_api_version": "5.0",
        "features": ["SR_ATTACH", "SR_DETACH", "SR_CREATE", "SR_DELETE", "SR_SCAN", "SR_UPDATE",
                     "VDI_CREATE", "VDI_DELETE", "VDI_RESIZE", "VDI_UPDATE", "VDI_ATTACH",
                     "VDI_DETACH", "VDI_ACTIVATE", "VDI_DEACTIVATE"],
        "configuration": {
            "hosts": "the two hosts of the pair, A,B (names as each host's xenft SR config or hostname says)",
            "alink": "A-link paths A_IP:PORT=B_IP:PORT[,...]; volume n uses PORT+n",
            "secret-file": "the pool secret (A-link key) file, the same path on both hosts",
            "write-through": "true (default): every write durable on both hosts before its reply"
        },
        "required_cluster_stack": [],
        "supported_image_formats": ["raw"],
    })
}

/// The SR named by `sr` (what `SR.attach` returned: its uuid), which must be attached here.
pub fn attached(host: &HostConfig, sr: &str) -> SrResult<(SrDir, SrState)> {
    let d = SrDir::new(host, sr)?;
    if !d.exists() {
        return Err(SrError::not_attached(sr));
    }
    let st = d.load()?;
    if !st.attached {
        return Err(SrError::not_attached(sr));
    }
    Ok((d, st))
}

/// `control.ml`'s `volume` record.
pub fn volume_json(d: &SrDir, v: &VolumeMeta) -> Value {
    let used = d
        .disk(&v.uuid)
        .ok()
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
    json!({
        "key": v.uuid,
        "uuid": v.uuid,
        "name": v.name,
        "description": v.description,
        "read_write": true,
        "sharable": v.sharable,
        "virtual_size": v.size,
        "physical_utilisation": used,
        "uri": [format!("{SCHEME}://{}/{}", d.uuid, v.uuid)],
        "keys": v.keys,
    })
}

fn volume<'a>(st: &'a mut SrState, key: &str) -> SrResult<&'a mut VolumeMeta> {
    st.volumes
        .get_mut(key)
        .ok_or_else(|| SrError::no_volume(key))
}

/// Tells the peer about a volume's metadata (and size); a peer that cannot be reached is
/// logged and skipped: its copy is brought up to date when it next serves as secondary.
pub fn tell_peer(host: &HostConfig, st: &SrState, v: &VolumeMeta) -> SrResult<()> {
    let args = json!({"sr": st.uuid, "configuration": st.config, "volume": v});
    match peer::call(host, "Peer.volume", &args) {
        Ok(_) => Ok(()),
        Err(e) if peer::is_active_elsewhere(&e) => Err(e),
        Err(e) => {
            eprintln!("xenft-sr: peer not told about volume {}: {e}", v.uuid);
            Ok(())
        }
    }
}

fn bb<'a>(
    host: &'a HostConfig,
    d: &'a SrDir,
    dc: &'a DeviceConfig,
    v: &'a VolumeMeta,
) -> blkback::Volume<'a> {
    blkback::Volume {
        host,
        sr: d,
        dc,
        key: &v.uuid,
        slot: v.slot,
    }
}

/// Refuses when the volume's blkback runs as primary here (the volume is active here).
fn not_active_here(
    host: &HostConfig,
    d: &SrDir,
    dc: &DeviceConfig,
    v: &VolumeMeta,
) -> SrResult<()> {
    if let Some((_, Role::Primary)) = bb(host, d, dc, v).running()? {
        return Err(SrError::failed(format!(
            "volume {} is active on this host (a VM uses it): deactivate it first",
            v.uuid
        )));
    }
    Ok(())
}

/// Dispatches `SR.*` and `Volume.*`.
pub fn call(host: &HostConfig, method: &str, a: &Args) -> SrResult<Value> {
    match method {
        "sr.create" => {
            let uuid = check_id("uuid", a.str("uuid")?)?;
            let mut dc = DeviceConfig::parse(a.value("configuration")?)?;
            dc.peer_of(&host.me()?)?;
            dc.uuid = Some(uuid.to_string());
            let d = SrDir::new(host, uuid)?;
            let _l = d.lock()?;
            if d.exists() {
                return Err(SrError::failed(format!(
                    "SR {uuid} already exists on this host"
                )));
            }
            let st = SrState {
                uuid: uuid.into(),
                name: a.str("name")?.into(),
                description: a.str("description")?.into(),
                config: dc.to_json(),
                attached: false,
                volumes: Default::default(),
            };
            d.save(&st)?;
            Ok(dc.to_json())
        }
        "sr.attach" => {
            let dc = DeviceConfig::parse(a.value("configuration")?)?;
            dc.peer_of(&host.me()?)?;
            let uuid = dc.uuid.clone().ok_or_else(|| {
                SrError::bad_args("configuration has no uuid: attach what SR.create returned")
            })?;
            let d = SrDir::new(host, &uuid)?;
            let _l = d.lock()?;
            let mut st = if d.exists() {
                d.load()?
            } else {
                SrState {
                    uuid: uuid.clone(),
                    name: String::new(),
                    description: String::new(),
                    config: dc.to_json(),
                    attached: false,
                    volumes: Default::default(),
                }
            };
            st.attached = true;
            d.save(&st)?;
            Ok(Value::String(uuid))
        }
        "sr.detach" => {
            let d = SrDir::new(host, a.str("sr")?)?;
            if !d.exists() {
                return Ok(Value::Null);
            }
            let _l = d.lock()?;
            let mut st = d.load()?;
            let dc = SrDir::device_config(&st)?;
            for v in st.volumes.values() {
                not_active_here(host, &d, &dc, v)?;
            }
            for v in st.volumes.values() {
                bb(host, &d, &dc, v).stop()?;
            }
            st.attached = false;
            d.save(&st)?;
            Ok(Value::Null)
        }
        "sr.destroy" => {
            let (d, st) = attached(host, a.str("sr")?)?;
            let _l = d.lock()?;
            let dc = SrDir::device_config(&st)?;
            for v in st.volumes.values() {
                not_active_here(host, &d, &dc, v)?;
            }
            for v in st.volumes.values() {
                destroy_everywhere(host, &d, &st, &dc, v)?;
            }
            if let Err(e) = peer::call(host, "Peer.forget_sr", &json!({"sr": st.uuid})) {
                eprintln!("xenft-sr: peer did not forget SR {}: {e}", st.uuid);
            }
            std::fs::remove_dir_all(&d.dir).map_err(io(d.dir.display()))?;
            let _ = std::fs::remove_dir_all(&d.run);
            Ok(Value::Null)
        }
        "sr.stat" => {
            let (d, st) = attached(host, a.str("sr")?)?;
            let fs = nix::sys::statvfs::statvfs(&d.dir)
                .map_err(|e| SrError::failed(format!("statvfs {}: {e}", d.dir.display())))?;
            let frag = fs.fragment_size();
            Ok(json!({
                "sr": st.uuid,
                "name": st.name,
                "uuid": st.uuid,
                "description": st.description,
                "free_space": fs.blocks_available().saturating_mul(frag),
                "total_space": fs.blocks().saturating_mul(frag),
                "datasources": [],
                "clustered": false,
                "health": ["Healthy", ""],
            }))
        }
        "sr.ls" => {
            let (d, st) = attached(host, a.str("sr")?)?;
            Ok(Value::Array(
                st.volumes.values().map(|v| volume_json(&d, v)).collect(),
            ))
        }
        "sr.set_name" | "sr.set_description" => {
            let (d, _) = attached(host, a.str("sr")?)?;
            let _l = d.lock()?;
            let mut st = d.load()?;
            if method == "sr.set_name" {
                st.name = a.str("new_name")?.into();
            } else {
                st.description = a.str("new_description")?.into();
            }
            d.save(&st)?;
            Ok(Value::Null)
        }
        _ => volume_call(host, method, a),
    }
}

fn volume_call(host: &HostConfig, method: &str, a: &Args) -> SrResult<Value> {
    let (d, _) = attached(host, a.str("sr")?)?;
    let _l = d.lock()?;
    let mut st = d.load()?;
    let dc = SrDir::device_config(&st)?;
    match method {
        "volume.create" => {
            let size = a.size("size")?;
            if size == 0 || size > MAX_SIZE {
                return Err(SrError::bad_args(format!(
                    "size {size}: between 1 byte and {MAX_SIZE} bytes"
                )));
            }
            let size = size.div_ceil(4096) * 4096;
            let slot = (0..MAX_SLOTS)
                .find(|s| st.volumes.values().all(|v| v.slot != *s))
                .ok_or_else(|| {
                    SrError::failed(format!("the SR holds {MAX_SLOTS} volumes: full"))
                })?;
            let key = new_uuid();
            let v = VolumeMeta {
                uuid: key.clone(),
                name: a.str("name")?.into(),
                description: a.str("description")?.into(),
                size,
                slot,
                keys: Default::default(),
                sharable: a
                    .0
                    .get("sharable")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            };
            d.ensure_disk(&key, size)?;
            st.volumes.insert(key, v.clone());
            d.save(&st)?;
            tell_peer(host, &st, &v)?;
            Ok(volume_json(&d, &v))
        }
        "volume.stat" => {
            let key = check_id("key", a.str("key")?)?;
            Ok(volume_json(&d, volume(&mut st, key)?))
        }
        "volume.destroy" => {
            let key = check_id("key", a.str("key")?)?;
            let v = volume(&mut st, key)?.clone();
            not_active_here(host, &d, &dc, &v)?;
            destroy_everywhere(host, &d, &st, &dc, &v)?;
            st.volumes.remove(key);
            d.save(&st)?;
            Ok(Value::Null)
        }
        "volume.resize" => {
            let key = check_id("key", a.str("key")?)?;
            let new_size = a.size("new_size")?;
            let mut v = volume(&mut st, key)?.clone();
            if new_size < v.size {
                return Err(SrError::unimplemented(format!(
                    "volume {key}: shrinking ({} to {new_size} bytes) is not supported",
                    v.size
                )));
            }
            if new_size > MAX_SIZE {
                return Err(SrError::bad_args(format!(
                    "new_size {new_size} over {MAX_SIZE}"
                )));
            }
            not_active_here(host, &d, &dc, &v)?;
            v.size = new_size.div_ceil(4096) * 4096;
            // Both copies must have the same size before the mirror runs again: the peer's
            // secondary is stopped and its file grown first (it refuses while active there).
            tell_peer(host, &st, &v)?;
            bb(host, &d, &dc, &v).stop()?;
            d.ensure_disk(key, v.size)?;
            st.volumes.insert(key.into(), v);
            d.save(&st)?;
            Ok(Value::Null)
        }
        "volume.set_name" | "volume.set_description" | "volume.set" | "volume.unset" => {
            let key = check_id("key", a.str("key")?)?;
            let v = volume(&mut st, key)?;
            match method {
                "volume.set_name" => v.name = a.str("new_name")?.into(),
                "volume.set_description" => v.description = a.str("new_description")?.into(),
                "volume.set" => {
                    v.keys.insert(a.str("k")?.into(), a.str("v")?.into());
                }
                _ => {
                    v.keys.remove(a.str("k")?);
                }
            }
            let v = v.clone();
            d.save(&st)?;
            tell_peer(host, &st, &v)?;
            Ok(Value::Null)
        }
        "volume.snapshot" | "volume.clone" | "volume.copy" => Err(SrError::unimplemented(format!(
            "{method}: a xenft volume is a synchronous mirror between two hosts and keeps no \
             snapshots or clones; copy the disk to another SR (VDI.copy from a halted VM) instead"
        ))),
        _ => Err(SrError::unimplemented(format!(
            "{method} is not implemented by the xenft SR"
        ))),
    }
}

/// Removes a volume on the peer (which refuses while active there), then here.
fn destroy_everywhere(
    host: &HostConfig,
    d: &SrDir,
    st: &SrState,
    dc: &DeviceConfig,
    v: &VolumeMeta,
) -> SrResult<()> {
    match peer::call(host, "Peer.destroy", &json!({"sr": st.uuid, "key": v.uuid})) {
        Ok(_) => {}
        Err(e) if peer::is_active_elsewhere(&e) => return Err(e),
        Err(e) => eprintln!("xenft-sr: peer did not destroy volume {}: {e}", v.uuid),
    }
    bb(host, d, dc, v).stop()?;
    d.remove_volume_files(&v.uuid)
}
