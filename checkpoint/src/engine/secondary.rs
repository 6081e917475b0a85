//! Secondary side: stage each epoch whole, verify it, apply it atomically, acknowledge it;
//! on failover resume the replica from the last committed checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tracing::{info, warn};

use super::transport::{Endpoint, FrameReceiver, FrameSender, TransportError};
use super::EngineError;
use crate::domain::{Domain, VcpuContext};
use crate::wire::{apply_epoch, memory_digest, EpochAssembler, Fed, Frame, NackReason};

/// Settings of the secondary.
#[derive(Clone, Debug, Default)]
pub struct SecondaryConfig {
    /// Check the primary's whole-memory digest after applying each checkpoint that carries
    /// one (verification mode).
    pub verify_memory_digest: bool,
}

/// A snapshot of the secondary's progress (serialises to JSON).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SecondaryStatus {
    /// Last checkpoint applied — the state failover resumes from.
    pub committed_epoch: Option<u64>,
    /// Epochs (pre-copy chunks and checkpoints) applied.
    pub applied_epochs: u64,
    /// Epochs refused (corrupt, truncated, out of order, out of range).
    pub rejected_epochs: u64,
    /// The last refusal or error.
    pub last_error: Option<String>,
    /// Checkpoints whose memory digest was compared.
    pub digest_checks: u64,
    /// Of those, how many differed.
    pub digest_mismatches: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// The channel to the primary closed.
    pub primary_gone: bool,
}

struct Shared {
    stop: AtomicBool,
    status: Mutex<SecondaryStatus>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct State<D> {
    domain: D,
    assembler: EpochAssembler,
    committed: Option<(u64, VcpuContext)>,
    next_expected: u64,
    nacked_for: Option<u64>,
}

/// A running secondary.
pub struct SecondaryHandle<D: Domain + 'static> {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<State<D>>>,
}

/// A secondary whose receive loop has ended: the replica holds the last committed checkpoint.
pub struct StoppedSecondary<D> {
    domain: D,
    committed: Option<(u64, VcpuContext)>,
}

/// Starts receiving checkpoints into `replica` (all zero, same size as the primary).
pub fn start_secondary<D: Domain + 'static>(
    replica: D,
    link: Endpoint,
    config: SecondaryConfig,
) -> Result<SecondaryHandle<D>, EngineError> {
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        status: Mutex::new(SecondaryStatus::default()),
    });
    let s = Arc::clone(&shared);
    let pages = replica.memory_pages();
    let state = State {
        domain: replica,
        assembler: EpochAssembler::new(pages),
        committed: None,
        next_expected: 1,
        nacked_for: None,
    };
    let thread = std::thread::Builder::new()
        .name("ckpt-secondary".into())
        .spawn(move || receive_loop(&s, state, link, &config))
        .map_err(|e| EngineError::Thread(e.to_string()))?;
    Ok(SecondaryHandle {
        shared,
        thread: Some(thread),
    })
}

impl<D: Domain + 'static> SecondaryHandle<D> {
    /// Current progress.
    pub fn status(&self) -> SecondaryStatus {
        lock(&self.shared.status).clone()
    }

    /// Stops receiving; any partly received epoch is discarded.
    pub fn stop(mut self) -> Result<StoppedSecondary<D>, EngineError> {
        self.shared.stop.store(true, Ordering::Release);
        let st = self
            .thread
            .take()
            .ok_or(EngineError::Thread("secondary already stopped".into()))?
            .join()
            .map_err(|_| EngineError::Thread("secondary thread panicked".into()))?;
        let State {
            domain,
            mut assembler,
            committed,
            ..
        } = st;
        assembler.discard();
        Ok(StoppedSecondary { domain, committed })
    }

    /// Failover: stop receiving, discard any partial epoch and resume the replica from the
    /// last committed checkpoint. Returns the running domain and that checkpoint's number.
    pub fn failover(self) -> Result<(D, u64), EngineError> {
        self.stop()?.failover()
    }
}

impl<D: Domain + 'static> Drop for SecondaryHandle<D> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<D: Domain> StoppedSecondary<D> {
    /// The last committed checkpoint and its vCPU state.
    pub fn committed(&self) -> Option<(u64, &VcpuContext)> {
        self.committed.as_ref().map(|(e, c)| (*e, c))
    }

    /// The replica (e.g. to inspect its memory before resuming it).
    pub fn domain_mut(&mut self) -> &mut D {
        &mut self.domain
    }

    /// Resumes the replica from the last committed checkpoint.
    pub fn failover(mut self) -> Result<(D, u64), EngineError> {
        let Some((epoch, ctx)) = self.committed.take() else {
            return Err(EngineError::NoCommittedCheckpoint);
        };
        self.domain.set_vcpu_context(&ctx)?;
        self.domain.start_from_replica()?;
        info!(
            epoch,
            "failover: replica resumed from the last committed checkpoint"
        );
        Ok((self.domain, epoch))
    }
}

