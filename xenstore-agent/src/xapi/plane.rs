//! The control plane on one host: the [`Follower`] reads the registry, [`bridge::changes`]
//! turns it into the core's protect / unprotect inputs, and the core's view of each VM goes
//! back into xapi as its state line, coalesced ([`Coalescer`]). Refusals (a request the
//! registry holds but the pool cannot carry out) are written by the pool master's agent
//! only, so that two agents never race on one VM; the master's agent also follows the
//! XenCenter custom fields (`xenft_xapi::customfields`), so that a level typed into a VM's
//! `xenft-level` field protects it. The host running a VM also re-checks that its secondary
//! can still hold it ([`super::reservation`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::bridge::{changes, held_told, state_of};
use super::components::{plan, Change, HostFacts, Supervisor};
use super::follower::{Follower, FollowerConfig};
use super::state::{write_state, Coalescer, StateError, VmState};
use crate::core::Input;
use crate::ids::HostId;
use crate::status::StatusHub;

/// How long a protected VM may stay halted, or refused by the registry, before its protection
/// ends: longer than a take-over through xapi leaves it halted between `VM.power_state_reset`
/// and `VM.start_on`, or an edit of its `other_config` leaves a key out.
const HOLD_GRACE: Duration = Duration::from_secs(30);

/// How often the core's views are turned into state lines.
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// The components this host supervises for the registry's VMs: host facts (`me` is filled
/// from the registry) and the supervisor.
pub struct Components {
    /// Where and what to run.
    pub facts: HostFacts,
    /// Keeps them running.
    pub supervisor: Supervisor,
}

/// One component's event follower: its stop flag and thread.
type FollowerThread = (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
);

