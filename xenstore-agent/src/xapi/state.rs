//! State back into xapi: each protected VM's `other_config["xenft.state"]` and its XenCenter
//! custom field `xenft-status`, so that every XenAPI client (the `xenft` CLI, XenCenter,
//! scripts) sees what the agent sees.
//!
//! Format (version 1): one line of plain words — `pending`, `syncing N%`, `protected`,
//! `degraded: <cause>`, `failed over at <unix seconds>: <reason>`, `error: <reason>`. A
//! later format starts with `v<N>:` (N > 1); a value of a newer format is never overwritten
//! (an older agent left running during an upgrade must not undo a newer one's report).
//!
//! Writes are coalesced ([`Coalescer`]): at most one write per VM per [`MIN_INTERVAL`], the
//! newest state wins, an unchanged state is not written again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use xenft_xapi::api::Class;
use xenft_xapi::customfields::{value_key, FIELD_STATUS};
use xenft_xapi::registry::VM_STATE;
use xenft_xapi::{XapiError, XenApi};

/// Shortest time between two writes of one VM's state.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest reason kept in a state line.
const MAX_REASON: usize = 200;

/// A protected VM's state as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// Asked for; nothing running yet.
    Pending,
    /// The secondary's copy is being filled.
    Syncing {
        /// Done, 0–100.
        percent: u8,
    },
    /// Fully protected.
    Protected,
    /// Running without full protection.
    Degraded {
        /// Why.
        cause: String,
    },
    /// Taken over by the secondary.
    FailedOver {
        /// When (unix seconds).
        at_unix: u64,
        /// Why.
        reason: String,
    },
    /// Protection cannot be carried out.
    Error {
        /// Why.
        reason: String,
    },
}

fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON)
        .collect()
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pending => f.write_str("pending"),
            Self::Syncing { percent } => write!(f, "syncing {}%", (*percent).min(100)),
            Self::Protected => f.write_str("protected"),
            Self::Degraded { cause } => write!(f, "degraded: {}", clean(cause)),
            Self::FailedOver { at_unix, reason } => {
                write!(f, "failed over at {at_unix}: {}", clean(reason))
            }
            Self::Error { reason } => write!(f, "error: {}", clean(reason)),
        }
    }
}

/// Whether `existing` was written in a format newer than this build's (`v2:...` and up).
#[must_use]
pub fn is_newer_format(existing: &str) -> bool {
    existing
        .strip_prefix('v')
        .and_then(|r| r.split_once(':'))
        .and_then(|(n, _)| n.parse::<u32>().ok())
        .is_some_and(|n| n > 1)
}

/// Coalesces state reports into writes: per VM, the newest state, at most once per
/// [`MIN_INTERVAL`], never the same value twice in a row. Pure: the caller gives the time.
#[derive(Debug, Default)]
pub struct Coalescer {
    pending: BTreeMap<String, String>,
    written: BTreeMap<String, (String, Instant)>,
}

impl Coalescer {
    /// A new state for the VM `vm_ref`.
    pub fn offer(&mut self, vm_ref: &str, state: &VmState) {
        self.pending.insert(vm_ref.to_string(), state.to_string());
    }

    /// The writes due at `now`, taken out of the queue.
    pub fn due(&mut self, now: Instant) -> Vec<(String, String)> {
        let mut out = Vec::new();
        self.pending.retain(|vm, state| {
            match self.written.get(vm) {
                Some((last, _)) if last == state => return false, // nothing new
                Some((_, at)) if now < *at + MIN_INTERVAL => return true, // not yet
                _ => {}
            }
            out.push((vm.clone(), state.clone()));
            false
        });
        for (vm, state) in &out {
            self.written.insert(vm.clone(), (state.clone(), now));
        }
        out
    }

    /// Forgets every VM but those `keep` accepts (the others were unprotected or deleted: a
    /// late write would overwrite what the unprotect wrote).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.pending.retain(|vm, _| keep(vm));
        self.written.retain(|vm, _| keep(vm));
    }

    /// Forgets a VM (unprotected or deleted).
    pub fn forget(&mut self, vm_ref: &str) {
        self.pending.remove(vm_ref);
        self.written.remove(vm_ref);
    }
}

