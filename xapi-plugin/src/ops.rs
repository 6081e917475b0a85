//! The operations behind the CLI, the host plugin and the XenCenter watcher: name resolution,
//! admission control, protect/unprotect, status, pool-init, compat check, migrate.
//!
//! They all go through XenAPI only, so the result is the same whichever front end asked.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::api::{Class, HostRecord, Ref, VmRecord};
use crate::client::XenApi;
use crate::customfields::{value_key, FIELD_LEVEL, FIELD_SECONDARY};
use crate::error::XapiError;
use crate::registry::{
    self, checked_set, HostLinks, Level, Policy, PoolConfig, RegistryError, VmProtection,
    HOST_COMPAT, VM_LEVEL, VM_SECONDARY, VM_STATE,
};

/// Why an operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// No object by that name or uuid.
    #[error("no {class} named {name:?}{}", suggestion.as_ref().map(|s| format!("; did you mean {s:?}?")).unwrap_or_default())]
    NotFound {
        /// `VM` or `host`.
        class: &'static str,
        /// What the user typed.
        name: String,
        /// The closest existing name.
        suggestion: Option<String>,
    },
    /// Several objects share that name.
    #[error("{} {class}s are named {name:?}; use a uuid: {}", candidates.len(), candidates.join(", "))]
    Ambiguous {
        /// `VM` or `host`.
        class: &'static str,
        /// The name.
        name: String,
        /// Their uuids.
        candidates: Vec<String>,
    },
    /// Admission control said no.
    #[error("refused: {0}")]
    Refused(String),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// The registry is malformed, from a newer version, or was changed concurrently.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A XenAPI call failed.
    #[error(transparent)]
    Api(#[from] XapiError),
}

/// Levenshtein distance (for "did you mean").
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest of `names` to `name`, if close enough to be a plausible typo.
pub fn suggest<'a>(name: &str, names: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let limit = (name.chars().count() / 3).max(2);
    names
        .into_iter()
        .map(|n| (distance(&name.to_lowercase(), &n.to_lowercase()), n))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n.to_string())
}

pub(crate) fn resolve<'a, T>(
    class: &'static str,
    name: &str,
    all: &'a BTreeMap<Ref, T>,
    uuid: fn(&T) -> &str,
    label: fn(&T) -> &str,
) -> Result<(Ref, &'a T), OpError> {
    if let Some((r, rec)) = all.iter().find(|(_, rec)| uuid(rec) == name) {
        return Ok((r.clone(), rec));
    }
    let matches: Vec<_> = all.iter().filter(|(_, rec)| label(rec) == name).collect();
    match matches.as_slice() {
        [(r, rec)] => Ok(((*r).clone(), *rec)),
        [] => Err(OpError::NotFound {
            class,
            name: name.to_string(),
            suggestion: suggest(name, all.values().map(label)),
        }),
        many => Err(OpError::Ambiguous {
            class,
            name: name.to_string(),
            candidates: many.iter().map(|(_, rec)| uuid(rec).to_string()).collect(),
        }),
    }
}

/// Finds a guest VM by name label or uuid. A name or uuid that only a control domain, a
/// template or a snapshot carries is refused, saying which it is: xapi lists those among the
/// VMs, and xenft manages guests only.
pub fn resolve_vm<'a>(
    vms: &'a BTreeMap<Ref, VmRecord>,
    name: &str,
) -> Result<(Ref, &'a VmRecord), OpError> {
    let guests: BTreeMap<Ref, VmRecord> = vms
        .iter()
        .filter(|(_, v)| v.is_guest())
        .map(|(r, v)| (r.clone(), v.clone()))
        .collect();
    let found = resolve("VM", name, &guests, |v| &v.uuid, |v| &v.name_label);
    if let Err(OpError::NotFound { .. }) = &found {
        if let Some((v, why)) = vms
            .values()
            .filter(|v| v.uuid == name || v.name_label == name)
            .find_map(|v| v.not_a_guest().map(|why| (v, why)))
        {
            return Err(OpError::Refused(format!(
                "VM {:?} ({}) is {why}, not a guest VM: xenft protects and manages guest VMs only",
                v.name_label, v.uuid
            )));
        }
    }
    let (r, _) = found?;
    let rec = vms
        .get(&r)
        .ok_or_else(|| OpError::Invalid(format!("VM {name} vanished")))?;
    Ok((r, rec))
}

