//! The VM's in-process components on a node: the synthetic guest under the checkpoint
//! engine, the blkback mirror or its copy, the service; booting, replicating, taking over,
//! fencing and dropping them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenft_agent::decision::Action;
use xenft_alink::{Link, LinkConfig, PathConfig};
use xenft_checkpoint::engine::commit::CommitSink;
use xenft_checkpoint::engine::primary::{
    start_protection, EpochPolicy, Phase as CkptPhase, PrimaryConfig, Protection,
};
use xenft_checkpoint::engine::secondary::{start_secondary, SecondaryConfig, SecondaryHandle};
use xenft_checkpoint::local::{LocalDomain, LocalGuestConfig};
use xenft_checkpoint::workload::{Pattern, WorkloadSpec, WorkloadState};

use crate::service::{NbdDisk, Service};
use crate::state::Takeover;
use crate::topology::{Host, SERVICE_IP, SERVICE_PORT};
use crate::{now_ms, LabError};

use super::disk::Role;
use super::net::Mode;
use super::{lock, with_port, Node, PATH_HEARTBEAT, PATH_TIMEOUT, SYNC_TIMEOUT, VM};

pub(super) struct LastCommit(AtomicU64);

impl CommitSink for LastCommit {
    fn checkpoint(&self, _epoch: u64) {}
    fn commit(&self, epoch: u64) {
        self.0.fetch_max(epoch, Ordering::SeqCst);
    }
}

/// The guest of a running copy: bare (unprotected) or under checkpoint protection.
pub(super) enum Guest {
    Bare(LocalDomain),
    Protected(Protection<LocalDomain>),
    Gone,
}

pub(super) struct Running {
    pub(super) guest: Guest,
    pub(super) guest_pid: Option<u32>,
    pub(super) svc: Arc<Service>,
    pub(super) svc_task: tokio::task::JoinHandle<()>,
    pub(super) paused: bool,
    pub(super) out_link: Option<Link>,
    pub(super) takeover: Option<Takeover>,
}

impl Running {
    /// A copy that just started running here (booted or resumed), not replicating yet.
    fn new(
        domain: LocalDomain,
        (svc, svc_task): (Arc<Service>, tokio::task::JoinHandle<()>),
        takeover: Option<Takeover>,
    ) -> Self {
        Self {
            guest_pid: domain.guest_pid(),
            guest: Guest::Bare(domain),
            svc,
            svc_task,
            paused: false,
            out_link: None,
            takeover,
        }
    }
}

pub(super) struct Replica {
    pub(super) link: Link,
    pub(super) sec: SecondaryHandle<LocalDomain>,
}

pub(super) enum Vm {
    Standby,
    Replica(Replica),
    Running(Running),
}

impl Node {
    pub(super) fn guest_workload(&self) -> Result<WorkloadState, LabError> {
        WorkloadState::new(
            WorkloadSpec {
                pattern: Pattern::Random,
                write_len: 256,
                rate_bytes_per_s: self.cfg.dirty_rate,
            },
            1,
        )
        .map_err(|e| LabError::component("guest workload", e))
    }

    /// A replication link: `primary` sends (the VM runs there), the other host receives.
    pub(super) fn replication_link(&self, primary: Host) -> Result<Link, LabError> {
        let (me, peer) = (self.me(), self.me().peer());
        let port = primary.replication_port();
        let mut lc = LinkConfig::new(
            me.name(),
            peer.name(),
            self.secret.clone(),
            (0..2)
                .map(|p| PathConfig {
                    local: with_port(me.alink_addr(p), port),
                    peer: with_port(peer.alink_addr(p), port),
                })
                .collect(),
        );
        lc.path_timeout = PATH_TIMEOUT;
        lc.heartbeat_interval = PATH_HEARTBEAT;
        self.handle
            .block_on(Link::start(lc))
            .map_err(|e| LabError::component("replication link", e))
    }

    /// Adds the service address to this host and starts the service on `volume`.
    pub(super) fn start_service(
        &self,
        volume: Arc<NbdDisk>,
    ) -> Result<(Arc<Service>, tokio::task::JoinHandle<()>), LabError> {
        self.claim_address()?;
        let svc = self
            .handle
            .block_on(Service::recover(volume, self.me().name()));
        self.serve(svc)
    }

    pub(super) fn serve(
        &self,
        svc: Arc<Service>,
    ) -> Result<(Arc<Service>, tokio::task::JoinHandle<()>), LabError> {
        let listener = self
            .handle
            .block_on(self.bind_service())
            .map_err(|e| LabError::component("service listener", e))?;
        let task = self.handle.spawn(Arc::clone(&svc).serve(listener));
        Ok((svc, task))
    }

