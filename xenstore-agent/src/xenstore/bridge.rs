//! The agent's xenstore subtree: it publishes its view of every protected VM there, and reads
//! what the shims publish about their components.
//!
//! ```text
//! /xenft/<host>/vm/<vm>/{phase,primary,secondary,generation,local}   written by the agent
//! /xenft/<host>/shim/<vm>/disk        "ok" | "error: <text>"          written by blkback-shim
//! /xenft/<host>/shim/<vm>/uplink      "ok" | "error: <text>"          written by netback-shim
//! /xenft/<host>/shim/<vm>/consistent  "1" | "0"                       written by blkback-shim
//! ```
//! The agent's nodes are written in one transaction (retried on `EAGAIN`), so a reader never
//! sees half an update. Shim nodes are re-read on every watch event (events may be spurious or
//! coalesced) and only changes become inputs of the decision core.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{retry_transaction, XenStore, XsError, AGENT_ROOT};
use crate::core::{Input, VmView};
use crate::decision::Component;
use crate::ids::{HostId, VmId};
use crate::status::StatusHub;

/// The running bridge tasks.
pub struct Bridge {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Bridge {
    /// Starts publishing `hub`'s VM views under `/xenft/<host>/vm` and turning shim reports
    /// under `/xenft/<host>/shim` into core inputs.
    pub fn start<S: XenStore + 'static>(
        xs: Arc<S>,
        host: HostId,
        hub: Arc<StatusHub>,
        inputs: mpsc::Sender<Input>,
    ) -> Self {
        let (stop, rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(publish_loop(
                xs.clone(),
                host.clone(),
                hub.clone(),
                rx.clone(),
            )),
            tokio::spawn(domain_loop(xs.clone(), hub, rx.clone())),
            tokio::spawn(shim_loop(xs, host, inputs, rx)),
        ];
        Self { stop, tasks }
    }

    /// Stops the tasks.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn vm_nodes(host: &HostId, v: &VmView) -> Vec<(String, String)> {
    let base = format!("{AGENT_ROOT}/{host}/vm/{}", v.record.vm);
    vec![
        (format!("{base}/phase"), enum_text(&v.record.phase)),
        (format!("{base}/primary"), v.record.primary.to_string()),
        (format!("{base}/secondary"), v.record.secondary.to_string()),
        (
            format!("{base}/generation"),
            v.record.generation.to_string(),
        ),
        (format!("{base}/local"), enum_text(&v.local)),
    ]
}

/// The serde name of a unit-like enum value.
fn enum_text<T: serde::Serialize>(x: &T) -> String {
    serde_json::to_value(x)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Writes the VM views in one transaction.
///
/// # Errors
/// [`XsError`] after retries.
pub async fn publish<S: XenStore>(xs: &S, host: &HostId, views: &[VmView]) -> Result<(), XsError> {
    let nodes: Vec<(String, String)> = views.iter().flat_map(|v| vm_nodes(host, v)).collect();
    let nodes = &nodes;
    retry_transaction(xs, 10, |tx| async move {
        for (p, v) in nodes {
            xs.write(Some(tx), p, v).await?;
        }
        Ok(())
    })
    .await
}

async fn publish_loop<S: XenStore>(
    xs: Arc<S>,
    host: HostId,
    hub: Arc<StatusHub>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last: Vec<(String, String)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let views = hub.snapshot().vms;
        let nodes: Vec<(String, String)> = views.iter().flat_map(|v| vm_nodes(&host, v)).collect();
        if nodes == last {
            continue;
        }
        match publish(&*xs, &host, &views).await {
            Ok(()) => last = nodes,
            Err(e) => tracing::warn!(error = %e, "cannot publish VM state to xenstore"),
        }
    }
}