/// Finds a host by name label, hostname or uuid.
pub fn resolve_host<'a>(
    hosts: &'a BTreeMap<Ref, HostRecord>,
    name: &str,
) -> Result<(Ref, &'a HostRecord), OpError> {
    match resolve("host", name, hosts, |h| &h.uuid, |h| &h.name_label) {
        Err(OpError::NotFound { .. }) => {
            if let Some((r, h)) = hosts.iter().find(|(_, h)| h.hostname == name) {
                return Ok((r.clone(), h));
            }
            resolve("host", name, hosts, |h| &h.uuid, |h| &h.name_label)
        }
        r => r,
    }
}

fn gib(b: i64) -> String {
    // Display only: precision loss is irrelevant here.
    #[allow(clippy::cast_precision_loss)]
    let g = b as f64 / f64::from(1u32 << 30);
    format!("{g:.2} GiB")
}

/// The memory figures behind an admission decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Admission {
    /// Bytes the VM needs (`memory_static_max`).
    pub vm_memory: i64,
    /// `host.compute_free_memory` of the secondary.
    pub host_free: i64,
    /// Memory already reserved on the secondary by other protected VMs.
    pub reserved: i64,
    /// Those VMs (name labels).
    pub reserved_for: Vec<String>,
    /// `host_free - reserved`.
    pub available: i64,
}

/// The compatibility of one host with each level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CompatReport {
    /// Host uuid.
    pub host: String,
    /// Levels this host can run.
    pub levels: Vec<u8>,
    /// Why the missing levels cannot run.
    pub reasons: Vec<String>,
    /// Facts gathered (Xen version, A-links, memory, quorum, local machine).
    #[serde(default)]
    pub facts: Vec<String>,
    /// Whether local facts (this machine is that host) were included.
    pub local_facts: bool,
}

/// Result of a protect request.
#[derive(Debug, Clone, Serialize)]
pub struct Protected {
    /// VM uuid.
    pub vm: String,
    /// VM name.
    pub name: String,
    /// Level.
    pub level: Level,
    /// Secondary host uuid.
    pub secondary: String,
    /// Secondary host name.
    pub secondary_name: String,
    /// Figures used by admission control.
    pub admission: Admission,
}

/// Protects `vm` at `level` with `secondary` as the standby host, after admission control.
/// Runs under the pool's registry lock, so two admissions onto one host cannot both pass on
/// the same free memory.
pub async fn protect(
    api: &XenApi,
    vm: &str,
    level: Level,
    secondary: &str,
) -> Result<Protected, OpError> {
    registry::with_pool_lock(api, async || {
        protect_locked(api, vm, level, secondary).await
    })
    .await
}

/// What [`admit`] found: the VM and the secondary, admitted.
pub(crate) struct Admitted {
    pub(crate) vm_ref: Ref,
    pub(crate) rec: VmRecord,
    pub(crate) host_ref: Ref,
    pub(crate) host: HostRecord,
    pub(crate) hosts: BTreeMap<Ref, HostRecord>,
    pub(crate) admission: Admission,
}

