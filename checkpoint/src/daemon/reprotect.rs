//! Level-3 re-protection: after a take-over, `protect` on the control socket protects the
//! resumed guest as `primary` does, toward the returning host's fresh secondary (over a Unix
//! socket or this process's own A-link), and `unprotect` ends it. The guest keeps running
//! whatever happens to the protection: [`reclaim`] takes it back, [`refresh`] notices a
//! protection that ended by itself.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenft_control::checkpoint::Reply;

use super::crash::CrashSink;
use super::guest::Guest;
use super::link::LinkHold;
use super::replica::{state_name, Replica};
use crate::alink::Cut;
use crate::domain::{Domain, DomainError, VcpuContext};
use crate::engine::commit::RecordingSink;
use crate::engine::primary::{
    start_protection_keep_domain, EpochPolicy, Phase, PrimaryConfig, Protection,
};
use crate::engine::transport::{unix_stream, Endpoint};
use crate::run::{link_up, PeerLoss};
use crate::shims::Shims;
use crate::workload::WorkloadState;

/// How the resumed guest is protected after a take-over (`protect` on the control socket):
/// the engine then acts as `primary` does, toward the returning host's secondary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reprotect {
    /// This host's `xenft-blkback` control socket (stamped as `primary --blkback-control`).
    pub blkback_control: Option<PathBuf>,
    /// This host's `xenft-netback` control socket (as `primary --netback-control`). The relay
    /// runs in pass-through after the take-over: it is switched to buffered at the first
    /// checkpoint (its epochs numbered after its own) and back to pass-through, releasing
    /// what it holds, when protection ends.
    pub netback_control: Option<PathBuf>,
    /// Epoch length when protecting.
    pub epoch: Duration,
}

/// The resumed guest as the engine sees it while protecting: each checkpoint's vCPU state
/// (the synthetic guest's workload counter) is noted, so `status` shows the guest progressing.
pub(super) struct Observed {
    pub(super) inner: Guest,
    /// The workload counter at the last checkpoint.
    counter: Arc<AtomicU64>,
}

impl Observed {
    fn note(&self, ctx: &VcpuContext) {
        if let Ok(w) = WorkloadState::decode(&ctx.0) {
            self.counter.store(w.counter, Ordering::Relaxed);
        }
    }
}

impl Domain for Observed {
    fn memory_pages(&self) -> u64 {
        self.inner.memory_pages()
    }
    fn pause(&mut self) -> Result<(), DomainError> {
        self.inner.pause()
    }
    fn resume(&mut self) -> Result<(), DomainError> {
        self.inner.resume()
    }
    fn enable_dirty_log(&mut self) -> Result<(), DomainError> {
        self.inner.enable_dirty_log()
    }
    fn disable_dirty_log(&mut self) -> Result<(), DomainError> {
        self.inner.disable_dirty_log()
    }
    fn read_and_clear_dirty(&mut self) -> Result<Vec<u64>, DomainError> {
        self.inner.read_and_clear_dirty()
    }
    fn read_pages(&mut self, pfns: &[u64], out: &mut [u8]) -> Result<(), DomainError> {
        self.inner.read_pages(pfns, out)
    }
    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), DomainError> {
        self.inner.write_pages(pfns, data)
    }
    fn vcpu_context(&mut self) -> Result<VcpuContext, DomainError> {
        let c = self.inner.vcpu_context()?;
        self.note(&c);
        Ok(c)
    }
    fn pause_and_collect(&mut self) -> Result<(Vec<u64>, VcpuContext), DomainError> {
        let (d, c) = self.inner.pause_and_collect()?;
        self.note(&c);
        Ok((d, c))
    }
    fn set_vcpu_context(&mut self, ctx: &VcpuContext) -> Result<(), DomainError> {
        self.inner.set_vcpu_context(ctx)
    }
    fn start_from_replica(&mut self) -> Result<(), DomainError> {
        self.inner.start_from_replica()
    }
}

/// The resumed guest, protected by this process as a primary.
pub(super) struct Reprotection {
    pub(super) protection: Protection<Observed>,
    /// The guest's workload counter at the last checkpoint.
    pub(super) counter: Arc<AtomicU64>,
    /// The relay to put back in pass-through when protection ends.
    relay: Option<PathBuf>,
    /// A handle on the channel, to cut it when protection must end now (`unprotect`).
    link: PeerCut,
    /// Where the secondary is.
    pub(super) peer: Peer,
    /// Over the A-link: the judgement that the secondary is gone (no live path for the path
    /// timeout), which ends protection as `primary` does.
    loss: Option<PeerLoss>,
    /// The checkpoint the guest resumed from at take-over.
    pub(super) resumed_epoch: u64,
    pub(super) guest_pid: Option<u32>,
}

