//! `Datapath.*` (the datapath plugin, `ocaml/xapi-storage/generator/lib/data.ml`) and the
//! internal `Peer.*` methods the other host's plugin calls.
//!
//! The primary side follows where the VM runs: `Datapath.activate` on a host makes that
//! host's blkback the primary (promoting its running secondary in place, or starting one) and
//! asks the peer to hold the copy as secondary (`Peer.standby`); the peer refuses with
//! `Activated_on_another_host` while its own blkback of the volume is the primary. A peer that
//! cannot be reached does not stop the activation (its host may be dead: that is the failover
//! case; fencing a host that is only cut off is the agent's job, before xapi restarts the VM):
//! the primary then runs degraded, recording writes in its dirty bitmap until the peer's
//! secondary returns. `Datapath.deactivate` stops the primary cleanly (store synced, bitmap
//! clean); the peer's secondary keeps running, ready to be promoted by an activation there
//! (migration, restart elsewhere).

use serde_json::{json, Value};

use crate::blkback::{self, Role};
use crate::config::{check_id, Args, DeviceConfig, HostConfig};
use crate::error::{SrError, SrResult};
use crate::peer;
use crate::state::{SrDir, SrState, VolumeMeta, MAX_SIZE};
use crate::volume_ops::{attached, SCHEME};

/// Splits a volume URI `xenft://<sr uuid>/<volume key>`.
fn parse_uri(uri: &str) -> SrResult<(&str, &str)> {
    let rest = uri
        .strip_prefix(SCHEME)
        .and_then(|r| r.strip_prefix("://"))
        .ok_or_else(|| SrError::bad_args(format!("uri {uri:?} is not {SCHEME}://SR/VOLUME")))?;
    let (sr, key) = rest
        .split_once('/')
        .ok_or_else(|| SrError::bad_args(format!("uri {uri:?} is not {SCHEME}://SR/VOLUME")))?;
    Ok((check_id("SR in uri", sr)?, check_id("volume in uri", key)?))
}

struct Target {
    d: SrDir,
    st: SrState,
    dc: DeviceConfig,
    v: VolumeMeta,
}

fn target(host: &HostConfig, a: &Args) -> SrResult<Target> {
    let (sr, key) = parse_uri(a.str("uri")?)?;
    let (d, st) = attached(host, sr)?;
    let dc = SrDir::device_config(&st)?;
    let v = st
        .volumes
        .get(key)
        .cloned()
        .ok_or_else(|| SrError::no_volume(key))?;
    Ok(Target { d, st, dc, v })
}

impl Target {
    fn bb<'a>(&'a self, host: &'a HostConfig) -> blkback::Volume<'a> {
        blkback::Volume {
            host,
            sr: &self.d,
            dc: &self.dc,
            key: &self.v.uuid,
            slot: self.v.slot,
        }
    }
}

/// Dispatches `Datapath.*`.
pub fn call(host: &HostConfig, method: &str, a: &Args) -> SrResult<Value> {
    let _domain = a.str("domain").ok();
    match method {
        "datapath.open" => {
            if a.0.get("persistent").and_then(Value::as_bool) == Some(false) {
                return Err(SrError::unimplemented(
                    "non-persistent xenft volumes are not supported",
                ));
            }
            target(host, a).map(|_| Value::Null)
        }
        "datapath.close" => target(host, a).map(|_| Value::Null),
        "datapath.attach" => {
            let t = target(host, a)?;
            let sock = t.bb(host).nbd_socket()?;
            let s = sock.display().to_string();
            // `Storage_interface.parse_nbd_uri` splits the URI on ':' into exactly four parts.
            if s.contains(':') {
                return Err(SrError::failed(format!(
                    "NBD socket path {s} contains ':' which the NBD URI cannot carry"
                )));
            }
            Ok(json!({"implementations": [
                ["XenDisk", {"backend_type": "vbd3", "params": format!("nbd:{s}"), "extra": {}}],
                ["Nbd", {"uri": format!("nbd:unix:{s}:exportname={}", t.v.uuid)}],
            ]}))
        }
        "datapath.activate" => activate(host, &target(host, a)?),
        "datapath.deactivate" | "datapath.detach" => {
            // Idempotent, and detach must never fail (data.ml): a missing volume is done.
            let t = match target(host, a) {
                Ok(t) => t,
                Err(e) if method == "datapath.detach" => {
                    eprintln!("xenft-sr: detach: {e}");
                    return Ok(Value::Null);
                }
                Err(e) => return Err(e),
            };
            let _l = t.d.lock()?;
            if let Some((_, Role::Primary)) = t.bb(host).running()? {
                t.bb(host).stop()?;
            }
            Ok(Value::Null)
        }
        "datapath.activate_readonly" => Err(SrError::unimplemented(
            "read-only activation is not supported by the xenft SR",
        )),
        _ => Err(SrError::unimplemented(format!(
            "{method} is not implemented by the xenft SR"
        ))),
    }
}