pub(crate) async fn protect_locked(
    api: &XenApi,
    vm: &str,
    level: Level,
    secondary: &str,
) -> Result<Protected, OpError> {
    let Admitted {
        vm_ref,
        rec,
        host_ref,
        host,
        hosts,
        admission,
    } = admit(api, vm, level, secondary).await?;
    // On a pool with a xenft SR, levels 2 and 3 mirror the VM's disks there.
    if u8::from(level) >= 2 {
        let storage = crate::disks::storage_of(api, &vm_ref).await?;
        crate::disks::check_for_level(&rec, level, &host.name_label, &storage)?;
    }
    let host = &host;
    let rec = &rec;
    let oc = &rec.other_config;
    let new_protection = oc.get(VM_LEVEL).is_none_or(|l| l.trim().is_empty())
        || oc.get(VM_SECONDARY) != Some(&host.uuid);
    // A protection already in place keeps the state its agents report, also when only its
    // level changes: they report the raise's `syncing` themselves, and a lowering is
    // `protected` at once (a `pending` written here would stay, their state being unchanged).
    // A new one is `pending` before the agents can see it, so never written over their state.
    if new_protection {
        set_state(api, &vm_ref, "pending").await?;
    }
    set_vm_key(api, &vm_ref, oc, VM_SECONDARY, Some(&host.uuid)).await?;
    set_vm_key(api, &vm_ref, oc, VM_LEVEL, Some(level.as_str())).await?;
    // Mirror into the XenCenter custom fields so XenCenter shows (and can change) it.
    let cf_level = value_key(FIELD_LEVEL);
    if oc.get(&cf_level).map(|s| s.trim()) != Some(level.as_str()) {
        set_vm_key(api, &vm_ref, oc, &cf_level, Some(level.as_str())).await?;
    }
    let cf_secondary = value_key(FIELD_SECONDARY);
    let same_host = oc
        .get(&cf_secondary)
        .and_then(|s| resolve_host(&hosts, s.trim()).ok())
        .is_some_and(|(r, _)| r == host_ref);
    if !same_host {
        set_vm_key(api, &vm_ref, oc, &cf_secondary, Some(&host.name_label)).await?;
    }
    Ok(Protected {
        vm: rec.uuid.clone(),
        name: rec.name_label.clone(),
        level,
        secondary: host.uuid.clone(),
        secondary_name: host.name_label.clone(),
        admission,
    })
}

/// The checks of a protect request, without writing anything: the VM and the secondary
/// resolved, the hosts' compatibility, the secondary's memory (admission control).
pub(crate) async fn admit(
    api: &XenApi,
    vm: &str,
    level: Level,
    secondary: &str,
) -> Result<Admitted, OpError> {
    // A registry we cannot read (malformed, or written by a newer xenft) stops here: its
    // writer may give the VM keys another meaning.
    if registry::read_pool_config(api).await?.1.is_none() {
        tracing::warn!("pool not initialised for xenft (run `xenft pool-init`)");
    }
    let vms = api.vm_get_all_records().await?;
    let hosts = api.host_get_all_records().await?;
    let (vm_ref, rec) = resolve_vm(&vms, vm)?;
    let (host_ref, host) = resolve_host(&hosts, secondary)?;
    if rec.resident_on == host_ref {
        return Err(OpError::Refused(format!(
            "VM {:?} runs on {:?}: the secondary must be another host",
            rec.name_label, host.name_label
        )));
    }
    if !host.enabled {
        return Err(OpError::Refused(format!(
            "host {:?} is disabled",
            host.name_label
        )));
    }
    // Compatibility, when the host has been checked.
    let mut to_check = vec![host];
    if let Some(primary) = hosts.get(&rec.resident_on) {
        to_check.push(primary);
    }
    for h in to_check {
        if let Some(raw) = h.other_config.get(HOST_COMPAT) {
            match serde_json::from_str::<CompatReport>(raw) {
                Ok(c) if !c.levels.contains(&u8::from(level)) => {
                    return Err(OpError::Refused(format!(
                        "host {:?} cannot run level {}: {}",
                        h.name_label,
                        level.as_str(),
                        c.reasons.join("; ")
                    )))
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(host = %h.name_label, "unreadable {HOST_COMPAT}: {e}"),
            }
        } else {
            tracing::warn!(host = %h.name_label, "no compatibility check recorded (run host-compat-check)");
        }
    }
    // Memory: the secondary must be able to hold this VM on top of every VM it already backs.
    let host_free = api.host_compute_free_memory(&host_ref).await?;
    let mut reserved = 0i64;
    let mut reserved_for = Vec::new();
    for (r, other) in &vms {
        if *r == vm_ref || !other.is_guest() {
            continue;
        }
        let p = match VmProtection::from_other_config(&other.other_config, &other.name_label) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(vm = %other.name_label, "ignoring malformed protection: {e}");
                continue;
            }
        };
        if p.level.is_some() && p.secondary.as_deref() == Some(host.uuid.as_str()) {
            reserved += other.memory_static_max;
            reserved_for.push(other.name_label.clone());
        }
    }
    let admission = Admission {
        vm_memory: rec.memory_static_max,
        host_free,
        reserved,
        reserved_for,
        available: host_free - reserved,
    };
    if admission.vm_memory > admission.available {
        return Err(OpError::Refused(format!(
            "secondary {:?} cannot reserve {} for VM {:?}: it has {} free, {} of it already \
             reserved for {} protected VM(s) [{}], leaving {}",
            host.name_label,
            gib(admission.vm_memory),
            rec.name_label,
            gib(admission.host_free),
            gib(admission.reserved),
            admission.reserved_for.len(),
            admission.reserved_for.join(", "),
            gib(admission.available),
        )));
    }
    Ok(Admitted {
        vm_ref,
        rec: rec.clone(),
        host_ref,
        host: host.clone(),
        hosts: hosts.clone(),
        admission,
    })
}

