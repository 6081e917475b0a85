//! The pool-wide protection registry, kept in xapi's own database.
//!
//! - pool `other_config["xenft.pool"]`: JSON [`PoolConfig`] (format version, A-link addresses
//!   per host, quorum servers, policy, the uuid of the xapi `secret` holding the A-link key);
//! - VM `other_config["xenft.level"]` (`1`/`2`/`3`), `["xenft.secondary"]` (host uuid: refs are
//!   not permanent), `["xenft.state"]` (written by the CLI and the agent).
//!
//! Every XenAPI client (XenCenter, `xe`, scripts) sees and may edit these. So:
//! - a malformed value or an unknown `format_version` is reported ([`RegistryError`]) and never
//!   overwritten blindly;
//! - xenft writers serialise on a pool lock ([`with_pool_lock`]): the key
//!   `other_config["xenft.lock"]` on the pool, taken with `pool.add_to_other_config`, which xapi
//!   makes atomic (it fails with `MAP_DUPLICATE_KEY` when the key exists). The value names the
//!   holder and a time; a lock older than [`LOCK_STALE_SECS`] is broken (holder crashed).
//! - every write is also a read-modify-write with a check ([`checked_set`]): the key must still
//!   hold the value we read, the add must not hit `MAP_DUPLICATE_KEY` (someone added it after
//!   our remove), and a re-read must show our value. This catches writers that do not take the
//!   lock (an admin with `xe pool-param-set`): XenAPI has no compare-and-swap, so such a writer
//!   acting within one round trip of ours can still be lost; everything else becomes a
//!   [`RegistryError::Conflict`], never a silent loss.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::Class;
use crate::client::XenApi;
use crate::error::{codes, XapiError};

/// Pool key holding [`PoolConfig`].
pub const POOL_KEY: &str = "xenft.pool";
/// VM key: protection level.
pub const VM_LEVEL: &str = "xenft.level";
/// VM key: secondary host uuid.
pub const VM_SECONDARY: &str = "xenft.secondary";
/// VM key: protection state.
pub const VM_STATE: &str = "xenft.state";
/// Host key: result of the last compatibility check (JSON [`crate::ops::CompatReport`]).
pub const HOST_COMPAT: &str = "xenft.compat";
/// The [`PoolConfig`] format this build writes and reads.
pub const FORMAT_VERSION: u64 = 1;
/// Retries of a read-modify-write after a conflict.
pub const MAX_ATTEMPTS: u32 = 3;
/// Pool key of the writers' lock.
pub const LOCK_KEY: &str = "xenft.lock";
/// A lock older than this is considered abandoned.
pub const LOCK_STALE_SECS: u64 = 30;
/// How long to wait for the lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What can be wrong with the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A registry value is not what this version understands; it was left untouched.
    #[error("registry value {key} on {object} is malformed ({reason}); left untouched: {excerpt}")]
    Malformed {
        /// The key.
        key: String,
        /// Pool or VM (name/uuid).
        object: String,
        /// Why it does not parse.
        reason: String,
        /// The start of the value.
        excerpt: String,
    },
    /// `xenft.pool` was written by a newer (or unknown) xenft.
    #[error(
        "registry {POOL_KEY} has format_version {found}; this xenft understands {FORMAT_VERSION} \
         (upgrade xenft on this machine); left untouched"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u64,
    },
    /// Another client changed the value between our read and our write.
    #[error(
        "concurrent change of {key} on {object}: expected {expected:?}, found {found:?}; \
         re-read and try again"
    )]
    Conflict {
        /// The key.
        key: String,
        /// Pool or VM.
        object: String,
        /// What we read before.
        expected: Option<String>,
        /// What is there now.
        found: Option<String>,
    },
    /// Another xenft client holds the pool lock for too long.
    #[error("registry is locked by {holder} (waited {waited_secs} s); try again")]
    Locked {
        /// The lock value (holder and time).
        holder: String,
        /// How long we waited.
        waited_secs: u64,
    },
    /// The pool has no `xenft.pool` yet.
    #[error("this pool is not initialised for xenft (run `xenft pool-init`)")]
    NotInitialised,
    /// A XenAPI call failed.
    #[error(transparent)]
    Api(#[from] XapiError),
}

/// A-link endpoints of one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HostLinks {
    /// Host name label (informative; the map key is the uuid).
    #[serde(default)]
    pub name: String,
    /// `ip:port` of each A-link endpoint on this host, in path order.
    pub alinks: Vec<String>,
}