/// Why a state was not written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The VM's current value is of a newer format.
    #[error("xenft.state of {vm} holds a newer format ({value:?}): left untouched")]
    NewerFormat {
        /// The VM ref.
        vm: String,
        /// The value found.
        value: String,
    },
    /// xapi failed.
    #[error(transparent)]
    Xapi(#[from] XapiError),
}

/// Writes one VM's state line into `xenft.state` and the `xenft-status` custom field.
///
/// # Errors
/// [`StateError::NewerFormat`] (nothing written) or the XenAPI failure.
pub async fn write_state(api: &XenApi, vm_ref: &str, state: &str) -> Result<(), StateError> {
    let oc = api.get_map(Class::Vm, vm_ref, "other_config").await?;
    if let Some(v) = oc.get(VM_STATE).filter(|v| is_newer_format(v)) {
        return Err(StateError::NewerFormat {
            vm: vm_ref.to_string(),
            value: v.chars().take(60).collect(),
        });
    }
    if oc.get(VM_STATE).map(String::as_str) != Some(state) {
        api.set_map_key(Class::Vm, vm_ref, "other_config", VM_STATE, state)
            .await?;
    }
    let field = value_key(FIELD_STATUS);
    if oc.get(&field).map(String::as_str) != Some(state) {
        api.set_map_key(Class::Vm, vm_ref, "other_config", &field, state)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_as_the_documented_words() {
        assert_eq!(VmState::Pending.to_string(), "pending");
        assert_eq!(
            VmState::Syncing { percent: 250 }.to_string(),
            "syncing 100%"
        );
        assert_eq!(
            VmState::Degraded {
                cause: "peer h2 silent\\non every path".replace("\\n", "\n")
            }
            .to_string(),
            "degraded: peer h2 silent on every path"
        );
        assert_eq!(
            VmState::FailedOver {
                at_unix: 1_800_000_000,
                reason: "h1 dead".into()
            }
            .to_string(),
            "failed over at 1800000000: h1 dead"
        );
        let long = VmState::Error {
            reason: "x".repeat(1000),
        }
        .to_string();
        assert_eq!(long.len(), "error: ".len() + MAX_REASON);
    }

    #[test]
    fn only_a_newer_format_is_protected_from_overwriting() {
        assert!(is_newer_format("v2:{\"state\":\"protected\"}"));
        assert!(!is_newer_format("v1:protected"));
        assert!(!is_newer_format("protected"));
        assert!(!is_newer_format("vague: words"));
        assert!(!is_newer_format("degraded: v9: nothing"));
    }

    #[test]
    fn writes_are_coalesced_to_one_a_second_per_vm_with_the_newest_state() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        c.offer("vm1", &VmState::Pending);
        c.offer("vm2", &VmState::Pending);
        assert_eq!(c.due(t0).len(), 2);
        for p in 0..100 {
            c.offer("vm1", &VmState::Syncing { percent: p });
        }
        assert!(
            c.due(t0 + Duration::from_millis(500)).is_empty(),
            "too soon"
        );
        assert_eq!(
            c.due(t0 + Duration::from_millis(1001)),
            vec![("vm1".to_string(), "syncing 99%".to_string())]
        );
        c.offer("vm2", &VmState::Pending);
        assert!(
            c.due(t0 + Duration::from_secs(5)).is_empty(),
            "an unchanged state is not written again"
        );
        c.forget("vm1");
        c.offer("vm1", &VmState::Protected);
        assert_eq!(c.due(t0 + Duration::from_millis(1002)).len(), 1);
        c.offer("vm2", &VmState::Protected);
        c.retain(|vm| vm != "vm2");
        assert!(
            c.due(t0 + Duration::from_secs(9)).is_empty(),
            "an unprotected VM's pending state is dropped"
        );
    }
}