/// Checked write of one VM `other_config` key, expecting the value read in `oc`.
async fn set_vm_key(
    api: &XenApi,
    vm_ref: &str,
    oc: &BTreeMap<String, String>,
    key: &str,
    new: Option<&str>,
) -> Result<(), OpError> {
    checked_set(
        api,
        Class::Vm,
        vm_ref,
        "other_config",
        key,
        oc.get(key).map(String::as_str),
        new,
    )
    .await?;
    Ok(())
}

/// Removes `vm`'s protection (level and secondary) and marks it `unprotected`.
/// Returns false if it was not protected.
pub async fn unprotect(api: &XenApi, vm: &str) -> Result<bool, OpError> {
    registry::with_pool_lock(api, async || unprotect_locked(api, vm).await).await
}

pub(crate) async fn unprotect_locked(api: &XenApi, vm: &str) -> Result<bool, OpError> {
    let vms = api.vm_get_all_records().await?;
    let (vm_ref, rec) = resolve_vm(&vms, vm)?;
    let oc = &rec.other_config;
    let was = oc.contains_key(VM_LEVEL);
    for key in [
        VM_LEVEL.to_string(),
        VM_SECONDARY.to_string(),
        value_key(FIELD_LEVEL),
        value_key(FIELD_SECONDARY),
    ] {
        if oc.contains_key(&key) {
            set_vm_key(api, &vm_ref, oc, &key, None).await?;
        }
    }
    set_state(api, &vm_ref, "unprotected").await?;
    Ok(was)
}

/// Writes a VM's `xenft.state`. The agents write it too (their report, up to once a second
/// per VM), so the value is read again just before the write, and again if an agent wrote
/// in between.
async fn set_state(api: &XenApi, vm_ref: &str, state: &str) -> Result<(), OpError> {
    let mut attempt = 0;
    loop {
        match registry::set_vm_state(api, vm_ref, state).await {
            Err(RegistryError::Conflict { .. }) if attempt + 1 < registry::MAX_ATTEMPTS => {
                attempt += 1;
            }
            r => return Ok(r?),
        }
    }
}

