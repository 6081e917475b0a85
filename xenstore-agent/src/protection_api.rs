//! Protect and unprotect a VM through the agent's status API (`POST /vm/<vm>/protect` with
//! `{"level": 1|2|3, "secondary": "<host>"}`, `POST /vm/<vm>/unprotect`), for consoles.
//!
//! Two modes, as the agent runs:
//! - with its XenAPI plane ([`ProtectionApi::xapi`], the agent follows the pool registry): the
//!   registry is written through XenAPI by the same operations as `xenft vm-protect` /
//!   `vm-unprotect` (`xenft_xapi::ops`: admission control under the pool lock, `xenft.level`,
//!   `xenft.secondary`, `xenft.state`, the XenCenter fields), and the agents follow it;
//! - without ([`ProtectionApi::core`]): the agent's core gets `Input::Protect` /
//!   `Input::Unprotect` directly, for the VMs this agent knows (configured, or protected since
//!   it started).
//!
//! Every refusal is a 4xx with the reason (unknown VM, bad level, a secondary outside the
//! pool, a different protection already in place); an unreachable xapi or a stopped core is a
//! 5xx. The HTTP side (token, body size) is [`crate::status`]'s.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use xenft_xapi::ops::{self, OpError};
use xenft_xapi::XenApi;

use crate::core::{Input, VmSpec};
use crate::ids::{HostId, VmId};
use crate::lifecycle::Level;
use crate::status::StatusHub;

/// An answer: HTTP status code and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// JSON body (`{"error": reason}` for refusals).
    pub body: Value,
}

impl Answer {
    fn ok(body: Value) -> Self {
        Self { status: 200, body }
    }

    /// A refusal or failure with its reason.
    #[must_use]
    pub fn error(status: u16, reason: impl std::fmt::Display) -> Self {
        Self {
            status,
            body: json!({ "error": reason.to_string() }),
        }
    }
}

/// What is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `POST /vm/<vm>/protect`.
    Protect,
    /// `POST /vm/<vm>/unprotect`.
    Unprotect,
}

/// The body of a protect request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProtectBody {
    level: u8,
    secondary: String,
    /// Without a plane: the host the VM runs on (default: where this agent last saw it).
    #[serde(default)]
    primary: Option<String>,
}

/// Where protect and unprotect go.
pub struct ProtectionApi(Mode);

enum Mode {
    Xapi(watch::Receiver<Option<Arc<XenApi>>>),
    Core(Core),
}

struct Core {
    inputs: mpsc::Sender<Input>,
    hub: Arc<StatusHub>,
    me: HostId,
    hosts: Vec<HostId>,
    /// Every VM this agent was configured with or saw protected, as last seen.
    known: Mutex<BTreeMap<VmId, VmSpec>>,
}

/// How long a request waits for room in the core's input queue.
const QUEUE_WAIT: Duration = Duration::from_secs(2);

impl ProtectionApi {
    /// Through the registry, over the plane's XenAPI session (`api`: the follower's).
    #[must_use]
    pub fn xapi(api: watch::Receiver<Option<Arc<XenApi>>>) -> Arc<Self> {
        Arc::new(Self(Mode::Xapi(api)))
    }

    /// Straight to the core of the agent `me` (`inputs`, its `hub` for the current
    /// protections), in the pool of `hosts`; `configured`: the VMs of its config file.
    #[must_use]
    pub fn core(
        inputs: mpsc::Sender<Input>,
        hub: Arc<StatusHub>,
        me: HostId,
        hosts: Vec<HostId>,
        configured: &[VmSpec],
    ) -> Arc<Self> {
        let known = configured
            .iter()
            .map(|s| (s.vm.clone(), s.clone()))
            .collect();
        Arc::new(Self(Mode::Core(Core {
            inputs,
            hub,
            me,
            hosts,
            known: Mutex::new(known),
        })))
    }

    /// Carries out `action` on `vm` with the request `body`.
    pub async fn handle(&self, action: Action, vm: &str, body: &[u8]) -> Answer {
        let protect = match action {
            Action::Protect => match serde_json::from_slice::<ProtectBody>(body) {
                Ok(b) if (1..=3).contains(&b.level) => Some(b),
                Ok(b) => return Answer::error(400, format!("level {} is not 1, 2 or 3", b.level)),
                Err(e) => {
                    return Answer::error(
                        400,
                        format!(
                            "the body must be {{\"level\": 1|2|3, \"secondary\": \"<host>\"}}: {e}"
                        ),
                    )
                }
            },
            Action::Unprotect => None,
        };
        match (&self.0, protect) {
            (Mode::Xapi(api), p) => {
                let Some(api) = api.borrow().clone() else {
                    return Answer::error(
                        503,
                        "xapi is unreachable: the registry cannot be written now",
                    );
                };
                xapi(&api, vm, p).await
            }
            (Mode::Core(c), Some(p)) => c.protect(vm, p).await,
            (Mode::Core(c), None) => c.unprotect(vm).await,
        }
    }
}

