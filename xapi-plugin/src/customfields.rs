//! XenCenter custom fields: definitions, values and the watcher that acts on them.
//!
//! XenCenter keeps custom field definitions in `pool.gui_config["XenCenter.CustomFields"]` as
//! XML, `<CustomFieldDefinitions><CustomFieldDefinition name=".." type="String"
//! defaultValue="" />...</CustomFieldDefinitions>`, and each object's values in its
//! `other_config["XenCenter.CustomFields.<name>"]`. xenft defines `xenft-level`,
//! `xenft-secondary` and `xenft-status`.
//!
//! [`CustomFieldWatcher`] follows `event.from(["vm", "pool"])` and reconciles: when a VM's
//! `xenft-level` field is set (or changed) it protects the VM with the `xenft-secondary` field
//! as secondary, exactly like `xenft vm-protect`; when the field is cleared it unprotects. After
//! its first read it acts on what an edit changed (a field left as it was is taken from the
//! registry), and only if the fields still read what the event showed once it holds the pool's
//! writers' lock, so that `xenft vm-protect`, which rewrites the registry and then the fields
//! one key at a time under that lock (each a remove then an add), is not undone half-way: a
//! level changed with the CLI stays changed. The
//! outcome (or the refusal, with its numbers) is written to the VM's `xenft-status` field, which
//! XenCenter shows next to the others.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::api::{Class, EventOp, EventStream, Ref, VmRecord};
use crate::client::XenApi;
use crate::error::XapiError;
use crate::ops::{self, OpError};
use crate::registry::{self, checked_set, Level, RegistryError, VmProtection};

/// `pool.gui_config` key of the definitions.
pub const GUI_CONFIG_KEY: &str = "XenCenter.CustomFields";
/// Prefix of values in `other_config`.
pub const VALUE_PREFIX: &str = "XenCenter.CustomFields.";
/// Field: desired level (`1`/`2`/`3`, empty = unprotected).
pub const FIELD_LEVEL: &str = "xenft-level";
/// Field: desired secondary (host name or uuid).
pub const FIELD_SECONDARY: &str = "xenft-secondary";
/// Field: what xenft did (written by xenft).
pub const FIELD_STATUS: &str = "xenft-status";
/// Fields pool-init defines.
pub const FIELDS: [&str; 3] = [FIELD_LEVEL, FIELD_SECONDARY, FIELD_STATUS];

/// The `other_config` key holding `field`'s value.
pub fn value_key(field: &str) -> String {
    format!("{VALUE_PREFIX}{field}")
}