/// Where `protect` sends the checkpoints.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum Peer {
    /// A `secondary --listen` Unix socket.
    Socket(PathBuf),
    /// The returning host's fresh secondary over this process's own A-link (its peer host).
    Alink(String),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Socket(p) => write!(f, "{}", p.display()),
            Peer::Alink(host) => write!(f, "alink:{host}"),
        }
    }
}

/// Ends a protection's channel now.
pub(super) enum PeerCut {
    Socket(UnixStream),
    Alink(Cut),
}

impl PeerCut {
    fn cut(&self) {
        match self {
            PeerCut::Socket(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            PeerCut::Alink(c) => c.cut(),
        }
    }
}

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why a `protect` request is refused (the guest keeps running in every case).
#[derive(Debug, thiserror::Error)]
pub(super) enum ProtectError {
    #[error("this engine has no A-link (it uses a Unix socket): protect <absolute path of the returning host's secondary socket>")]
    NoAlink,
    #[error("the A-link to {0} has no live path: start the returning host's `xenft-checkpoint secondary` with the mirrored A-link options first")]
    AlinkDown(String),
    #[error("the peer on the A-link to {0} is still the process this host last exchanged checkpoints with: protect needs a fresh `xenft-checkpoint secondary` there")]
    SamePeer(String),
    #[error("the secondary's socket must be an absolute path of at most {MAX_SOCKET_PATH} bytes without control characters")]
    BadPeer,
    #[error("no running guest to protect (state {0}): on a secondary, protect follows failover")]
    NotRunning(&'static str),
    #[error("already protecting toward {0}")]
    AlreadyProtecting(String),
    #[error("connecting to the secondary at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("starting protection: {0}")]
    Engine(String),
}

/// Parses and checks `protect`'s argument: none or `alink` is this process's A-link (to
/// `alink_peer`, if it has one), else a socket path.
fn peer_of(arg: Option<&str>, alink_peer: Option<&str>) -> Result<Peer, ProtectError> {
    let a = arg.map(str::trim).filter(|a| !a.is_empty());
    match a {
        None | Some("alink") => alink_peer
            .map(|h| Peer::Alink(h.to_string()))
            .ok_or(ProtectError::NoAlink),
        Some(a) => {
            if a.len() > MAX_SOCKET_PATH || !a.starts_with('/') || a.chars().any(char::is_control) {
                return Err(ProtectError::BadPeer);
            }
            Ok(Peer::Socket(PathBuf::from(a)))
        }
    }
}

/// Ends a protection and takes the (running) guest back. `cut`: cut the link first, so a
/// send in progress cannot hold the stop.
pub(super) fn reclaim(r: Reprotection, cut: bool, why: Option<String>) -> Replica {
    if cut {
        r.link.cut();
    }
    let epoch = r.resumed_epoch;
    let stopped = r.protection.stop_keep_domain();
    // Unprotected again: the relay releases what it holds and passes output through.
    Shims::new(None, r.relay.clone()).relay_passthrough();
    match stopped {
        Ok(domain) => Replica::Running {
            domain: domain.inner,
            epoch,
            last_error: why,
        },
        Err((Some(domain), e)) => Replica::Running {
            domain: domain.inner,
            epoch,
            last_error: why.or_else(|| Some(e.to_string())),
        },
        Err((None, e)) => Replica::Failed(format!("protection lost the guest: {e}")),
    }
}

/// A protection that ended by itself (the secondary went away) gives the guest back. Over
/// the A-link (`alink`), a secondary with no live path for the path timeout is gone too.
/// Returns why, when a protection ended.
pub(super) fn refresh(state: &mut Replica, alink: Option<&LinkHold>) -> Option<String> {
    let mut lost = None;
    if let (Replica::Protecting(r), Some(hold)) = (&mut *state, alink) {
        if let Some(loss) = r.loss.as_mut() {
            if loss.observe(Instant::now(), link_up(&hold.link), Some(0)) {
                lost = Some(format!(
                    "the secondary is gone: no A-link path for {:?}",
                    hold.path_timeout
                ));
            }
        }
    }
    let ended =
        lost.is_some() || matches!(state, Replica::Protecting(r) if r.protection.is_finished());
    if !ended {
        return None;
    }
    let Replica::Protecting(r) = std::mem::replace(state, Replica::Waiting) else {
        return None;
    };
    let why = match (lost, r.protection.status().phase) {
        (Some(why), _) | (None, Phase::Failed(why)) => why,
        _ => "protection ended".to_string(),
    };
    tracing::warn!(reason = %why, "protection of the resumed guest ended; the guest keeps running");
    *state = reclaim(*r, true, Some(why.clone()));
    Some(why)
}

/// The checkpoint channel toward `peer`, and how to cut it; over the A-link also the judge
/// of the secondary's loss.
fn protect_channel(
    peer: &Peer,
    alink: Option<&LinkHold>,
) -> Result<(Endpoint, PeerCut, Option<PeerLoss>), ProtectError> {
    match (peer, alink) {
        (Peer::Socket(path), _) => {
            let sock = UnixStream::connect(path).map_err(|source| ProtectError::Connect {
                path: path.display().to_string(),
                source,
            })?;
            let cut = sock
                .try_clone()
                .map_err(|e| ProtectError::Engine(e.to_string()))?;
            let endpoint = unix_stream(sock).map_err(|e| ProtectError::Engine(e.to_string()))?;
            Ok((endpoint, PeerCut::Socket(cut), None))
        }
        (Peer::Alink(host), Some(hold)) => {
            if !link_up(&hold.link) {
                return Err(ProtectError::AlinkDown(host.clone()));
            }
            // The returning host's secondary is a fresh process: a peer session this host
            // already exchanged checkpoints with is the old primary (still alive behind a
            // partition) or a secondary that already received a protection.
            let now = hold.link.status().peer_session;
            if now.is_none() || now == hold.channel.last_peer_session() {
                return Err(ProtectError::SamePeer(host.clone()));
            }
            let (endpoint, cut) = hold.channel.endpoint();
            // Once streamed to, that secondary is not fresh any more (whatever happens next).
            hold.channel.note_peer_session(now);
            Ok((
                endpoint,
                PeerCut::Alink(cut),
                Some(PeerLoss::new(hold.path_timeout)),
            ))
        }
        (Peer::Alink(_), None) => Err(ProtectError::NoAlink),
    }
}

/// How one protection starts: what its checkpoints and commits drive, and the engine's
/// settings.
pub(super) struct Start {
    pub(super) sink: CrashSink,
    pub(super) config: PrimaryConfig,
}

/// `protect [<socket>|alink]`: the resumed guest is protected toward a secondary at `socket`,
/// or toward the peer over this process's A-link (`alink`). Its shims are stamped as a
/// re-protection: the disk epochs numbered from 0 again, the relay switched to buffered at
/// the first checkpoint.
pub(super) fn protect(
    state: &mut Replica,
    arg: Option<&str>,
    re: &Reprotect,
    alink: Option<&LinkHold>,
) -> Result<Reply, ProtectError> {
    protect_with(state, arg, re, alink, || {
        let shims =
            Shims::new(re.blkback_control.clone(), re.netback_control.clone()).reprotecting();
        shims.restart_disk_epochs();
        Start {
            sink: CrashSink {
                inner: RecordingSink::new(),
                crash: None,
                shims,
            },
            config: PrimaryConfig {
                epoch: EpochPolicy::Fixed(re.epoch),
                ..PrimaryConfig::default()
            },
        }
    })
}

/// `protect` with the protection built by `start` (called once the channel is open).
pub(super) fn protect_with(
    state: &mut Replica,
    arg: Option<&str>,
    re: &Reprotect,
    alink: Option<&LinkHold>,
    start: impl FnOnce() -> Start,
) -> Result<Reply, ProtectError> {
    let alink_peer = alink.map(|h| h.link.status().peer_host);
    let peer = peer_of(arg, alink_peer.as_deref())?;
    match &*state {
        Replica::Running { .. } => {}
        Replica::Protecting(r) if r.peer == peer => {
            return Ok(Reply::Protecting {
                peer: peer.to_string(),
                already: true,
            });
        }
        Replica::Protecting(r) => return Err(ProtectError::AlreadyProtecting(r.peer.to_string())),
        other => return Err(ProtectError::NotRunning(state_name(other))),
    }
    let (endpoint, link, loss) = protect_channel(&peer, alink)?;
    let Start { sink, config } = start();
    let Replica::Running { domain, epoch, .. } = std::mem::replace(state, Replica::Waiting) else {
        return Err(ProtectError::NotRunning("changed"));
    };
    let guest_pid = domain.guest_pid();
    let counter = Arc::new(AtomicU64::new(0));
    let observed = Observed {
        inner: domain,
        counter: Arc::clone(&counter),
    };
    match start_protection_keep_domain(observed, endpoint, Arc::new(sink), config) {
        Ok(protection) => {
            tracing::warn!(%peer, "the guest is protected");
            *state = Replica::Protecting(Box::new(Reprotection {
                protection,
                counter,
                relay: re.netback_control.clone(),
                link,
                peer: peer.clone(),
                loss,
                resumed_epoch: epoch,
                guest_pid,
            }));
            Ok(Reply::Protecting {
                peer: peer.to_string(),
                already: false,
            })
        }
        Err((domain, e)) => {
            link.cut();
            let why = e.to_string();
            *state = match domain {
                Some(domain) => Replica::Running {
                    domain: domain.inner,
                    epoch,
                    last_error: Some(why.clone()),
                },
                None => Replica::Failed(format!("protection lost the guest: {why}")),
            };
            Err(ProtectError::Engine(why))
        }
    }
}