    /// Boots the guest and the service here (fresh pool, or the agent's restart).
    pub(super) fn boot(&self) -> Result<Running, LabError> {
        self.start_blkback(Role::Primary)?;
        let volume = self.open_disk()?;
        let domain = LocalDomain::spawn(&LocalGuestConfig {
            binary: self.cfg.guest_binary.clone(),
            memory_bytes: self.cfg.memory_bytes,
            workload: self.guest_workload()?,
            tracking: xenft_checkpoint::local::guest::Tracking::Auto,
        })
        .map_err(|e| LabError::component("synthetic guest", e))?;
        self.start_netback(Mode::Passthrough)?;
        let (svc, svc_task) = self.start_service(volume)?;
        self.event(
            &format!("{VM} runs here; service up on {SERVICE_IP}:{SERVICE_PORT}"),
            "guest booted, disk served by blkback (mirror waits for the agent's sync), network through netback",
        );
        Ok(Running::new(domain, (svc, svc_task), None))
    }

    /// Becomes the secondary of the VM running on `primary`.
    pub(super) fn replica(&self, primary: Host) -> Result<Replica, LabError> {
        self.start_blkback(Role::Secondary)?;
        self.start_netback(Mode::Standby)?;
        let link = self.replication_link(primary)?;
        let replica = LocalDomain::replica(self.cfg.guest_binary.clone(), self.cfg.memory_bytes)
            .map_err(|e| LabError::component("replica memory", e))?;
        let endpoint = xenft_checkpoint::alink::endpoint(&link, self.handle.clone())
            .map_err(|e| LabError::component("checkpoint channel", e))?;
        let sec = start_secondary(replica, endpoint, SecondaryConfig::default())
            .map_err(|e| LabError::component("checkpoint secondary", e))?;
        self.event(
            &format!("secondary of {VM} (runs on {})", primary.name()),
            "replica memory and disk copy wait for the primary's sync",
        );
        Ok(Replica { link, sec })
    }

    /// The agent's latest `fail_over` decision, if any.
    pub(super) fn failover_reason(&self) -> Option<String> {
        let hub = self.hub.get()?;
        let (log, _) = hub.decisions();
        log.iter()
            .rev()
            .find(|d| d.action == Action::FailOver)
            .map(|d| d.reason.clone())
    }

    pub(super) fn resume_last_epoch(&self) -> Result<(), LabError> {
        let decided_ms = now_ms();
        let mut vm = lock(&self.vm);
        if !matches!(*vm, Vm::Replica(_)) {
            return Err(LabError::WrongState("no replica to resume here".into()));
        }
        let Vm::Replica(rep) = std::mem::replace(&mut *vm, Vm::Standby) else {
            return Err(LabError::WrongState("no replica to resume here".into()));
        };
        let Replica { link, sec } = rep;
        let (domain, epoch) = sec
            .failover()
            .map_err(|e| LabError::component("checkpoint failover", e))?;
        link.shutdown();
        self.event(
            &format!("guest resumed from checkpoint {epoch}"),
            "the last checkpoint applied whole on this host",
        );
        // The agent promoted this host's blkback before asking for the resume: it serves the
        // disk copy now.
        let volume = self.open_disk()?;
        let (svc, svc_task) = self.start_service(volume)?;
        let serving_ms = now_ms();
        let reason = self
            .failover_reason()
            .unwrap_or_else(|| "the agent decided to take over".into());
        self.event(
            &format!(
                "service up on {} with {} records recovered from the disk copy",
                self.me().name(),
                svc.count()
            ),
            "service address moved here",
        );
        let takeover = Takeover {
            decided_ms,
            serving_ms,
            failover_epoch: epoch,
            recovered_count: svc.count(),
            reason,
        };
        *vm = Vm::Running(Running::new(domain, (svc, svc_task), Some(takeover)));
        Ok(())
    }