fn escape_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn unescape_attr(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Names of the definitions in a `XenCenter.CustomFields` document; None if it is not one.
pub fn definition_names(xml: &str) -> Option<Vec<String>> {
    let t = xml.trim();
    let body = t.find("<CustomFieldDefinitions")?;
    let closed = t.contains("</CustomFieldDefinitions>")
        || t[body..].trim_end().ends_with("/>") && !t[body..].contains("<CustomFieldDefinition ");
    if !closed {
        return None;
    }
    let mut names = Vec::new();
    let mut rest = &t[body + "<CustomFieldDefinitions".len()..];
    while let Some(i) = rest.find("<CustomFieldDefinition ") {
        let el = &rest[i..];
        let end = el.find('>')?;
        let tag = &el[..end];
        let n = tag.find("name=\"")?;
        let v = &tag[n + 6..];
        let q = v.find('"')?;
        names.push(unescape_attr(&v[..q]));
        rest = &el[end..];
    }
    Some(names)
}

/// Adds the xenft definitions to `current` (None = no definitions yet) without touching the
/// others. Returns None when nothing needs adding; an error when `current` is not a definitions
/// document (left untouched).
pub fn add_definitions(current: Option<&str>) -> Result<Option<String>, String> {
    let element = |name: &str| {
        format!(
            "<CustomFieldDefinition name=\"{}\" type=\"String\" defaultValue=\"\" />",
            escape_attr(name)
        )
    };
    let Some(cur) = current.filter(|c| !c.trim().is_empty()) else {
        let all: String = FIELDS.iter().map(|f| element(f)).collect();
        return Ok(Some(format!(
            "<CustomFieldDefinitions>{all}</CustomFieldDefinitions>"
        )));
    };
    let names = definition_names(cur)
        .ok_or_else(|| format!("{GUI_CONFIG_KEY} is not a CustomFieldDefinitions document"))?;
    let missing: String = FIELDS
        .iter()
        .filter(|f| !names.iter().any(|n| n == *f))
        .map(|f| element(f))
        .collect();
    if missing.is_empty() {
        return Ok(None);
    }
    if let Some(i) = cur.rfind("</CustomFieldDefinitions>") {
        return Ok(Some(format!("{}{missing}{}", &cur[..i], &cur[i..])));
    }
    // Self-closing `<CustomFieldDefinitions />`.
    Ok(Some(format!(
        "<CustomFieldDefinitions>{missing}</CustomFieldDefinitions>"
    )))
}

/// Makes sure the pool defines the xenft custom fields (read-modify-write with a check).
pub async fn ensure_definitions(api: &XenApi) -> Result<(), RegistryError> {
    for attempt in 1..=crate::registry::MAX_ATTEMPTS {
        let (pool, rec) = api.the_pool().await?;
        let current = rec.gui_config.get(GUI_CONFIG_KEY);
        let new = add_definitions(current.map(String::as_str)).map_err(|reason| {
            RegistryError::Malformed {
                key: GUI_CONFIG_KEY.into(),
                object: format!("pool {}", rec.name_label),
                reason,
                excerpt: current
                    .cloned()
                    .unwrap_or_default()
                    .chars()
                    .take(60)
                    .collect(),
            }
        })?;
        let Some(new) = new else { return Ok(()) };
        match checked_set(
            api,
            Class::Pool,
            &pool,
            "gui_config",
            GUI_CONFIG_KEY,
            current.map(String::as_str),
            Some(&new),
        )
        .await
        {
            Err(RegistryError::Conflict { .. }) if attempt < crate::registry::MAX_ATTEMPTS => {}
            r => return r,
        }
    }
    Ok(())
}

/// What the watcher did for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Protected at this level.
    Protected {
        /// VM uuid.
        vm: String,
        /// Level.
        level: Level,
    },
    /// Unprotected.
    Unprotected {
        /// VM uuid.
        vm: String,
    },
    /// Refused or failed; the message was written to `xenft-status`.
    Failed {
        /// VM uuid.
        vm: String,
        /// The message.
        message: String,
    },
}

/// Whether the VM's fields still read `seen` (level, secondary), checked under the pool's
/// writers' lock before acting: `xenft vm-protect` holds that lock while it rewrites them one
/// key at a time (each a remove then an add), so what an event showed may be half of its edit
/// (the level field absent for a moment is not an administrator clearing it).
async fn fields_still(
    api: &XenApi,
    vm_ref: &str,
    seen: &(String, String),
) -> Result<bool, OpError> {
    let oc = api.get_map(Class::Vm, vm_ref, "other_config").await?;
    let field = |f: &str| oc.get(&value_key(f)).map_or("", |s| s.trim()).to_string();
    Ok((field(FIELD_LEVEL), field(FIELD_SECONDARY)) == *seen)
}

/// Reconciles XenCenter custom fields with the registry; see the module docs.
#[derive(Debug)]
pub struct CustomFieldWatcher {
    stream: EventStream,
    /// Last seen `xenft-level` and `xenft-secondary` fields per VM: the watcher acts on what
    /// an edit of them changed.
    seen: BTreeMap<Ref, (String, String)>,
    /// Last (level, secondary) request that failed per VM: not retried until it changes.
    failed: BTreeMap<Ref, (String, String)>,
    started: bool,
}

impl Default for CustomFieldWatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl CustomFieldWatcher {
    /// A watcher that starts with a full read.
    pub fn new() -> CustomFieldWatcher {
        CustomFieldWatcher {
            stream: EventStream::new(&["vm", "pool"]),
            seen: BTreeMap::new(),
            failed: BTreeMap::new(),
            started: false,
        }
    }

