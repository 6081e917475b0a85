//! The agent's xenstore subtree: it publishes its view of every protected VM there, and
//! follows the domains of this host (`@introduceDomain` / `@releaseDomain`).
//!
//! ```text
//! /xenft/<host>/vm/<vm>/{phase,primary,secondary,generation,local}   written by the agent
//! ```
//! The agent's nodes are written in one transaction (retried on `EAGAIN`), so a reader never
//! sees half an update. What the components report about themselves (a failed disk, a lost
//! uplink) does not go through xenstore: they push it as events of the control contract
//! (`drivers::events`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{retry_transaction, XenStore, XsError, AGENT_ROOT};
use crate::core::VmView;
use crate::ids::HostId;
use crate::status::StatusHub;

/// The running bridge tasks.
pub struct Bridge {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Bridge {
    /// Starts publishing `hub`'s VM views under `/xenft/<host>/vm` and following the
    /// domains.
    pub fn start<S: XenStore + 'static>(xs: Arc<S>, host: HostId, hub: Arc<StatusHub>) -> Self {
        let (stop, rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(publish_loop(xs.clone(), host, hub.clone(), rx.clone())),
            tokio::spawn(domain_loop(xs, hub, rx)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::LocalCopy;
    use crate::ids::VmId;
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
                raising_to: None,
            },
            local: LocalCopy::Running,
            lease_valid: true,
            redirected: vec![],
        }
    }

    #[tokio::test]
    async fn bridge_publishes_vm_state_and_follows_domains() {
        let xs = Arc::new(MemStore::new());
        let hub = StatusHub::new(10);
        hub.set(StatusSnapshot {
            vms: vec![view()],
            ..StatusSnapshot::default()
        });
        let host = HostId::new("h1").unwrap();
        let bridge = Bridge::start(xs.clone(), host, hub.clone());
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