/// Pool-wide policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Heartbeat period, milliseconds.
    pub heartbeat_ms: u32,
    /// Missed heartbeats before a peer is suspected.
    pub suspect_after: u32,
    /// `auto`: fail over when quorum allows; `manual`: only report.
    pub failover: String,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            heartbeat_ms: 100,
            suspect_after: 5,
            failover: "auto".into(),
        }
    }
}

/// `other_config["xenft.pool"]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// Must be [`FORMAT_VERSION`].
    pub format_version: u64,
    /// Host uuid → A-link endpoints.
    pub hosts: BTreeMap<String, HostLinks>,
    /// `host:port` of quorum servers.
    #[serde(default)]
    pub quorum_servers: Vec<String>,
    /// Policy.
    #[serde(default)]
    pub policy: Policy,
    /// uuid of the xapi `secret` object holding the A-link key (the key itself is never
    /// stored in `other_config`, which every read-only user can see).
    #[serde(default)]
    pub secret_uuid: Option<String>,
}

fn excerpt(s: &str) -> String {
    let mut e: String = s.chars().take(60).collect();
    if s.chars().count() > 60 {
        e.push('…');
    }
    e
}

/// Parses the `xenft.pool` value: version first, then the structure.
pub fn parse_pool_config(raw: &str, object: &str) -> Result<PoolConfig, RegistryError> {
    let malformed = |reason: String| RegistryError::Malformed {
        key: POOL_KEY.into(),
        object: object.into(),
        reason,
        excerpt: excerpt(raw),
    };
    let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| malformed(e.to_string()))?;
    let found = v
        .get("format_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| malformed("no numeric format_version".into()))?;
    if found != FORMAT_VERSION {
        return Err(RegistryError::UnsupportedVersion { found });
    }
    serde_json::from_value(v).map_err(|e| malformed(e.to_string()))
}

/// Serialises a [`PoolConfig`].
pub fn encode_pool_config(c: &PoolConfig) -> String {
    serde_json::to_string(c).unwrap_or_default()
}

/// Protection level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(into = "u8")]
pub enum Level {
    /// Level 1: restart on the secondary after a host failure.
    Restart,
    /// Level 2: component-level FT (disk mirroring, device redirect).
    Component,
    /// Level 3: system-level FT (checkpointing).
    System,
}

impl From<Level> for u8 {
    fn from(l: Level) -> u8 {
        match l {
            Level::Restart => 1,
            Level::Component => 2,
            Level::System => 3,
        }
    }
}

impl Level {
    /// Parses `1`, `2` or `3`.
    pub fn parse(s: &str) -> Option<Level> {
        match s.trim() {
            "1" => Some(Level::Restart),
            "2" => Some(Level::Component),
            "3" => Some(Level::System),
            _ => None,
        }
    }

    /// `1`, `2` or `3`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Restart => "1",
            Level::Component => "2",
            Level::System => "3",
        }
    }
}

/// A VM's protection as recorded in its `other_config`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct VmProtection {
    /// Level, if protected.
    pub level: Option<Level>,
    /// Secondary host uuid.
    pub secondary: Option<String>,
    /// State string (`pending`, `protected`, ..., `error: ...`).
    pub state: Option<String>,
}

impl VmProtection {
    /// Reads the xenft keys of a VM's `other_config`; a malformed level is an error.
    pub fn from_other_config(
        oc: &BTreeMap<String, String>,
        object: &str,
    ) -> Result<VmProtection, RegistryError> {
        let level = match oc.get(VM_LEVEL).map(String::as_str) {
            None | Some("") => None,
            Some(l) => Some(Level::parse(l).ok_or_else(|| RegistryError::Malformed {
                key: VM_LEVEL.into(),
                object: object.into(),
                reason: "level must be 1, 2 or 3".into(),
                excerpt: excerpt(l),
            })?),
        };
        Ok(VmProtection {
            level,
            secondary: oc.get(VM_SECONDARY).filter(|s| !s.is_empty()).cloned(),
            state: oc.get(VM_STATE).cloned(),
        })
    }
}