    /// Waits up to `timeout` for one batch of events and acts on it.
    pub async fn step(
        &mut self,
        api: &XenApi,
        timeout: Duration,
    ) -> Result<Vec<Action>, XapiError> {
        let batch = self.stream.next(api, timeout).await?;
        let first = !self.started || batch.resynced;
        self.started = true;
        let mut actions = Vec::new();
        for ev in batch.events {
            if ev.class != "vm" {
                continue;
            }
            if ev.operation == EventOp::Del {
                self.seen.remove(&ev.obj_ref);
                self.failed.remove(&ev.obj_ref);
                continue;
            }
            let Some(snap) = &ev.snapshot else { continue };
            let rec = VmRecord::from_value(snap)?;
            if !rec.is_guest() {
                continue;
            }
            if let Some(a) = self.reconcile(api, &ev.obj_ref, &rec, first).await? {
                actions.push(a);
            }
        }
        Ok(actions)
    }

    /// Runs until `shutdown` becomes true; errors are logged and retried after a pause.
    pub async fn run(mut self, api: &XenApi, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                r = self.step(api, Duration::from_secs(30)) => {
                    match r {
                        Ok(actions) => for a in actions {
                            tracing::info!(?a, "custom field change handled");
                        },
                        Err(e) => {
                            tracing::warn!("custom field watcher: {e}");
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn reconcile(
        &mut self,
        api: &XenApi,
        vm_ref: &str,
        rec: &VmRecord,
        first: bool,
    ) -> Result<Option<Action>, XapiError> {
        let oc = &rec.other_config;
        let want_level = oc
            .get(&value_key(FIELD_LEVEL))
            .map_or("", |s| s.trim())
            .to_string();
        let want_secondary = oc
            .get(&value_key(FIELD_SECONDARY))
            .map_or("", |s| s.trim())
            .to_string();
        let previous = self.seen.insert(
            vm_ref.to_string(),
            (want_level.clone(), want_secondary.clone()),
        );
        let actual = VmProtection::from_other_config(oc, &rec.name_label).unwrap_or_default();
        if want_level.is_empty() {
            self.failed.remove(vm_ref);
            let cleared = previous.as_ref().is_some_and(|(l, _)| !l.is_empty()) && !first;
            if cleared && actual.level.is_some() {
                let seen = (want_level.clone(), want_secondary.clone());
                let done = registry::with_pool_lock(api, async || {
                    if !fields_still(api, vm_ref, &seen).await? {
                        return Ok(None);
                    }
                    ops::unprotect_locked(api, &rec.uuid).await.map(Some)
                })
                .await;
                return Ok(Some(match done {
                    Ok(None) => return Ok(None),
                    Ok(Some(_)) => {
                        self.write_status(api, vm_ref, rec, "unprotected").await?;
                        Action::Unprotected {
                            vm: rec.uuid.clone(),
                        }
                    }
                    Err(e) => self.fail(api, vm_ref, rec, &e).await?,
                }));
            }
            return Ok(None);
        }
        // After the first read, act on the fields an edit changed, the others taken from the
        // registry: `xenft vm-protect` writes the registry, then mirrors it into the fields one
        // at a time, and acting on the difference in between (the old level still in the
        // field) would undo the change it made.
        let seen = (want_level.clone(), want_secondary.clone());
        let (level_edited, secondary_edited) = match (&previous, first) {
            (Some((l, s)), false) => (*l != want_level, *s != want_secondary),
            _ => (true, true),
        };
        if !level_edited && !secondary_edited {
            return Ok(None);
        }
        let want_level = match actual.level {
            Some(l) if !level_edited => l.as_str().to_string(),
            _ => want_level,
        };
        let want_secondary = match &actual.secondary {
            Some(s) if !secondary_edited => s.clone(),
            _ => want_secondary,
        };
        let request = (want_level.clone(), want_secondary.clone());
        if self.failed.get(vm_ref) == Some(&request) {
            return Ok(None);
        }
        let Some(level) = Level::parse(&want_level) else {
            self.failed.insert(vm_ref.to_string(), request);
            let e = OpError::Invalid(format!(
                "{FIELD_LEVEL} must be 1, 2 or 3, not {want_level:?}"
            ));
            return Ok(Some(self.fail(api, vm_ref, rec, &e).await?));
        };
        if want_secondary.is_empty() {
            self.failed.insert(vm_ref.to_string(), request);
            let e = OpError::Invalid(format!("set {FIELD_SECONDARY} to the secondary host"));
            return Ok(Some(self.fail(api, vm_ref, rec, &e).await?));
        }
        // Already as asked?
        if actual.level == Some(level) {
            let hosts = api.host_get_all_records().await?;
            let same = match ops::resolve_host(&hosts, &want_secondary) {
                Ok((_, h)) => actual.secondary.as_deref() == Some(h.uuid.as_str()),
                Err(_) => false,
            };
            if same {
                return Ok(None);
            }
        }
        let done = registry::with_pool_lock(api, async || {
            if !fields_still(api, vm_ref, &seen).await? {
                return Ok(None);
            }
            ops::protect_locked(api, &rec.uuid, level, &want_secondary)
                .await
                .map(Some)
        })
        .await;
        match done {
            Ok(None) => Ok(None),
            Ok(Some(p)) => {
                self.failed.remove(vm_ref);
                let msg = format!(
                    "protection requested: level {} on {}",
                    level.as_str(),
                    p.secondary_name
                );
                self.write_status(api, vm_ref, rec, &msg).await?;
                Ok(Some(Action::Protected {
                    vm: rec.uuid.clone(),
                    level,
                }))
            }
            Err(e) => {
                self.failed.insert(vm_ref.to_string(), request);
                Ok(Some(self.fail(api, vm_ref, rec, &e).await?))
            }
        }
    }

    async fn fail(
        &mut self,
        api: &XenApi,
        vm_ref: &str,
        rec: &VmRecord,
        e: &OpError,
    ) -> Result<Action, XapiError> {
        if let OpError::Api(e) = e {
            tracing::warn!(vm = %rec.name_label, "custom field action failed: {e}");
        }
        let message = format!("error: {e}");
        self.write_status(api, vm_ref, rec, &message).await?;
        Ok(Action::Failed {
            vm: rec.uuid.clone(),
            message,
        })
    }

    async fn write_status(
        &self,
        api: &XenApi,
        vm_ref: &str,
        rec: &VmRecord,
        msg: &str,
    ) -> Result<(), XapiError> {
        let key = value_key(FIELD_STATUS);
        if rec.other_config.get(&key).map(String::as_str) == Some(msg) {
            return Ok(());
        }
        api.set_map_key(Class::Vm, vm_ref, "other_config", &key, msg)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_added_without_disturbing_others() {
        let existing = "<CustomFieldDefinitions><CustomFieldDefinition name=\"owner &amp; team\" \
                        type=\"String\" defaultValue=\"\" /></CustomFieldDefinitions>";
        let new = add_definitions(Some(existing)).unwrap().unwrap();
        let names = definition_names(&new).unwrap();
        assert_eq!(
            names,
            vec!["owner & team", FIELD_LEVEL, FIELD_SECONDARY, FIELD_STATUS]
        );
        assert!(new.starts_with(&existing[..existing.len() - "</CustomFieldDefinitions>".len()]));
        assert_eq!(add_definitions(Some(&new)).unwrap(), None, "idempotent");
    }

    #[test]
    fn empty_or_self_closing_documents_get_our_fields() {
        for cur in [None, Some(""), Some("<CustomFieldDefinitions />")] {
            let new = add_definitions(cur).unwrap().unwrap();
            assert_eq!(definition_names(&new).unwrap().len(), 3, "{cur:?}");
        }
    }

    #[test]
    fn foreign_documents_are_refused() {
        assert!(add_definitions(Some("hello")).is_err());
        assert!(
            add_definitions(Some("<CustomFieldDefinitions><CustomFieldDefinition name=")).is_err()
        );
    }
}