fn activate(host: &HostConfig, t: &Target) -> SrResult<Value> {
    let _l = t.d.lock()?;
    let b = t.bb(host);
    if let Some((_, Role::Primary)) = b.running()? {
        return Ok(Value::Null);
    }
    let args = json!({"sr": t.st.uuid, "configuration": t.st.config, "volume": t.v});
    match peer::call(host, "Peer.standby", &args) {
        Ok(_) => {}
        Err(e) if peer::is_active_elsewhere(&e) => return Err(e),
        Err(e) => eprintln!(
            "xenft-sr: peer unreachable, volume {} runs degraded: {e}",
            t.v.uuid
        ),
    }
    match b.running()? {
        Some((pid, Role::Secondary)) => b.promote(pid)?,
        _ => {
            t.d.ensure_disk(&t.v.uuid, t.v.size)?;
            b.start(Role::Primary)?;
        }
    }
    Ok(Value::Null)
}

/// Dispatches `Peer.*` (called by the other host's plugin).
pub fn peer_call(host: &HostConfig, method: &str, a: &Args) -> SrResult<Value> {
    let sr = check_id("sr", a.str("sr")?)?;
    let d = SrDir::new(host, sr)?;
    let _l = d.lock()?;
    match method {
        "peer.volume" | "peer.standby" => {
            let dc = DeviceConfig::parse(a.value("configuration")?)?;
            if dc.uuid.as_deref() != Some(sr) {
                return Err(SrError::bad_args("configuration uuid differs from sr"));
            }
            dc.peer_of(&host.me()?)?;
            let v: VolumeMeta = serde_json::from_value(a.value("volume")?.clone())
                .map_err(|e| SrError::bad_args(format!("volume: {e}")))?;
            check_id("volume", &v.uuid)?;
            if v.size > MAX_SIZE || v.slot >= crate::config::MAX_SLOTS {
                return Err(SrError::bad_args("volume size or slot out of range"));
            }
            let mut st = if d.exists() {
                d.load()?
            } else {
                SrState {
                    uuid: sr.into(),
                    name: String::new(),
                    description: String::new(),
                    config: dc.to_json(),
                    attached: false,
                    volumes: Default::default(),
                }
            };
            if let Some(other) = st
                .volumes
                .values()
                .find(|o| o.slot == v.slot && o.uuid != v.uuid)
            {
                return Err(SrError::failed(format!(
                    "slot {} is volume {} here, not {}",
                    v.slot, other.uuid, v.uuid
                )));
            }
            let old = st.volumes.insert(v.uuid.clone(), v.clone());
            let b = blkback::Volume {
                host,
                sr: &d,
                dc: &dc,
                key: &v.uuid,
                slot: v.slot,
            };
            let running = b.running()?;
            if let Some((_, Role::Primary)) = running {
                if method == "peer.standby" || old.as_ref().is_some_and(|o| o.size != v.size) {
                    return Err(SrError::active_elsewhere(&host.me()?));
                }
            }
            if old.as_ref().is_some_and(|o| o.size != v.size) {
                b.stop()?;
            }
            d.ensure_disk(&v.uuid, v.size)?;
            d.save(&st)?;
            if method == "peer.standby" && b.running()?.is_none() {
                b.start(Role::Secondary)?;
            }
            Ok(Value::Null)
        }
        "peer.destroy" => {
            if !d.exists() {
                return Ok(Value::Null);
            }
            let key = check_id("key", a.str("key")?)?;
            let mut st = d.load()?;
            let dc = SrDir::device_config(&st)?;
            if let Some(v) = st.volumes.get(key).cloned() {
                let b = blkback::Volume {
                    host,
                    sr: &d,
                    dc: &dc,
                    key,
                    slot: v.slot,
                };
                if let Some((_, Role::Primary)) = b.running()? {
                    return Err(SrError::active_elsewhere(&host.me()?));
                }
                b.stop()?;
            }
            d.remove_volume_files(key)?;
            st.volumes.remove(key);
            d.save(&st)?;
            Ok(Value::Null)
        }
        "peer.forget_sr" => {
            if d.exists() {
                let st = d.load()?;
                if st.attached || !st.volumes.is_empty() {
                    return Err(SrError::failed(format!(
                        "SR {sr} is attached or holds volumes on the peer: not removed there"
                    )));
                }
                std::fs::remove_dir_all(&d.dir)
                    .map_err(|e| SrError::failed(format!("{}: {e}", d.dir.display())))?;
            }
            let _ = std::fs::remove_dir_all(&d.run);
            Ok(Value::Null)
        }
        _ => Err(SrError::unimplemented(format!(
            "unknown peer method {method}"
        ))),
    }
}