fn reply(tx: &mut dyn FrameSender, f: &Frame) {
    // A dead primary cannot take acks; the receive side notices and ends the loop.
    let _ = tx.send(Bytes::from(f.encode()));
}

fn receive_loop<D: Domain>(
    shared: &Shared,
    mut st: State<D>,
    link: Endpoint,
    cfg: &SecondaryConfig,
) -> State<D> {
    let (mut tx, mut rx): (Box<dyn FrameSender>, Box<dyn FrameReceiver>) = link;
    while !shared.stop.load(Ordering::Acquire) {
        let raw = match rx.recv(Duration::from_millis(20)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                let mut s = lock(&shared.status);
                s.primary_gone = true;
                if !matches!(e, TransportError::Closed) {
                    s.last_error = Some(e.to_string());
                }
                break;
            }
        };
        lock(&shared.status).bytes_received += raw.len() as u64;
        let refuse =
            |st: &mut State<D>, tx: &mut dyn FrameSender, reason: NackReason, msg: String| {
                warn!(expected = st.next_expected, %msg, "epoch refused");
                {
                    let mut s = lock(&shared.status);
                    s.rejected_epochs += 1;
                    s.last_error = Some(msg);
                }
                reply(
                    tx,
                    &Frame::Nack {
                        expected: st.next_expected,
                        reason,
                    },
                );
                st.nacked_for = Some(st.next_expected);
            };
        let in_progress = st.assembler.staging();
        match st.assembler.feed(&raw) {
            Ok(Fed::Staged | Fed::Control(_)) => {}
            Err(e) => {
                // Ask again for the epoch we wait for when it is the one that failed; for
                // stray frames (the rest of an epoch already refused) ask once per epoch.
                let wanted = in_progress == Some(st.next_expected);
                if wanted || (in_progress.is_none() && st.nacked_for != Some(st.next_expected)) {
                    refuse(&mut st, tx.as_mut(), e.nack_reason(), e.to_string());
                } else {
                    let mut s = lock(&shared.status);
                    s.rejected_epochs += u64::from(in_progress.is_some());
                    s.last_error = Some(e.to_string());
                }
            }
            Ok(Fed::Complete(ep)) => {
                if ep.epoch < st.next_expected {
                    // A re-send of something already applied.
                    reply(
                        tx.as_mut(),
                        &Frame::Ack {
                            epoch: st.next_expected - 1,
                        },
                    );
                    continue;
                }
                if ep.epoch > st.next_expected {
                    if st.nacked_for != Some(st.next_expected) {
                        let msg =
                            format!("epoch {} arrived, expected {}", ep.epoch, st.next_expected);
                        refuse(&mut st, tx.as_mut(), NackReason::OutOfOrder, msg);
                    }
                    continue;
                }
                if let Err(e) = apply_epoch(&ep, &mut st.domain) {
                    refuse(&mut st, tx.as_mut(), NackReason::ApplyFailed, e.to_string());
                    continue;
                }
                if let Some(ctx) = ep.vcpu {
                    st.committed = Some((ep.epoch, ctx));
                }
                st.next_expected += 1;
                st.nacked_for = None;
                let mut check = None;
                if let (true, Some(want)) = (cfg.verify_memory_digest, ep.memory_digest) {
                    check = Some(memory_digest(&mut st.domain).map(|got| got == want));
                }
                {
                    let mut s = lock(&shared.status);
                    s.applied_epochs += 1;
                    if st.committed.as_ref().is_some_and(|c| c.0 == ep.epoch) {
                        s.committed_epoch = Some(ep.epoch);
                    }
                    match check {
                        Some(Ok(true)) => s.digest_checks += 1,
                        Some(Ok(false)) => {
                            s.digest_checks += 1;
                            s.digest_mismatches += 1;
                            s.last_error =
                                Some(format!("epoch {}: memory digest differs", ep.epoch));
                        }
                        Some(Err(e)) => s.last_error = Some(e.to_string()),
                        None => {}
                    }
                }
                reply(tx.as_mut(), &Frame::Ack { epoch: ep.epoch });
            }
        }
    }
    st
}