/// The event followers of supervised components, by VM and component.
#[derive(Default)]
struct Followers(BTreeMap<(String, &'static str), FollowerThread>);

impl Followers {
    fn apply(
        &mut self,
        changes: &[Change],
        run_dir: &std::path::Path,
        inputs: &mpsc::Sender<Input>,
    ) {
        for c in changes {
            match c {
                Change::Started { vm, name, .. } | Change::Adopted { vm, name, .. } => {
                    self.follow(vm, name, run_dir, inputs);
                }
                Change::Stopped { vm, name } => self.unfollow(vm, name),
                _ => {}
            }
        }
    }

    /// Follows the events of component `name` of `vm` at `<run_dir>/<vm>/<name>.sock`, unless
    /// followed already.
    fn follow(
        &mut self,
        vm: &str,
        name: &'static str,
        run_dir: &std::path::Path,
        inputs: &mpsc::Sender<Input>,
    ) {
        if self.0.contains_key(&(vm.to_string(), name)) {
            return;
        }
        let Ok(id) = crate::ids::VmId::new(vm) else {
            return;
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sock = run_dir.join(vm).join(format!("{name}.sock"));
        let Some(followed) = crate::drivers::events::follow_supervised(
            name,
            &id,
            &sock,
            Duration::from_secs(5),
            inputs,
            &stop,
        ) else {
            return;
        };
        match followed {
            Ok(t) => {
                self.0.insert((vm.to_string(), name), (stop, t));
            }
            Err(e) => {
                tracing::warn!(%vm, error = %e, "cannot follow the component's events");
            }
        }
    }

    fn unfollow(&mut self, vm: &str, name: &'static str) {
        if let Some((stop, _)) = self.0.remove(&(vm.to_string(), name)) {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn stop_all(&mut self) {
        for (stop, _) in self.0.values() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The running control plane.
pub struct Plane {
    follower: Follower,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Plane {
    /// Follows the registry as host `me` (its xapi `name_label`, the agent's host name),
    /// feeding `inputs` and reporting what `hub` shows.
    #[must_use]
    pub fn start(
        cfg: FollowerConfig,
        me: HostId,
        inputs: mpsc::Sender<Input>,
        hub: Arc<StatusHub>,
    ) -> Plane {
        Self::with_follower(Follower::start(cfg), me, inputs, hub, None)
    }

    /// The same around a follower already running (whose channels other seams use, e.g.
    /// [`super::domain::XapiDomain`]).
    #[must_use]
    pub fn with_follower(
        follower: Follower,
        me: HostId,
        inputs: mpsc::Sender<Input>,
        hub: Arc<StatusHub>,
        components: Option<Components>,
    ) -> Plane {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            follower.desired(),
            follower.api(),
            me,
            inputs,
            hub,
            components,
            stop_rx,
        ));
        Plane {
            follower,
            stop,
            task,
        }
    }

    /// The follower (its desired state, its client).
    #[must_use]
    pub fn follower(&self) -> &Follower {
        &self.follower
    }

    /// Stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.follower.shutdown().await;
    }
}

async fn run(
    mut desired: watch::Receiver<Option<Arc<super::desired::Desired>>>,
    api: watch::Receiver<Option<Arc<xenft_xapi::XenApi>>>,
    me: HostId,
    inputs: mpsc::Sender<Input>,
    hub: Arc<StatusHub>,
    mut components: Option<Components>,
    mut stop: watch::Receiver<bool>,
) {
    let mut followers = Followers::default();
    let mut fields = FieldWatcher::default();
    let mut told = BTreeMap::new();
    // VMs told to the core that the registry shows halted or refuses, since when.
    let mut held: BTreeMap<crate::ids::VmId, Instant> = BTreeMap::new();
    let mut coalescer = Coalescer::default();
    let mut reserve = Reserve::default();
    let mut renewed = BTreeSet::new();
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => {
                // The components run on without the agent (a restarted agent adopts them).
                followers.stop_all();
                fields.stop();
                if let Some(c) = components.take() {
                    c.supervisor.release();
                }
                return;
            }
            r = desired.changed() => {
                if r.is_err() {
                    return;
                }
                let Some(d) = desired.borrow_and_update().clone() else { continue };
                let (next, ins, _) = changes(&told, &d, &me);
                told = next;
                let held_now = held_told(&told, &d);
                held.retain(|vm, _| held_now.contains(vm));
                for vm in held_now {
                    held.entry(vm).or_insert_with(Instant::now);
                }
                for i in ins {
                    tracing::info!(input = ?i, "registry change for the core");
                    if inputs.send(i).await.is_err() {
                        return;
                    }
                }
            }
            _ = tick.tick() => {
                // A protected VM halted (or refused) for longer than a take-over or a registry
                // edit takes was shut down (or really refused): its protection ends.
                let expired: Vec<_> = held
                    .iter()
                    .filter(|(_, since)| since.elapsed() >= HOLD_GRACE)
                    .map(|(vm, _)| vm.clone())
                    .collect();
                for vm in expired {
                    held.remove(&vm);
                    told.remove(&vm);
                    tracing::info!(%vm, "the VM stays halted or refused: its protection ends");
                    if inputs.send(Input::Unprotect(vm)).await.is_err() {
                        return;
                    }
                }
                let Some(d) = desired.borrow().clone() else { continue };
                if let Some(c) = components.as_mut() {
                    // What the core says of each VM, read once for both.
                    let core = hub.snapshot();
                    // A VM the core protects that the registry shows halted is in a
                    // take-over (between `VM.power_state_reset` and `VM.start_on`) or was
                    // shut down; until HOLD_GRACE says which, its components stay as they
                    // are — the promoted disk and the relay serve the VM being started.
                    let in_take_over = |vm: &str| {
                        d.vms.get(vm).is_some_and(|v| v.resident_on.is_none())
                            && told.keys().any(|t: &crate::ids::VmId| t.as_str() == vm)
                    };
                    supervise(c, &d, &me, &core, &in_take_over, &mut followers, &inputs);
                    renew_stale_replicas(c, &core, &me, &mut renewed);
                }
                let master = d.master.is_some() && d.master.as_deref() == d.host_uuid(me.as_str());
                fields.keep(master.then(|| api.borrow().clone()).flatten());
                coalescer.retain(|vm_ref| d.refs.values().any(|r| r == vm_ref));
                let client = api.borrow().clone();
                if let Some(client) = &client {
                    reserve.recheck(&d, &me, client).await;
                }
                offer_states(&d, &hub, &me, &reserve.short, &mut coalescer);
                if let Some(client) = client {
                    for (vm_ref, line) in coalescer.due(Instant::now()) {
                        match write_state(&client, &vm_ref, &line).await {
                            Ok(()) => tracing::debug!(%vm_ref, state = %line, "state written"),
                            Err(e @ StateError::NewerFormat { .. }) => tracing::warn!(error = %e, "state not written"),
                            Err(e) => tracing::warn!(error = %e, %vm_ref, "writing the state failed; retried at the next change"),
                        }
                    }
                }
            }
        }
    }
}

/// The XenCenter custom-field watcher (`xenft-level` typed into a VM's field protects it,
/// clearing it unprotects), run by the pool master's agent only, on the current session.
#[derive(Default)]
struct FieldWatcher {
    running: Option<(Arc<xenft_xapi::XenApi>, watch::Sender<bool>)>,
}

impl FieldWatcher {
    /// Runs the watcher on `api` (the master's agent, connected), or stops it (`None`).
    fn keep(&mut self, api: Option<Arc<xenft_xapi::XenApi>>) {
        let same = match (&self.running, &api) {
            (Some((cur, _)), Some(new)) => Arc::ptr_eq(cur, new),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        self.stop();
        if let Some(api) = api {
            let (tx, rx) = watch::channel(false);
            let a = Arc::clone(&api);
            tokio::spawn(async move {
                tracing::info!("following the XenCenter custom fields (this host is the master)");
                xenft_xapi::customfields::CustomFieldWatcher::new()
                    .run(&a, rx)
                    .await;
            });
            self.running = Some((api, tx));
        }
    }

    fn stop(&mut self) {
        if let Some((_, tx)) = self.running.take() {
            let _ = tx.send(true);
        }
    }
}

/// Keeps this host's components as the registry wants them (a blocking step: a stop waits
/// for the component's clean exit).
fn supervise(
    c: &mut Components,
    d: &super::desired::Desired,
    me: &HostId,
    core: &crate::status::StatusSnapshot,
    in_take_over: &dyn Fn(&str) -> bool,
    followers: &mut Followers,
    inputs: &mpsc::Sender<Input>,
) {
    let Some(uuid) = d.host_uuid(me.as_str()) else {
        return;
    };
    c.facts.me = uuid.to_string();
    let (mut wanted, problems) = plan(d, &c.facts);
    for vm in d.vms.keys().filter(|vm| in_take_over(vm)) {
        wanted.extend(c.supervisor.specs_of(vm));
    }
    for (vm, why) in &problems {
        tracing::debug!(%vm, reason = %why, "no components for this VM");
    }
    // A VM whose disk the xenft SR mirrors: the disk seam (and a level-3 engine) reach the SR
    // volume's blkback, whose events are followed as those of our own. Linked before the
    // components are reconciled: a link goes before a blkback of ours needs the path, and
    // replaces that blkback's socket only once it has stopped (the next tick).
    let links = super::sr_disk::links(d, &c.facts);
    let (linked, r) = tokio::task::block_in_place(|| {
        super::sr_disk::apply(&c.facts.run_dir, &links, |vm| {
            c.supervisor.pid(vm, "blkback").is_some()
        })
    });
    if let Err(e) = r {
        tracing::warn!(error = %e, "the disk seam's link to an SR volume");
    }
    for l in &linked {
        tracing::info!(change = ?l, "SR volume");
        if let super::sr_disk::LinkChange::Unlinked { vm } = l {
            followers.unfollow(vm, "blkback");
        }
    }
    // Where the core holds the copy (the VM runs on the peer, nothing runs here), a
    // component that took the VM over earlier is no secondary any more.
    let is_secondary = |vm: &str| {
        core.vms.iter().any(|v| {
            v.record.vm.as_str() == vm
                && v.record.primary != *me
                && v.local == crate::core::LocalCopy::Stopped
        })
    };
    let replaced =
        tokio::task::block_in_place(|| c.supervisor.replace_took_over(&wanted, is_secondary));
    for (vm, name) in &replaced {
        tracing::warn!(%vm, component = name, "it took the VM over earlier; the VM runs on the peer now: replaced by a fresh secondary");
    }
    let changes =
        tokio::task::block_in_place(|| c.supervisor.reconcile(&wanted, std::time::Instant::now()));
    for ch in &changes {
        tracing::info!(change = ?ch, "component");
    }
    followers.apply(&changes, &c.facts.run_dir, inputs);
    for l in &links {
        if l.target.exists() {
            followers.follow(&l.vm, "blkback", &c.facts.run_dir, inputs);
        }
    }
}

/// A level-3 replica whose stream broke is stale: after the A-links were all cut (the core
/// suspended replication, the VM ran on unprotected on its primary) the primary's engine
/// protects the guest again only toward a fresh `xenft-checkpoint secondary` — a replica
/// that missed checkpoints cannot take the next one. So when this host, the VM's secondary,
/// sees the VM resyncing (its primary alive and syncing toward it again: no take-over will
/// use this replica) it restarts the VM's engine once per resync; the new process receives
/// the full copy. `renewed` remembers the VMs already restarted in their current resync.
fn renew_stale_replicas(
    c: &mut Components,
    core: &crate::status::StatusSnapshot,
    me: &HostId,
    renewed: &mut BTreeSet<crate::ids::VmId>,
) {
    let resyncing: Vec<_> = core
        .vms
        .iter()
        .filter(|v| {
            v.record.level == crate::lifecycle::Level::L3
                && v.record.phase == crate::lifecycle::Phase::Resyncing
                && v.record.primary != *me
                && v.local == crate::core::LocalCopy::Stopped
        })
        .map(|v| v.record.vm.clone())
        .collect();
    renewed.retain(|vm| resyncing.contains(vm));
    for vm in resyncing {
        if renewed.insert(vm.clone())
            && tokio::task::block_in_place(|| c.supervisor.renew(vm.as_str(), "checkpoint"))
        {
            tracing::warn!(%vm, "the VM resyncs toward this host: its stale memory replica is replaced by a fresh checkpoint secondary");
        }
    }
}

/// How often the secondaries' free memory is asked for when nothing in the registry changed
/// (a VM that is not protected may have started there).
const RESERVE_EVERY: Duration = Duration::from_secs(10);
/// Longest wait for one host's free memory.
const RESERVE_TIMEOUT: Duration = Duration::from_secs(3);

/// The reservation re-check of the VMs running on this host ([`super::reservation`]).
#[derive(Default)]
struct Reserve {
    checked: Option<(Instant, Arc<super::desired::Desired>)>,
    /// The VMs whose secondary cannot hold them now, with why.
    short: BTreeMap<String, String>,
}

impl Reserve {
    /// Asks xapi for the free memory of the secondaries of the VMs running here when the
    /// registry changed (a VM started, grew, was protected) or [`RESERVE_EVERY`] passed.
    async fn recheck(
        &mut self,
        d: &Arc<super::desired::Desired>,
        me: &HostId,
        api: &xenft_xapi::XenApi,
    ) {
        let due = self
            .checked
            .as_ref()
            .is_none_or(|(at, seen)| !Arc::ptr_eq(seen, d) || at.elapsed() >= RESERVE_EVERY);
        if !due {
            return;
        }
        self.checked = Some((Instant::now(), Arc::clone(d)));
        let Some(mine) = d.host_uuid(me.as_str()) else {
            return;
        };
        let secondaries: std::collections::BTreeSet<&String> = d
            .vms
            .values()
            .filter(|v| v.resident_on.as_deref() == Some(mine))
            .map(|v| &v.secondary)
            .collect();
        let mut free = BTreeMap::new();
        for host in secondaries {
            let Some(host_ref) = d.host_refs.get(host) else {
                continue;
            };
            match tokio::time::timeout(RESERVE_TIMEOUT, api.host_compute_free_memory(host_ref))
                .await
            {
                Ok(Ok(bytes)) => {
                    free.insert(host.clone(), bytes);
                }
                Ok(Err(e)) => tracing::warn!(%host, error = %e, "free memory not read"),
                Err(_) => tracing::warn!(%host, "free memory not read: xapi did not answer"),
            }
        }
        let short = super::reservation::shortfalls(d, &free);
        for (vm, why) in &short {
            if self.short.get(vm) != Some(why) {
                tracing::warn!(%vm, reason = %why, "take-over capacity");
            }
        }
        self.short = short;
    }
}

/// Offers the state line of every VM this host reports (a protected VM whose secondary
/// cannot hold it any more is `degraded` with the numbers, from `short`).
fn offer_states(
    d: &super::desired::Desired,
    hub: &StatusHub,
    me: &HostId,
    short: &BTreeMap<String, String>,
    coalescer: &mut Coalescer,
) {
    let snap = hub.snapshot();
    for v in &snap.vms {
        let uuid = v.record.vm.as_str();
        if let (Some(vm_ref), Some(mut state)) = (d.refs.get(uuid), state_of(v)) {
            if let (VmState::Protected, Some(why)) = (&state, short.get(uuid)) {
                state = VmState::Degraded { cause: why.clone() };
            }
            coalescer.offer(vm_ref, &state);
        }
    }
    let master = d.master.as_deref();
    if master.is_some() && master == d.host_uuid(me.as_str()) {
        for (uuid, why) in d.refused.iter().chain(problems(d, me).iter()) {
            if let Some(vm_ref) = d.refs.get(uuid) {
                coalescer.offer(
                    vm_ref,
                    &VmState::Error {
                        reason: why.clone(),
                    },
                );
            }
        }
    }
}

/// Requests the core cannot be given, with why (a halted VM, an unusable host name).
fn problems(d: &super::desired::Desired, me: &HostId) -> BTreeMap<String, String> {
    changes(&BTreeMap::new(), d, me).2
}
