//! The checkpoint protocol: [`primary`] (pre-copy + epoch loop), [`secondary`] (stage, verify,
//! apply, ack, failover), the channel they talk over ([`transport`]) and the commit hook
//! ([`commit`]).

pub mod commit;
pub mod primary;
pub mod secondary;
pub mod transport;

use thiserror::Error;

use crate::domain::DomainError;
use crate::wire::WireError;
use transport::TransportError;

/// Errors of the checkpoint engine.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The domain backend failed.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Encoding or decoding failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The checkpoint channel failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A setting out of range.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// An engine thread could not start or ended unexpectedly.
    #[error("engine thread: {0}")]
    Thread(String),
    /// Failover before any checkpoint reached the secondary.
    #[error("no committed checkpoint: the secondary cannot take over yet")]
    NoCommittedCheckpoint,
}