    /// Starts the checkpoint stream to the peer if it is not running, then waits until a
    /// checkpoint is committed (the agent has waited for the disk sync through blkback).
    pub(super) fn protect_memory(&self) -> Result<(), LabError> {
        {
            let mut vm = lock(&self.vm);
            let Vm::Running(r) = &mut *vm else {
                return Err(LabError::WrongState("the VM does not run here".into()));
            };
            if r.out_link.is_none() {
                // A link of an earlier protection may still hold the port for a moment.
                let mut tries = 0;
                let link = loop {
                    match self.replication_link(self.me()) {
                        Ok(l) => break l,
                        Err(e) if tries >= 30 => return Err(e),
                        Err(_) => {
                            tries += 1;
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                };
                let endpoint = xenft_checkpoint::alink::endpoint(&link, self.handle.clone())
                    .map_err(|e| LabError::component("checkpoint channel", e))?;
                r.out_link = Some(link);
                if let Guest::Bare(domain) = std::mem::replace(&mut r.guest, Guest::Gone) {
                    let p = start_protection(
                        domain,
                        endpoint,
                        Arc::new(LastCommit(AtomicU64::new(0))),
                        PrimaryConfig {
                            epoch: EpochPolicy::Fixed(Duration::from_millis(self.cfg.epoch_ms)),
                            ..PrimaryConfig::default()
                        },
                    )
                    .map_err(|e| LabError::component("checkpoint primary", e))?;
                    r.guest = Guest::Protected(p);
                }
                self.event(
                    &format!("replicating {VM} to {}", self.me().peer().name()),
                    "the disk is in sync (blkback): checkpoint stream started",
                );
            }
        }
        let start = Instant::now();
        loop {
            {
                let vm = lock(&self.vm);
                let Vm::Running(r) = &*vm else {
                    return Err(LabError::WrongState("the VM stopped running here".into()));
                };
                let ckpt = match &r.guest {
                    Guest::Protected(p) => {
                        let s = p.status();
                        if let CkptPhase::Failed(e) = &s.phase {
                            return Err(LabError::component("checkpoint primary", e));
                        }
                        s.phase == CkptPhase::Protected && s.committed_epoch > 0
                    }
                    _ => false,
                };
                if ckpt {
                    return Ok(());
                }
            }
            if start.elapsed() > SYNC_TIMEOUT {
                return Err(LabError::Timeout("checkpoint stream to the peer".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(super) fn pause(&self) -> Result<(), LabError> {
        let mut vm = lock(&self.vm);
        let Vm::Running(r) = &mut *vm else {
            return Ok(());
        };
        r.svc.set_fenced(true);
        r.svc_task.abort();
        self.release_address();
        if let Some(pid) = r.guest_pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGSTOP,
            );
        }
        r.paused = true;
        Ok(())
    }

    pub(super) fn resume(&self) -> Result<(), LabError> {
        let mut vm = lock(&self.vm);
        let Vm::Running(r) = &mut *vm else {
            return Err(LabError::WrongState("the VM does not run here".into()));
        };
        if !r.paused {
            return Ok(());
        }
        if let Some(pid) = r.guest_pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
        self.claim_address()?;
        r.svc.set_fenced(false);
        let (_, task) = self.serve(Arc::clone(&r.svc))?;
        r.svc_task = task;
        r.paused = false;
        Ok(())
    }

    pub(super) fn destroy(&self) {
        // First: the main loop must not make this node the secondary on the way out (the
        // components it would start would outlive the process image and hold their ports).
        self.restart.store(true, Ordering::SeqCst);
        let mut vm = lock(&self.vm);
        if let Vm::Running(r) = &*vm {
            r.svc.set_fenced(true);
            r.svc_task.abort();
            self.release_address();
            if let Some(l) = &r.out_link {
                l.shutdown();
            }
        }
        *vm = Vm::Standby; // drops the guest (killed) and the replication link
        drop(vm);
        self.stop_blkback();
        self.stop_netback();
    }

    /// Follows the agent: a standby node becomes the secondary once its agent knows the
    /// peer runs the VM.
    pub(super) fn follow_agent(&self) {
        // A node about to restart must not become the secondary: the primary would sync to a
        // process that is going away.
        if self.unprotected.load(Ordering::SeqCst)
            || self.restart.load(Ordering::SeqCst)
            || !matches!(*lock(&self.vm), Vm::Standby)
        {
            return;
        }
        let a = self.agent_view();
        let peer = self.me().peer();
        if a.primary != peer.name() || a.peer_silent {
            return;
        }
        match self.replica(peer) {
            Ok(rep) => *lock(&self.vm) = Vm::Replica(rep),
            Err(e) => self.event("cannot become the secondary", &e.to_string()),
        }
    }

    /// Stops replicating (protection removed): the running copy stops its checkpoint stream
    /// (the guest keeps running; blkback keeps mirroring the disk while the peer's copy is
    /// there); a secondary drops its memory replica.
    pub(super) fn stop_replication(&self) {
        self.unprotected.store(true, Ordering::SeqCst);
        let mut vm = lock(&self.vm);
        match &mut *vm {
            Vm::Running(r) => {
                if let Guest::Protected(p) = std::mem::replace(&mut r.guest, Guest::Gone) {
                    // Stop while the peer still answers: the last epoch completes.
                    match p.stop() {
                        Ok(d) => r.guest = Guest::Bare(d),
                        Err(e) => {
                            self.event("checkpoint stream ended with an error", &e.to_string());
                        }
                    }
                }
                if let Some(l) = r.out_link.take() {
                    l.shutdown();
                }
            }
            Vm::Replica(rep) => {
                rep.link.shutdown();
                *vm = Vm::Standby;
            }
            Vm::Standby => {}
        }
    }
}