/// Sets (`Some`) or removes (`None`) `key` in `class`'s map `field` of `r`, provided it still
/// holds `expected`; see the module docs for the guarantees.
pub async fn checked_set(
    api: &XenApi,
    class: Class,
    r: &str,
    field: &str,
    key: &str,
    expected: Option<&str>,
    new: Option<&str>,
) -> Result<(), RegistryError> {
    let conflict = |found: Option<String>| RegistryError::Conflict {
        key: key.into(),
        object: format!("{} {r}", class.api_name()),
        expected: expected.map(str::to_string),
        found,
    };
    let before = api.get_map(class, r, field).await?;
    if before.get(key).map(String::as_str) != expected {
        return Err(conflict(before.get(key).cloned()));
    }
    if expected == new {
        return Ok(());
    }
    if expected.is_some() {
        api.remove_from_map(class, r, field, key).await?;
    }
    if let Some(v) = new {
        match api.add_to_map(class, r, field, key, v).await {
            Err(e) if e.is(codes::MAP_DUPLICATE_KEY) => {
                let now = api.get_map(class, r, field).await?;
                return Err(conflict(now.get(key).cloned()));
            }
            r => r?,
        }
    }
    let after = api.get_map(class, r, field).await?;
    if after.get(key).map(String::as_str) != new {
        return Err(conflict(after.get(key).cloned()));
    }
    Ok(())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs `f` holding the pool's xenft writers' lock (see the module docs).
pub async fn with_pool_lock<T, E>(
    api: &XenApi,
    f: impl AsyncFnOnce() -> Result<T, E>,
) -> Result<T, E>
where
    E: From<RegistryError>,
{
    let (pool, _) = api.the_pool().await.map_err(RegistryError::from)?;
    let token: u64 = rand::random();
    let mine = format!("{token:016x}@{}", now_secs());
    let started = std::time::Instant::now();
    loop {
        match api
            .add_to_map(Class::Pool, &pool, "other_config", LOCK_KEY, &mine)
            .await
        {
            Ok(()) => break,
            Err(e) if e.is(codes::MAP_DUPLICATE_KEY) => {
                let held = api
                    .get_map(Class::Pool, &pool, "other_config")
                    .await
                    .map_err(RegistryError::from)?
                    .get(LOCK_KEY)
                    .cloned();
                let Some(held) = held else { continue };
                let since = held
                    .rsplit_once('@')
                    .and_then(|(_, t)| t.parse::<u64>().ok())
                    .unwrap_or(0);
                if now_secs().saturating_sub(since) > LOCK_STALE_SECS {
                    tracing::warn!(holder = %held, "breaking an abandoned registry lock");
                    checked_set(
                        api,
                        Class::Pool,
                        &pool,
                        "other_config",
                        LOCK_KEY,
                        Some(&held),
                        None,
                    )
                    .await
                    .or_else(|e| match e {
                        RegistryError::Conflict { .. } => Ok(()),
                        e => Err(e),
                    })?;
                    continue;
                }
                if started.elapsed() > LOCK_WAIT {
                    return Err(RegistryError::Locked {
                        holder: held,
                        waited_secs: LOCK_WAIT.as_secs(),
                    }
                    .into());
                }
                let jitter = u64::from(rand::random::<u8>() % 50);
                tokio::time::sleep(std::time::Duration::from_millis(20 + jitter)).await;
            }
            Err(e) => return Err(RegistryError::from(e).into()),
        }
    }
    let r = f().await;
    // Release only our own lock.
    match api.get_map(Class::Pool, &pool, "other_config").await {
        Ok(m) if m.get(LOCK_KEY) == Some(&mine) => {
            if let Err(e) = api
                .remove_from_map(Class::Pool, &pool, "other_config", LOCK_KEY)
                .await
            {
                tracing::warn!("cannot release the registry lock: {e}");
            }
        }
        Ok(_) => tracing::warn!("registry lock was broken while held"),
        Err(e) => tracing::warn!("cannot release the registry lock: {e}"),
    }
    r
}

/// Every guest with xenft keys, for the agent: `(ref, record, protection or why it is
/// malformed)`. VMs without any `xenft.level` are left out.
pub async fn protected_vms(
    api: &XenApi,
) -> Result<
    Vec<(
        String,
        crate::api::VmRecord,
        Result<VmProtection, RegistryError>,
    )>,
    XapiError,
> {
    Ok(api
        .vm_get_all_records()
        .await?
        .into_iter()
        .filter(|(_, v)| v.is_guest() && v.other_config.contains_key(VM_LEVEL))
        .map(|(r, v)| {
            let p = VmProtection::from_other_config(&v.other_config, &v.name_label);
            (r, v, p)
        })
        .collect())
}

/// Sets a VM's `xenft.state` (the agent reports progress: `protecting`, `protected`,
/// `degraded: ...`, `failed-over`, ...). A checked write against the value read just before.
pub async fn set_vm_state(api: &XenApi, vm_ref: &str, state: &str) -> Result<(), RegistryError> {
    let current = api.get_map(Class::Vm, vm_ref, "other_config").await?;
    checked_set(
        api,
        Class::Vm,
        vm_ref,
        "other_config",
        VM_STATE,
        current.get(VM_STATE).map(String::as_str),
        Some(state),
    )
    .await
}

/// Reads the pool's registry: `(pool ref, config or None, raw value)`.
pub async fn read_pool_config(
    api: &XenApi,
) -> Result<(String, Option<PoolConfig>, Option<String>), RegistryError> {
    let (pool, rec) = api.the_pool().await?;
    match rec.other_config.get(POOL_KEY) {
        None => Ok((pool, None, None)),
        Some(raw) => {
            let c = parse_pool_config(raw, &format!("pool {}", rec.name_label))?;
            Ok((pool, Some(c), Some(raw.clone())))
        }
    }
}

/// Read-modify-write of `xenft.pool` under the pool lock, retried on conflict. `f` gets the
/// current config (None if absent) and returns the new one. Malformed or unknown-version values
/// stop the update.
pub async fn update_pool_config<F>(api: &XenApi, f: F) -> Result<PoolConfig, RegistryError>
where
    F: FnMut(Option<PoolConfig>) -> Result<PoolConfig, RegistryError>,
{
    with_pool_lock(api, async || update_pool_config_locked(api, f).await).await
}

/// [`update_pool_config`] for a caller that already holds the pool lock.
pub async fn update_pool_config_locked<F>(
    api: &XenApi,
    mut f: F,
) -> Result<PoolConfig, RegistryError>
where
    F: FnMut(Option<PoolConfig>) -> Result<PoolConfig, RegistryError>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (pool, current, raw) = read_pool_config(api).await?;
        let new = f(current)?;
        let encoded = encode_pool_config(&new);
        match checked_set(
            api,
            Class::Pool,
            &pool,
            "other_config",
            POOL_KEY,
            raw.as_deref(),
            Some(&encoded),
        )
        .await
        {
            Err(RegistryError::Conflict { .. }) if attempt < MAX_ATTEMPTS => {
                tracing::info!(attempt, "concurrent change of {POOL_KEY}; retrying");
            }
            Err(e) => return Err(e),
            Ok(()) => return Ok(new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PoolConfig {
        let mut hosts = BTreeMap::new();
        hosts.insert(
            "uuid-1".to_string(),
            HostLinks {
                name: "host1".into(),
                alinks: vec!["10.1.0.1:7000".into(), "10.2.0.1:7000".into()],
            },
        );
        PoolConfig {
            format_version: FORMAT_VERSION,
            hosts,
            quorum_servers: vec!["10.0.0.9:7100".into()],
            policy: Policy::default(),
            secret_uuid: None,
        }
    }

    #[test]
    fn pool_config_round_trips() {
        let c = sample();
        assert_eq!(parse_pool_config(&encode_pool_config(&c), "p").unwrap(), c);
    }

    #[test]
    fn unknown_version_and_garbage_are_reported() {
        assert!(matches!(
            parse_pool_config(r#"{"format_version": 7, "whatever": 1}"#, "p"),
            Err(RegistryError::UnsupportedVersion { found: 7 })
        ));
        for bad in [
            "{",
            "[]",
            r#"{"format_version": "1"}"#,
            r#"{"format_version": 1}"#,
        ] {
            assert!(
                matches!(
                    parse_pool_config(bad, "p"),
                    Err(RegistryError::Malformed { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn vm_level_must_be_one_two_or_three() {
        let mut oc = BTreeMap::new();
        oc.insert(VM_LEVEL.to_string(), "2".to_string());
        oc.insert(VM_SECONDARY.to_string(), "h".to_string());
        let p = VmProtection::from_other_config(&oc, "vm").unwrap();
        assert_eq!(p.level, Some(Level::Component));
        oc.insert(VM_LEVEL.to_string(), "high".to_string());
        assert!(VmProtection::from_other_config(&oc, "vm").is_err());
    }
}
