//! xenft-checkpoint: the level-3 checkpoint engine, as a library, and the `xenft-checkpoint`
//! daemon (a thin binary over [`daemon`]) that runs one side of it as a process.
//!
//! It is not the decision maker: it neither decides when to fail over or re-protect (the
//! agent does, through the control socket) nor replicates disks or network output (the
//! blkback and netback shims do; the engine only stamps and commits their epochs).
//!
//! Keeps a second copy of a running domain — memory and vCPU state — one checkpoint epoch
//! behind the primary, so that losing the primary host loses nothing the outside world has
//! seen. It sits between the domain (Xen, or a local synthetic guest) and the A-link
//! `Checkpoint` channel; the agent drives it and adapts the netback/blkback shims to its
//! [`engine::commit::CommitSink`].
//!
//! ```text
//!  primary host                                                secondary host
//!  Domain --pause/dirty/copy/resume--> checkpointer --staged--> sender ==frames==> secondary
//!                                                                  ^                 | stage whole epoch,
//!  CommitSink <--commit(epoch)-- acker <========= Ack / Nack ======+-----------------+ verify, apply, ack
//! ```
//!
//! # Modules
//! - [`domain`]: the seam — [`domain::Domain`] (pause, resume, dirty log, read/write pages,
//!   vCPU context, memory size, start from replica).
//! - [`local`]: synthetic guest backend (separate process, memfd memory, userfaultfd
//!   write-protect dirty tracking, deterministic [`workload`]).
//! - [`xen`]: Xen backend (libxenctrl + libxenforeignmemory loaded at run time).
//! - [`wire`]: epoch wire format, encoder (zero / XOR + LZ4 / raw) and assembler; split into
//!   frames and their codec, errors, encoder, assembler and applying to the replica.
//! - [`engine`]: primary ([`engine::primary`]), secondary ([`engine::secondary`]), transport
//!   trait and implementations ([`engine::transport`]), commit hook ([`engine::commit`]).
//! - [`alink`]: the engine's channel over the A-link (`Channel::Checkpoint`).
//! - [`run`]: driving the engine from a process — A-link start, the secondary's "primary
//!   gone" judgement (no live path for the path timeout after a commit), the primary's loop.
//! - [`shims`]: the engine's typed clients for the blkback and netback shims' epochs.
//! - [`daemon`]: the `xenft-checkpoint` process — primary, secondary, and the secondary the
//!   agent drives over its control socket; its parts:
//!   - `daemon::guest`: [`daemon::GuestKind`], a synthetic guest or a Xen domain as one
//!     domain.
//!   - `daemon::link`: the channel's ends, a Unix socket or the A-link held with its runtime.
//!   - `daemon::error`: [`daemon::DaemonError`], the step that failed and why.
//!   - `daemon::crash`: crash injection for tests ([`daemon::CrashAt`]).
//!   - `daemon::replica`: the `--control` secondary's state machine and its requests.
//!   - `daemon::reprotect`: `protect` / `unprotect` of the resumed guest
//!     ([`daemon::Reprotect`]).
//! - [`testing`]: in-memory domain for tests.
//!
//! # API for the agent
//!
//! **Start protection (primary host).** Open the domain, get an endpoint to the secondary
//! (over the A-link: [`alink::endpoint`]`(&link, runtime_handle)`; or any
//! [`engine::transport::FrameSender`]/[`engine::transport::FrameReceiver`] pair), and a [`engine::commit::CommitSink`] that releases net output / applies disk
//! writes per epoch:
//! ```no_run
//! # use std::sync::Arc;
//! # use xenft_checkpoint::{xen::XenDomain, engine::{primary::*, transport::memory_pair, commit::RecordingSink}};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let domain = XenDomain::open(7, 2)?;                       // domid 7, 2 vCPUs
//! let (to_secondary, _other_end) = memory_pair();             // or the A-link endpoint
//! let sink = Arc::new(RecordingSink::new());                  // agent: netback + blkback adapter
//! let protection = start_protection(domain, to_secondary, sink, PrimaryConfig::default())?;
//! # Ok(()) }
//! ```
//! **Status.** `protection.status()` returns [`engine::primary::ProtectionStatus`]: `phase`
//! (Precopy / Protected / Stopped / Failed(reason)), `epoch` (last checkpoint taken),
//! `committed_epoch`, `lag_bytes` (sent, not yet acknowledged), `last_commit_age`, pause and
//! commit-latency percentiles, raw vs wire bytes. `protection.checkpoint_now()` ends the
//! current epoch early (netback high-water mark). `protection.stop()` returns the running
//! domain. Protection that fails (link lost, domain error) resumes the domain and reports
//! `Phase::Failed`; it never leaves the VM paused.
//! ```no_run
//! # use xenft_checkpoint::engine::primary::Protection; use xenft_checkpoint::xen::XenDomain;
//! # fn f(protection: Protection<XenDomain>) {
//! let st = protection.status();
//! println!("epoch {} committed {} lag {} B", st.epoch, st.committed_epoch, st.lag_bytes);
//! # }
//! ```
//! **Secondary host.** Build the replica (an all-zero domain of the same size, paused; for
//! the synthetic guest [`local::LocalDomain::replica`]; on Xen a domain created paused from the
//! same configuration, `xl create -p`, opened with [`xen::XenDomain::open_replica`], which
//! zeroes it) and start receiving:
//! ```no_run
//! # use xenft_checkpoint::engine::{secondary::*, transport::memory_pair};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let (_p, from_primary) = memory_pair();
//! # let replica = xenft_checkpoint::testing::MemoryDomain::new(16);
//! let secondary = start_secondary(replica, from_primary, SecondaryConfig::default())?;
//! let st = secondary.status();        // committed_epoch, applied/rejected epochs, primary_gone
//! // Membership declares the primary dead:
//! let (running_domain, epoch) = secondary.failover()?;
//! # Ok(()) }
//! ```
//! **Failover** discards any partly received epoch and resumes the replica from the last
//! checkpoint it applied (an epoch is applied whole or not at all, after its checksum
//! verified). It fails with [`engine::EngineError::NoCommittedCheckpoint`] while still in
//! pre-copy. Every epoch whose output the primary released was acknowledged, hence applied,
//! before the release.
//!
//! # Wiring the shims (agent)
//! The sink's calls map onto the shims' epoch APIs as follows (epoch `n` = checkpoint `n`):
//! ```text
//! CommitSink::checkpoint(n)  (domain paused)  netback.begin_epoch(n + 1); blk_primary.set_epoch(n + 1)
//! CommitSink::commit(n)      (secondary has n) netback.commit(n); blk_primary.commit_epoch(n)
//! ```
//! Output and writes issued before checkpoint `n` carry epoch `<= n` and are released /
//! applied when `n` commits. `checkpoint` runs inside the pause: keep it short.
//!
//! **Failover must commit the disk up to the memory state it resumes**: the secondary can
//! hold checkpoint `n` (applied and acked) while the primary died before committing it, so
//! the blkback secondary never heard `commit_epoch(n)`. Resuming memory `n` with disk `n - 1`
//! would lose writes the guest saw complete. So, on the secondary host:
//! ```text
//! let stopped = secondary.stop()?;           // no more epochs; replica holds checkpoint n
//! let n = stopped.committed().map(|(n, _)| n).ok_or(NoCheckpointYet)?;
//! blk_secondary.commit_epoch(n)?;            // disk writes of every epoch <= n
//! blk_secondary.discard_uncommitted();       // only epochs after n are dropped
//! let (domain, n) = stopped.failover()?;     // guest resumes with memory + vCPUs of n
//! ```
//!
//! # Logging
//! `tracing` levels: `info` for phase changes (pre-copy done, failover), `warn` for every
//! refusal, re-send and failure with its reason, `debug` per checkpoint (dirty pages, pause,
//! next epoch length). Fields: `epoch`, `expected`, `error`.
//!
//! # Epochs and numbering
//! Pre-copy chunks and checkpoints share one epoch sequence (1, 2, ...); only checkpoints
//! carry vCPU state, are passed to [`engine::commit::CommitSink`] and can be resumed from.

pub mod alink;
pub mod daemon;
pub mod domain;
pub mod engine;
pub mod local;
pub mod run;
pub mod shims;
#[allow(unsafe_code)]
mod sys;
pub mod testing;
pub mod wire;
pub mod workload;
pub mod xen;

pub use sys::take_inherited_fd;