/// Follows `@introduceDomain` / `@releaseDomain` and keeps the hub's list of local domains.
async fn domain_loop<S: XenStore>(
    xs: Arc<S>,
    hub: Arc<StatusHub>,
    mut stop: watch::Receiver<bool>,
) {
    let (Ok(mut intro), Ok(mut release)) = (
        xs.watch(super::INTRODUCE_DOMAIN).await,
        xs.watch(super::RELEASE_DOMAIN).await,
    ) else {
        tracing::warn!("cannot watch domain introduction and release");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            ev = intro.recv() => if ev.is_none() { return },
            ev = release.recv() => if ev.is_none() { return },
        }
        let Ok(ids) = super::list_domains(&*xs).await else {
            continue;
        };
        let mut domains = Vec::new();
        for id in ids.into_iter().take(4096) {
            let name = xs
                .read(None, &format!("/local/domain/{id}/name"))
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            domains.push((id, name));
        }
        hub.update(|s| s.local_domains = domains);
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct ShimState {
    disk: Option<String>,
    uplink: Option<String>,
    consistent: Option<String>,
}

/// Reads every shim node of this host.
async fn read_shims<S: XenStore>(
    xs: &S,
    host: &HostId,
) -> Result<BTreeMap<VmId, ShimState>, XsError> {
    let base = format!("{AGENT_ROOT}/{host}/shim");
    let names = match xs.directory(None, &base).await {
        Ok(n) => n,
        Err(XsError::NotFound(_)) => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut out = BTreeMap::new();
    for name in names.into_iter().take(crate::config::MAX_VMS) {
        let Ok(vm) = VmId::new(name.as_str()) else {
            continue; // not a VM name we could have configured
        };
        let read = |leaf: &'static str| {
            let p = format!("{base}/{name}/{leaf}");
            async move { xs.read(None, &p).await }
        };
        let st = ShimState {
            disk: read("disk").await?,
            uplink: read("uplink").await?,
            consistent: read("consistent").await?,
        };
        out.insert(vm, st);
    }
    Ok(out)
}

fn component_input(vm: &VmId, component: Component, value: Option<&str>) -> Option<Input> {
    let value = value?;
    let ok = value == "ok";
    Some(Input::Component {
        vm: Some(vm.clone()),
        component,
        ok,
        detail: value.chars().take(200).collect(),
    })
}

async fn shim_loop<S: XenStore>(
    xs: Arc<S>,
    host: HostId,
    inputs: mpsc::Sender<Input>,
    mut stop: watch::Receiver<bool>,
) {
    let base = format!("{AGENT_ROOT}/{host}/shim");
    let mut events = loop {
        match xs.watch(&base).await {
            Ok(w) => break w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the shims' xenstore subtree; retrying");
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let mut seen: BTreeMap<VmId, ShimState> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            ev = events.recv() => if ev.is_none() { return },
        }
        let now = match read_shims(&*xs, &host).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the shims' state");
                continue;
            }
        };
        for (vm, st) in &now {
            let old = seen.get(vm).cloned().unwrap_or_default();
            let mut out = Vec::new();
            if st.disk != old.disk {
                out.extend(component_input(vm, Component::Disk, st.disk.as_deref()));
            }
            if st.uplink != old.uplink {
                out.extend(component_input(vm, Component::Uplink, st.uplink.as_deref()));
            }
            if st.consistent != old.consistent {
                if let Some(c) = st.consistent.as_deref() {
                    out.push(Input::MirrorConsistent {
                        vm: vm.clone(),
                        consistent: c == "1",
                    });
                }
            }
            for i in out {
                if inputs.send(i).await.is_err() {
                    return;
                }
            }
        }
        seen = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::LocalCopy;
    use crate::lifecycle::{Level, Phase, VmRecord};
    use crate::status::StatusSnapshot;
    use crate::xenstore::memory::MemStore;

    fn view() -> VmView {
        VmView {
            record: VmRecord {
                vm: VmId::new("vm1").unwrap(),
                level: Level::L3,
                primary: HostId::new("h1").unwrap(),
                secondary: HostId::new("h2").unwrap(),
                generation: 2,
                phase: Phase::Protected,
                consistent: true,
                memory_mb: 1,
            },
            local: LocalCopy::Running,
            lease_valid: true,
            redirected: vec![],
        }
    }

    #[tokio::test]
    async fn bridge_publishes_vm_state_and_turns_shim_reports_into_inputs() {
        let xs = Arc::new(MemStore::new());
        let hub = StatusHub::new(10);
        hub.set(StatusSnapshot {
            vms: vec![view()],
            ..StatusSnapshot::default()
        });
        let (tx, mut rx) = mpsc::channel(16);
        let host = HostId::new("h1").unwrap();
        let bridge = Bridge::start(xs.clone(), host, hub.clone(), tx);
        // Publication.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let phase = xs.read(None, "/xenft/h1/vm/vm1/phase").await.unwrap();
            if phase.as_deref() == Some("protected") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "state not published"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            xs.read(None, "/xenft/h1/vm/vm1/local")
                .await
                .unwrap()
                .as_deref(),
            Some("running")
        );
        // A shim reports a disk fault; a spurious event changes nothing.
        xs.write(None, "/xenft/h1/shim/vm1/disk", "error: EIO on sector 8")
            .await
            .unwrap();
        let i = tokio::time::timeout(Duration::from_secs(3), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(&i, Input::Component { component: Component::Disk, ok: false, detail, .. } if detail.contains("EIO")),
            "{i:?}"
        );
        xs.fire_spurious("/xenft/h1/shim");
        xs.write(None, "/xenft/h1/shim/vm1/disk", "ok")
            .await
            .unwrap();
        let i = tokio::time::timeout(Duration::from_secs(3), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(i, Input::Component { ok: true, .. }), "{i:?}");
        // Domains appear and vanish through @introduceDomain / @releaseDomain.
        xs.introduce_domain(3, "web01");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while hub.snapshot().local_domains != vec![(3, "web01".to_string())] {
            assert!(tokio::time::Instant::now() < deadline, "domain not seen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        xs.release_domain(3);
        while !hub.snapshot().local_domains.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "domain release not seen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bridge.shutdown().await;
    }
}