/// One VM's protection, for `vm-status` / `vm-list`.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    /// uuid.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Power state.
    pub power_state: String,
    /// Host it runs on (name), if running.
    pub host: Option<String>,
    /// Level, if protected.
    pub level: Option<Level>,
    /// Secondary host name (or uuid if unknown).
    pub secondary: Option<String>,
    /// xenft.state.
    pub state: Option<String>,
    /// A malformed registry entry, reported rather than hidden.
    pub error: Option<String>,
}

fn vm_status(rec: &VmRecord, hosts: &BTreeMap<Ref, HostRecord>) -> VmStatus {
    let (p, error) = match VmProtection::from_other_config(&rec.other_config, &rec.name_label) {
        Ok(p) => (p, None),
        Err(e) => (VmProtection::default(), Some(e.to_string())),
    };
    let secondary = p.secondary.map(|u| {
        hosts
            .values()
            .find(|h| h.uuid == u)
            .map_or(u, |h| h.name_label.clone())
    });
    VmStatus {
        uuid: rec.uuid.clone(),
        name: rec.name_label.clone(),
        power_state: rec.power_state.clone(),
        host: hosts.get(&rec.resident_on).map(|h| h.name_label.clone()),
        level: p.level,
        secondary,
        state: p.state.or_else(|| rec.other_config.get(VM_STATE).cloned()),
        error,
    }
}

/// Status of one VM.
pub async fn status(api: &XenApi, vm: &str) -> Result<VmStatus, OpError> {
    let vms = api.vm_get_all_records().await?;
    let hosts = api.host_get_all_records().await?;
    let (_, rec) = resolve_vm(&vms, vm)?;
    Ok(vm_status(rec, &hosts))
}

/// Status of every guest VM, sorted by name.
pub async fn list(api: &XenApi) -> Result<Vec<VmStatus>, OpError> {
    let vms = api.vm_get_all_records().await?;
    let hosts = api.host_get_all_records().await?;
    let mut out: Vec<_> = vms
        .values()
        .filter(|v| v.is_guest())
        .map(|v| vm_status(v, &hosts))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
    Ok(out)
}

/// One host, for `host-list`.
#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    /// uuid.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Management address.
    pub address: String,
    /// Enabled.
    pub enabled: bool,
    /// Pool master.
    pub master: bool,
    /// Free memory for guests (bytes).
    pub free_memory: i64,
    /// A-link endpoints from the registry.
    pub alinks: Vec<String>,
    /// Levels from the last compatibility check.
    pub levels: Option<Vec<u8>>,
}