async fn xapi(api: &XenApi, vm: &str, protect: Option<ProtectBody>) -> Answer {
    let r = match protect {
        Some(p) => {
            if p.primary.is_some() {
                return Answer::error(
                    400,
                    "primary is where xapi runs the VM: it cannot be given here",
                );
            }
            let Some(level) = xenft_xapi::registry::Level::parse(&p.level.to_string()) else {
                return Answer::error(400, format!("level {} is not 1, 2 or 3", p.level));
            };
            ops::protect(api, vm, level, &p.secondary)
                .await
                .map(|d| json!({ "protected": d }))
        }
        None => ops::unprotect(api, vm)
            .await
            .map(|was| json!({ "vm": vm, "was_protected": was })),
    };
    match r {
        Ok(body) => Answer::ok(body),
        Err(e) => {
            let status = match &e {
                OpError::NotFound { class, .. } if *class == "VM" => 404,
                OpError::NotFound { .. } | OpError::Invalid(_) => 400,
                OpError::Ambiguous { .. } | OpError::Refused(_) | OpError::Registry(_) => 409,
                OpError::Api(_) => 502,
            };
            Answer::error(status, e)
        }
    }
}

impl Core {
    /// The VMs known now: configured, or protected (their current record wins).
    fn known(&self) -> BTreeMap<VmId, VmSpec> {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for v in self.hub.snapshot().vms {
            let r = v.record;
            known.insert(
                r.vm.clone(),
                VmSpec {
                    vm: r.vm,
                    level: r.level,
                    primary: r.primary,
                    secondary: r.secondary,
                    memory_mb: r.memory_mb,
                },
            );
        }
        known.clone()
    }

    /// The VM's current protection (record), if any.
    fn protected(&self, vm: &VmId) -> Option<crate::lifecycle::VmRecord> {
        self.hub
            .snapshot()
            .vms
            .into_iter()
            .map(|v| v.record)
            .find(|r| r.vm == *vm)
    }

    fn lookup(&self, vm: &str) -> Result<VmSpec, Answer> {
        let known = self.known();
        let names = || {
            known
                .keys()
                .map(VmId::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        };
        VmId::new(vm)
            .ok()
            .and_then(|id| known.get(&id).cloned())
            .ok_or_else(|| {
                Answer::error(
                    404,
                    format!(
                        "no VM named {vm:?} known to this agent (known: {})",
                        names()
                    ),
                )
            })
    }

    fn pool_host(&self, what: &str, name: &str) -> Result<HostId, Answer> {
        let hosts = || {
            self.hosts
                .iter()
                .map(HostId::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        };
        HostId::new(name)
            .ok()
            .filter(|h| self.hosts.contains(h))
            .ok_or_else(|| {
                Answer::error(
                    400,
                    format!("{what} {name:?} is not a host of this pool ({})", hosts()),
                )
            })
    }

    async fn send(&self, input: Input) -> Result<(), Answer> {
        self.inputs
            .send_timeout(input, QUEUE_WAIT)
            .await
            .map_err(|e| Answer::error(503, format!("the agent's core does not take inputs: {e}")))
    }

    async fn protect(&self, vm: &str, p: ProtectBody) -> Answer {
        match self.protect_checked(vm, p).await {
            Ok(a) | Err(a) => a,
        }
    }

    async fn protect_checked(&self, vm: &str, p: ProtectBody) -> Result<Answer, Answer> {
        let known = self.lookup(vm)?;
        let level = Level::try_from(p.level).map_err(|e| Answer::error(400, e))?;
        let secondary = self.pool_host("secondary", &p.secondary)?;
        let primary = match &p.primary {
            Some(h) => self.pool_host("primary", h)?,
            None => known.primary.clone(),
        };
        if primary == secondary {
            return Err(Answer::error(
                400,
                format!("the secondary must be another host than the primary ({primary})"),
            ));
        }
        if primary != self.me && secondary != self.me {
            return Err(Answer::error(
                400,
                format!(
                    "this agent ({}) is neither the primary nor the secondary: ask {primary}'s",
                    self.me
                ),
            ));
        }
        let spec = VmSpec {
            vm: known.vm.clone(),
            level,
            primary,
            secondary,
            memory_mb: known.memory_mb,
        };
        let done = |already: bool| {
            Answer::ok(json!({
                "vm": spec.vm, "level": u8::from(level), "primary": spec.primary,
                "secondary": spec.secondary, "already_protected": already,
            }))
        };
        // The hub's view may lag the core by up to 100 ms; the core ignores a protect of a VM
        // it protects already, so the input is sent whenever the view does not contradict it.
        let already = match self.protected(&spec.vm) {
            Some(r)
                if (r.level, &r.primary, &r.secondary)
                    == (level, &spec.primary, &spec.secondary) =>
            {
                true
            }
            Some(r) => return Err(Answer::error(
                409,
                format!(
                    "{} is already protected at level {} (primary {}, secondary {}): unprotect it first",
                    r.vm,
                    u8::from(r.level),
                    r.primary,
                    r.secondary
                ),
            )),
            None => false,
        };
        self.send(Input::Protect(spec.clone())).await?;
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(spec.vm.clone(), spec.clone());
        Ok(done(already))
    }

    async fn unprotect(&self, vm: &str) -> Answer {
        let known = match self.lookup(vm) {
            Ok(k) => k,
            Err(a) => return a,
        };
        // Sent even when the hub's (slightly lagging) view shows no protection: the core
        // ignores an unprotect of a VM it does not protect.
        let was = self.protected(&known.vm).is_some();
        if let Err(a) = self.send(Input::Unprotect(known.vm.clone())).await {
            return a;
        }
        Answer::ok(json!({ "vm": known.vm, "was_protected": was }))
    }
}
