//! [`DaemonError`]: why a `xenft-checkpoint` run failed — a kind callers can match on, the
//! step that failed with its context (path, domain), and the source.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

use crate::alink::AlinkAdapterError;
use crate::domain::DomainError;
use crate::engine::EngineError;
use crate::run::RunError;
use crate::workload::WorkloadError;

/// Why a daemon run failed.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// A Unix socket or file operation on `path`.
    #[error("{op} {}", path.display())]
    Io {
        /// What was done.
        op: IoOp,
        /// On which socket or file.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A step of the guest's (or the replica's) life.
    #[error("{op}")]
    Guest {
        /// Which step.
        op: GuestOp,
        /// Why it failed.
        source: DomainError,
    },
    /// The engine did not start, or did not fail over.
    #[error("{op}")]
    Engine {
        /// Which step.
        op: EngineOp,
        /// Why it failed.
        source: EngineError,
    },
    /// The tokio runtime for the A-link did not start.
    #[error("tokio runtime")]
    Runtime(#[source] std::io::Error),
    /// The A-link did not start, or no path came up in time.
    #[error("starting the A-link")]
    Link(#[source] RunError),
    /// The checkpoint channel on the A-link did not open.
    #[error("opening the checkpoint channel on the A-link")]
    Channel(#[source] AlinkAdapterError),
    /// Waiting for the primary to go ended otherwise.
    #[error("waiting for the primary to go")]
    WaitPrimary(#[source] RunError),
    /// The synthetic guest's workload is out of range, or its state does not decode.
    #[error("the synthetic guest's workload state")]
    Workload(#[source] WorkloadError),
}

/// The socket or file operation of a [`DaemonError::Io`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// The primary connects to the secondary's socket.
    Connect,
    /// A socket binds: the secondary's, or the control socket.
    Bind,
    /// The secondary accepts the primary's connection.
    Accept,
    /// A connected socket becomes the checkpoint channel.
    Channel,
    /// The commit log opens.
    CommitLog,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Connect => "connecting to",
            IoOp::Bind => "binding",
            IoOp::Accept => "accepting the primary on",
            IoOp::Channel => "setting up the checkpoint channel on",
            IoOp::CommitLog => "opening",
        })
    }
}

/// The guest's step of a [`DaemonError::Guest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestOp {
    /// Opening the running Xen domain to protect.
    OpenXen(u32),
    /// Opening (and zeroing) the paused Xen replica.
    OpenXenReplica(u32),
    /// Starting the synthetic guest to protect.
    Spawn,
    /// Creating the all-zero synthetic replica.
    Replica,
    /// Pausing the resumed synthetic guest after its run, to read its state.
    AfterRun,
}

impl fmt::Display for GuestOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestOp::OpenXen(domid) => write!(f, "opening Xen domain {domid}"),
            GuestOp::OpenXenReplica(domid) => {
                write!(f, "opening the replica, Xen domain {domid}")
            }
            GuestOp::Spawn => f.write_str("starting the synthetic guest"),
            GuestOp::Replica => f.write_str("creating the synthetic replica"),
            GuestOp::AfterRun => f.write_str("pausing the resumed synthetic guest after its run"),
        }
    }
}

/// The engine's step of a [`DaemonError::Engine`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineOp {
    /// Starting protection (primary).
    StartProtection,
    /// Starting to receive (secondary).
    StartSecondary,
    /// Resuming the replica from its last checkpoint.
    Failover,
}

impl fmt::Display for EngineOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineOp::StartProtection => "starting protection",
            EngineOp::StartSecondary => "starting the secondary",
            EngineOp::Failover => "failing over",
        })
    }
}

impl DaemonError {
    pub(super) fn io(op: IoOp, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| DaemonError::Io { op, path, source }
    }

    pub(super) fn guest(op: GuestOp) -> impl FnOnce(DomainError) -> Self {
        move |source| DaemonError::Guest { op, source }
    }

    pub(super) fn engine(op: EngineOp) -> impl FnOnce(EngineError) -> Self {
        move |source| DaemonError::Engine { op, source }
    }
}