/// Every host.
pub async fn host_list(api: &XenApi) -> Result<Vec<HostStatus>, OpError> {
    let hosts = api.host_get_all_records().await?;
    let (_, pool) = api.the_pool().await?;
    let cfg = match registry::read_pool_config(api).await {
        Ok((_, c, _)) => c,
        Err(e) => {
            tracing::warn!("registry unreadable: {e}");
            None
        }
    };
    let mut out = Vec::new();
    for (r, h) in &hosts {
        out.push(HostStatus {
            uuid: h.uuid.clone(),
            name: h.name_label.clone(),
            address: h.address.clone(),
            enabled: h.enabled,
            master: *r == pool.master,
            free_memory: api.host_compute_free_memory(r).await?,
            alinks: cfg
                .as_ref()
                .and_then(|c| c.hosts.get(&h.uuid))
                .map(|l| l.alinks.clone())
                .unwrap_or_default(),
            levels: h
                .other_config
                .get(HOST_COMPAT)
                .and_then(|raw| serde_json::from_str::<CompatReport>(raw).ok())
                .map(|c| c.levels),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Pool summary for `pool-status`.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// Pool uuid.
    pub uuid: String,
    /// Registry, if initialised and readable.
    pub registry: Option<PoolConfig>,
    /// Why the registry could not be read.
    pub registry_error: Option<String>,
    /// Protected VMs per level (`"1"`, `"2"`, `"3"`).
    pub protected: BTreeMap<String, usize>,
    /// Guests in total.
    pub vms: usize,
    /// Hosts.
    pub hosts: usize,
}

/// The pool summary.
pub async fn pool_status(api: &XenApi) -> Result<PoolStatus, OpError> {
    let (_, pool) = api.the_pool().await?;
    let (registry, registry_error) = match registry::read_pool_config(api).await {
        Ok((_, c, _)) => (c, None),
        Err(RegistryError::Api(e)) => return Err(e.into()),
        Err(e) => (None, Some(e.to_string())),
    };
    let vms = list(api).await?;
    let mut protected = BTreeMap::new();
    for v in &vms {
        if let Some(l) = v.level {
            *protected.entry(l.as_str().to_string()).or_insert(0) += 1;
        }
    }
    Ok(PoolStatus {
        name: pool.name_label,
        uuid: pool.uuid,
        registry,
        registry_error,
        protected,
        vms: vms.len(),
        hosts: api.host_get_all_records().await?.len(),
    })
}

/// Arguments of `pool-init`.
#[derive(Debug, Clone, Default)]
pub struct PoolInit {
    /// Host (name or uuid) → A-link endpoints `ip:port`.
    pub alinks: Vec<(String, Vec<String>)>,
    /// Quorum servers `host:port`.
    pub quorum_servers: Vec<String>,
    /// uuid of an existing xapi secret with the A-link key.
    pub secret_uuid: Option<String>,
    /// A new A-link key to store as a xapi secret.
    pub secret_value: Option<String>,
    /// Policy (defaults if None).
    pub policy: Option<Policy>,
    /// Replace an existing registry (never a malformed or newer one).
    pub force: bool,
}

fn already_initialised() -> RegistryError {
    RegistryError::Conflict {
        key: registry::POOL_KEY.into(),
        object: "pool".into(),
        expected: None,
        found: Some("an existing configuration (use force=true to replace)".into()),
    }
}

/// Writes the pool registry and the XenCenter custom field definitions.
pub async fn pool_init(api: &XenApi, req: &PoolInit) -> Result<PoolConfig, OpError> {
    let hosts = api.host_get_all_records().await?;
    let mut links = BTreeMap::new();
    for (name, addrs) in &req.alinks {
        let (_, h) = resolve_host(&hosts, name)?;
        for a in addrs {
            if a.parse::<std::net::SocketAddr>().is_err() {
                return Err(OpError::Invalid(format!(
                    "A-link address {a:?} for host {name:?} is not ip:port"
                )));
            }
        }
        links.insert(
            h.uuid.clone(),
            HostLinks {
                name: h.name_label.clone(),
                alinks: addrs.clone(),
            },
        );
    }
    for q in &req.quorum_servers {
        if !q.contains(':') {
            return Err(OpError::Invalid(format!(
                "quorum server {q:?} is not host:port"
            )));
        }
    }
    // The A-link key lives in a xapi `secret` (readable by pool admins only), never in
    // other_config. Given, or kept from the previous init, or generated.
    let current = registry::read_pool_config(api).await?.1;
    if current.is_some() && !req.force {
        return Err(already_initialised().into());
    }
    let existing = current.and_then(|c| c.secret_uuid);
    let secret_uuid = match (&req.secret_uuid, &req.secret_value, existing) {
        (Some(u), _, _) => {
            api.get_by_uuid(Class::Secret, u).await?;
            u.clone()
        }
        (None, Some(v), _) => api.secret_create(v).await?,
        (None, None, Some(u)) => u,
        (None, None, None) => {
            let key: [u8; 32] = rand::random();
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            api.secret_create(&hex).await?
        }
    };
    let cfg = registry::update_pool_config(api, |current| {
        if current.is_some() && !req.force {
            return Err(already_initialised());
        }
        Ok(PoolConfig {
            format_version: registry::FORMAT_VERSION,
            hosts: links.clone(),
            quorum_servers: req.quorum_servers.clone(),
            policy: req.policy.clone().unwrap_or_default(),
            secret_uuid: Some(secret_uuid.clone()),
        })
    })
    .await?;
    crate::customfields::ensure_definitions(api).await?;
    Ok(cfg)
}

/// Local facts about the machine we run on, when it is a Xen dom0.
#[derive(Debug, Clone, Default)]
pub struct LocalFacts {
    /// `/proc/xen` or `/sys/hypervisor/type` says Xen.
    pub xen: bool,
    /// `/dev/xen/privcmd` exists (toolstack access).
    pub privcmd: bool,
    /// This machine's hostname.
    pub hostname: String,
    /// A libxenctrl shared object was found (needed for dirty-page tracking, level 3).
    pub libxenctrl: bool,
}

impl LocalFacts {
    /// Reads them from this machine.
    pub fn gather() -> LocalFacts {
        let hv = std::fs::read_to_string("/sys/hypervisor/type").unwrap_or_default();
        LocalFacts {
            xen: hv.trim() == "xen" || std::path::Path::new("/proc/xen/capabilities").exists(),
            privcmd: std::path::Path::new("/dev/xen/privcmd").exists(),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            libxenctrl: [
                "/usr/lib",
                "/usr/lib64",
                "/usr/lib/x86_64-linux-gnu",
                "/usr/local/lib",
            ]
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("libxenctrl.so")),
        }
    }
}

fn xen_version(h: &HostRecord) -> Option<(u32, u32)> {
    let v = h.software_version.get("xen")?;
    let mut it = v.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Checks which levels a host can run from XenAPI facts, the registry, and (when we run on that
/// host) local facts; records the result in the host's `other_config["xenft.compat"]`.
pub async fn compat_check(
    api: &XenApi,
    host: &str,
    local: &LocalFacts,
) -> Result<CompatReport, OpError> {
    let hosts = api.host_get_all_records().await?;
    let (host_ref, h) = resolve_host(&hosts, host)?;
    let cfg = registry::read_pool_config(api).await?.1;
    let mut reasons = Vec::new();
    let mut facts = Vec::new();
    let mut levels = Vec::new();
    let is_local = !local.hostname.is_empty() && local.hostname == h.hostname;
    let free = api.host_compute_free_memory(&host_ref).await?;
    facts.push(format!("free memory for guests: {}", gib(free)));
    if let Some(x) = h.software_version.get("xen") {
        facts.push(format!("Xen {x}"));
    }
    if let Some(c) = &cfg {
        facts.push(format!(
            "{} quorum server(s) configured",
            c.quorum_servers.len()
        ));
    }
    let mut ok1 = h.enabled;
    if !h.enabled {
        reasons.push("host is disabled".to_string());
    }
    if is_local {
        facts.push(format!(
            "this machine: Xen {}, /dev/xen/privcmd {}, libxenctrl {}",
            if local.xen { "present" } else { "absent" },
            if local.privcmd { "present" } else { "absent" },
            if local.libxenctrl {
                "found"
            } else {
                "not found"
            },
        ));
        if !(local.xen && local.privcmd) {
            ok1 = false;
            reasons.push("this machine is not a Xen dom0 with /dev/xen/privcmd".into());
        }
    }
    if ok1 {
        levels.push(1);
    }
    let alinks = cfg
        .as_ref()
        .and_then(|c| c.hosts.get(&h.uuid))
        .map_or(0, |l| l.alinks.len());
    facts.push(format!("{alinks} A-link(s) in the registry"));
    let ok2 = ok1 && alinks >= 1;
    if ok1 && alinks == 0 {
        reasons.push("no A-link configured for this host (pool-init alinks)".into());
    }
    if ok2 {
        levels.push(2);
    }
    match xen_version(h) {
        Some(v) if v >= (4, 14) => {
            if is_local && !local.libxenctrl {
                reasons.push("level 3 needs libxenctrl (dirty-page tracking); not found".into());
            } else if ok2 && alinks >= 2 {
                levels.push(3);
            } else if ok2 {
                reasons.push("level 3 needs two A-links".into());
            }
        }
        Some((a, b)) => reasons.push(format!(
            "Xen {a}.{b} lacks the dirty-log support level 3 needs (≥ 4.14)"
        )),
        None => reasons.push("Xen version unknown (software_version has no xen)".into()),
    }
    let report = CompatReport {
        host: h.uuid.clone(),
        levels,
        reasons,
        facts,
        local_facts: is_local,
    };
    let raw = serde_json::to_string(&report).unwrap_or_default();
    api.set_map_key(Class::Host, &host_ref, "other_config", HOST_COMPAT, &raw)
        .await?;
    Ok(report)
}

/// Migrates a VM to `host` (`VM.pool_migrate`, live when asked).
pub async fn migrate(api: &XenApi, vm: &str, host: &str, live: bool) -> Result<(), OpError> {
    let vms = api.vm_get_all_records().await?;
    let hosts = api.host_get_all_records().await?;
    let (vm_ref, rec) = resolve_vm(&vms, vm)?;
    let (host_ref, h) = resolve_host(&hosts, host)?;
    if let Ok(p) = VmProtection::from_other_config(&rec.other_config, &rec.name_label) {
        if p.secondary.as_deref() == Some(h.uuid.as_str()) {
            return Err(OpError::Refused(format!(
                "host {:?} is the secondary of VM {:?}; unprotect it or choose another host",
                h.name_label, rec.name_label
            )));
        }
    }
    let mut opts = BTreeMap::new();
    if live {
        opts.insert("live".to_string(), "true".to_string());
    }
    api.vm_pool_migrate(&vm_ref, &host_ref, &opts).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, f: impl FnOnce(&mut VmRecord)) -> VmRecord {
        let mut v = VmRecord {
            uuid: format!("uuid-{name}"),
            name_label: name.into(),
            power_state: "Running".into(),
            ..VmRecord::default()
        };
        f(&mut v);
        v
    }

    #[test]
    fn control_domains_templates_and_snapshots_are_refused_by_name_saying_why() {
        let vms: BTreeMap<Ref, VmRecord> = [
            ("r1", vm("web01", |_| {})),
            (
                "r2",
                vm("Control domain on host: host1", |v| {
                    v.is_control_domain = true;
                }),
            ),
            ("r3", vm("Debian Bookworm 12", |v| v.is_a_template = true)),
            (
                "r4",
                vm("web01-snap", |v| {
                    v.is_a_template = true;
                    v.is_a_snapshot = true;
                }),
            ),
        ]
        .into_iter()
        .map(|(r, v)| (r.to_string(), v))
        .collect();
        assert_eq!(resolve_vm(&vms, "web01").unwrap().0, "r1");
        for (name, why) in [
            ("Control domain on host: host1", "a control domain (dom0)"),
            (
                "uuid-Control domain on host: host1",
                "a control domain (dom0)",
            ),
            ("Debian Bookworm 12", "a template"),
            ("web01-snap", "a snapshot"),
        ] {
            match resolve_vm(&vms, name) {
                Err(OpError::Refused(m)) => assert!(m.contains(why), "{name}: {m}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(matches!(
            resolve_vm(&vms, "nothing-like-it"),
            Err(OpError::NotFound { .. })
        ));
    }

    #[test]
    fn suggestions_catch_typos_only() {
        let names = ["web01", "db01", "mail"];
        assert_eq!(suggest("web1", names), Some("web01".into()));
        assert_eq!(suggest("WEB01", names), Some("web01".into()));
        assert_eq!(suggest("completely-different", names), None);
    }
}
