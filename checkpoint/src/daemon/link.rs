//! The ends of the checkpoint channel a `xenft-checkpoint` process opens: a Unix socket
//! (`--connect` / `--listen`) or the A-link's checkpoint channel, held with its runtime for as
//! long as the process uses it.

use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use xenft_alink::{Link, LinkConfig};

use super::error::{DaemonError, IoOp};
use super::{PrimaryTransport, SecondaryTransport};
use crate::alink::CheckpointChannel;
use crate::engine::transport::{unix_stream, Endpoint};
use crate::run::start_link;

/// An A-link carrying the checkpoint channel, and the runtime it runs on; dropping it ends
/// the link.
pub(super) struct LinkHold {
    pub(super) link: Link,
    /// The link's checkpoint channel, for each engine run on it.
    pub(super) channel: CheckpointChannel,
    /// No live path this long after a commit: the primary is gone (secondary).
    pub(super) path_timeout: Duration,
    _rt: tokio::runtime::Runtime,
}

/// An A-link carrying the checkpoint channel; with `wait`, fails unless a path comes up in
/// time. Each engine run on it takes its own end ([`CheckpointChannel::endpoint`]).
pub(super) fn alink_hold(cfg: LinkConfig, wait: Option<Duration>) -> Result<LinkHold, DaemonError> {
    let rt = tokio::runtime::Runtime::new().map_err(DaemonError::Runtime)?;
    let path_timeout = cfg.path_timeout;
    let link = start_link(&rt, cfg, wait).map_err(DaemonError::Link)?;
    let channel =
        CheckpointChannel::new(&link, rt.handle().clone()).map_err(DaemonError::Channel)?;
    Ok(LinkHold {
        link,
        channel,
        path_timeout,
        _rt: rt,
    })
}

/// The checkpoint channel over an A-link; with `wait`, fails unless a path comes up in time.
fn alink_endpoint(
    cfg: LinkConfig,
    wait: Option<Duration>,
) -> Result<(Endpoint, LinkHold), DaemonError> {
    let hold = alink_hold(cfg, wait)?;
    let (ep, _) = hold.channel.endpoint();
    Ok((ep, hold))
}

/// The primary's end of the checkpoint channel: connected to the secondary's Unix socket, or
/// the A-link once a path is up.
pub(super) fn primary_endpoint(
    transport: PrimaryTransport,
) -> Result<(Endpoint, Option<LinkHold>), DaemonError> {
    match transport {
        PrimaryTransport::Connect(path) => {
            let sock = UnixStream::connect(&path).map_err(DaemonError::io(IoOp::Connect, &path))?;
            let endpoint = unix_stream(sock).map_err(DaemonError::io(IoOp::Channel, path))?;
            Ok((endpoint, None))
        }
        PrimaryTransport::Alink { link, wait } => {
            let (ep, hold) = alink_endpoint(link, Some(wait))?;
            Ok((ep, Some(hold)))
        }
    }
}

/// The secondary's end of the checkpoint channel: the first connection on the Unix socket
/// it listens on, or the A-link.
pub(super) fn secondary_endpoint(
    transport: SecondaryTransport,
) -> Result<(Endpoint, Option<LinkHold>), DaemonError> {
    match transport {
        SecondaryTransport::Listen(listen) => {
            let _ = std::fs::remove_file(&listen);
            let l = UnixListener::bind(&listen).map_err(DaemonError::io(IoOp::Bind, &listen))?;
            let (sock, _) = l.accept().map_err(DaemonError::io(IoOp::Accept, &listen))?;
            let endpoint = unix_stream(sock).map_err(DaemonError::io(IoOp::Channel, listen))?;
            Ok((endpoint, None))
        }
        SecondaryTransport::Alink(cfg) => {
            let (ep, hold) = alink_endpoint(cfg, None)?;
            Ok((ep, Some(hold)))
        }
    }
}
