//! The agent's XenAPI follower: logs in to the pool's xapi, follows the registry with
//! `event.from` (a token loop, no polling) and publishes the [`Desired`] state on a watch
//! channel.
//!
//! - Where: in dom0 over xapi's local socket, elsewhere over HTTPS with a CA file or a pin
//!   (`xenft_xapi::transport`). Credentials come from a file ([`read_credentials`]: the
//!   user on the first line, the password on the second), never from argv.
//! - The master: a login on a pool member answers `HOST_IS_SLAVE [master address]`; the
//!   follower then talks to `https://<master>` with the same trust settings.
//! - Failures: after an xapi restart, a master change or any connection failure it logs in
//!   again with backoff ([`BACKOFF`] doubling to [`MAX_BACKOFF`]) and re-reads everything;
//!   meanwhile the last published state stays: protection, membership, quorum and fencing
//!   never wait for xapi. `EVENTS_LOST` means a full re-read.
//! - Classes followed: `pool`, `host`, `VM` (the registry) and `VIF`, `VBD`, `VDI` (the
//!   devices the components are started with: [`super::devices`]).
//! - The first batch of `event.from` with an empty token holds every object; later batches
//!   change the snapshot object by object, and a new [`Desired`] is published only when it
//!   differs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use xenft_xapi::api::{EventOp, EventStream, HostRecord, PoolRecord, VmRecord};
use xenft_xapi::client::{ConnectOptions, Credentials, XenApi};
use xenft_xapi::devices::{SrRecord, VbdRecord, VdiRecord, VifRecord};
use xenft_xapi::error::XapiError;
use xenft_xapi::transport::{Endpoint, TlsOptions};

use super::desired::{derive, Desired, Snapshot};

/// First retry delay after a failed login or a broken stream.
pub const BACKOFF: Duration = Duration::from_millis(200);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// xapi's error code for a login on a pool member; its parameter is the master's address.
pub const HOST_IS_SLAVE: &str = "HOST_IS_SLAVE";

/// Where and how to reach xapi.
#[derive(Debug, Clone)]
pub struct FollowerConfig {
    /// xapi's local socket in dom0, or an `https://` URL.
    pub endpoint: Endpoint,
    /// Trust for HTTPS (also used toward the master).
    pub tls: TlsOptions,
    /// Who the agent logs in as.
    pub credentials: Credentials,
    /// How long one `event.from` waits for events.
    pub event_timeout: Duration,
}

/// Why the credential file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// Reading the file failed.
    #[error("credential file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold a user and a password.
    #[error(
        "credential file {0}: expected the user on the first line and the password on the second"
    )]
    Format(String),
}

/// Reads a credential file: the user on the first line, the password on the second.
///
/// # Errors
/// [`CredentialsError`].
pub fn read_credentials(path: &Path) -> Result<Credentials, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut lines = text.lines();
    let user = lines.next().map(str::trim).unwrap_or_default();
    let password = lines
        .next()
        .map(|l| l.trim_end_matches('\r'))
        .unwrap_or_default();
    if user.is_empty() || password.is_empty() || user.len() > 256 || password.len() > 4096 {
        return Err(CredentialsError::Format(path.display().to_string()));
    }
    Ok(Credentials {
        user: user.to_string(),
        password: password.to_string(),
    })
}

/// The running follower.
pub struct Follower {
    desired: watch::Receiver<Option<Arc<Desired>>>,
    api: watch::Receiver<Option<Arc<XenApi>>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Follower {
    /// Starts following the pool's registry.
    #[must_use]
    pub fn start(cfg: FollowerConfig) -> Follower {
        let (tx, desired) = watch::channel(None);
        let (api_tx, api) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(cfg, tx, api_tx, stop_rx));
        Follower {
            desired,
            api,
            stop,
            task,
        }
    }

    /// The desired state as last read (`None` until xapi was read once).
    #[must_use]
    pub fn desired(&self) -> watch::Receiver<Option<Arc<Desired>>> {
        self.desired.clone()
    }

    /// The client of the current session (toward the master), for writes; `None` while
    /// xapi is unreachable.
    #[must_use]
    pub fn api(&self) -> watch::Receiver<Option<Arc<XenApi>>> {
        self.api.clone()
    }

    /// Stops following (logs out).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The master's endpoint from a `HOST_IS_SLAVE` failure, seen through `configured`: over
/// HTTP(S) the scheme and port stay and the host becomes the master's address (as Xen
/// Orchestra's client does); from dom0's local socket the master is `https://<address>`.
fn master_of(e: &XapiError, configured: &Endpoint) -> Option<Endpoint> {
    let XapiError::Api { code, params } = e else {
        return None;
    };
    if code != HOST_IS_SLAVE {
        return None;
    }
    let addr = params.first()?.trim();
    if addr.is_empty()
        || addr.len() > 255
        || !addr
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
    {
        return None;
    }
    let host = if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]") // IPv6
    } else {
        addr.to_string()
    };
    let url = match configured {
        Endpoint::Unix(_) => format!("https://{host}"),
        Endpoint::Http(u) => {
            let (scheme, rest) = u.split_once("://")?;
            let authority = rest.split('/').next().unwrap_or_default();
            // The port, if any: after the last ':' outside an IPv6 literal.
            let port = match authority.rfind(']') {
                Some(end) => authority[end + 1..].strip_prefix(':'),
                None => authority.rsplit_once(':').map(|(_, p)| p),
            };
            match port {
                Some(p) if !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => {
                    format!("{scheme}://{host}:{p}")
                }
                _ => format!("{scheme}://{host}"),
            }
        }
    };
    Endpoint::parse(&url).ok()
}

async fn run(
    cfg: FollowerConfig,
    tx: watch::Sender<Option<Arc<Desired>>>,
    api_tx: watch::Sender<Option<Arc<XenApi>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut endpoint = cfg.endpoint.clone();
    let mut backoff = BACKOFF;
    loop {
        if *stop.borrow() {
            return;
        }
        let mut opts = ConnectOptions::new(endpoint.clone(), cfg.credentials.clone());
        opts.tls = cfg.tls.clone();
        let outcome = match XenApi::new(opts) {
            Ok(api) => {
                let api = Arc::new(api);
                let r = follow(&api, &cfg, &tx, &api_tx, &mut stop).await;
                api_tx.send_replace(None);
                r
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => return, // stopped
            Err(e) => {
                if let Some(master) = master_of(&e, &endpoint) {
                    tracing::warn!(?master, "this xapi is a pool member: following the master");
                    endpoint = master;
                    continue;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "xapi unreachable or failed: the last registry read stays in force");
                // A master change shows as a failure of the master: start again from the
                // configured endpoint, which redirects to the new master.
                endpoint = cfg.endpoint.clone();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One session: log in, read everything, follow. `Ok` when told to stop.
async fn follow(
    api: &Arc<XenApi>,
    cfg: &FollowerConfig,
    tx: &watch::Sender<Option<Arc<Desired>>>,
    api_tx: &watch::Sender<Option<Arc<XenApi>>>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), XapiError> {
    api.login().await?;
    api_tx.send_replace(Some(Arc::clone(api)));
    tracing::info!(endpoint = ?api.endpoint(), "following the pool registry");
    let mut stream = EventStream::new(&["pool", "host", "vm", "vif", "vbd", "vdi", "sr"]);
    let mut snap = Snapshot::default();
    let mut first = true;
    loop {
        let batch = tokio::select! {
            b = stream.next(api, cfg.event_timeout) => b?,
            _ = stop.changed() => {
                let _ = api.logout().await;
                return Ok(());
            }
        };
        if first || batch.resynced {
            snap = Snapshot::default();
            first = false;
        }
        for ev in &batch.events {
            apply(&mut snap, ev)?;
        }
        let d = derive(&snap);
        if tx.borrow().as_deref() != Some(&d) {
            tracing::info!(
                vms = d.vms.len(),
                refused = d.refused.len(),
                pool_problem = ?d.pool_problem,
                "registry changed"
            );
            tx.send_replace(Some(Arc::new(d)));
        }
    }
}

/// One event into the snapshot.
fn apply(snap: &mut Snapshot, ev: &xenft_xapi::api::Event) -> Result<(), XapiError> {
    let r = ev.obj_ref.clone();
    if ev.operation == EventOp::Del {
        snap.hosts.remove(&r);
        snap.vms.remove(&r);
        snap.vifs.remove(&r);
        snap.vbds.remove(&r);
        snap.vdis.remove(&r);
        snap.srs.remove(&r);
        if snap.pool.as_ref().is_some_and(|(p, _)| *p == r) {
            snap.pool = None;
        }
        return Ok(());
    }
    let Some(v) = &ev.snapshot else {
        return Ok(());
    };
    match ev.class.as_str() {
        "pool" => snap.pool = Some((r, PoolRecord::from_value(v)?)),
        "host" => {
            snap.hosts.insert(r, HostRecord::from_value(v)?);
        }
        "vm" => {
            snap.vms.insert(r, VmRecord::from_value(v)?);
        }
        // A malformed device record is left out (the VM's plan then says what it misses);
        // it must not stop the registry from being followed.
        "vif" => match VifRecord::from_value(v) {
            Ok(rec) => {
                snap.vifs.insert(r, rec);
            }
            Err(e) => tracing::warn!(obj = %r, error = %e, "VIF record ignored"),
        },
        "vbd" => match VbdRecord::from_value(v) {
            Ok(rec) => {
                snap.vbds.insert(r, rec);
            }
            Err(e) => tracing::warn!(obj = %r, error = %e, "VBD record ignored"),
        },
        "vdi" => match VdiRecord::from_value(v) {
            Ok(rec) => {
                snap.vdis.insert(r, rec);
            }
            Err(e) => tracing::warn!(obj = %r, error = %e, "VDI record ignored"),
        },
        "sr" => match SrRecord::from_value(v) {
            Ok(rec) => {
                snap.srs.insert(r, rec);
            }
            Err(e) => tracing::warn!(obj = %r, error = %e, "SR record ignored"),
        },
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_address_is_taken_from_host_is_slave_and_checked() {
        let e = |p: &str| XapiError::Api {
            code: HOST_IS_SLAVE.into(),
            params: vec![p.into()],
        };
        let dom0 = Endpoint::parse("unix:/var/lib/xcp/xapi").unwrap();
        let url = |s: &str| Some(Endpoint::parse(s).unwrap());
        assert_eq!(master_of(&e("192.0.2.7"), &dom0), url("https://192.0.2.7"));
        assert_eq!(master_of(&e("fd00::7"), &dom0), url("https://[fd00::7]"));
        let member = Endpoint::parse("https://192.0.2.8:8443/").unwrap();
        assert_eq!(
            master_of(&e("192.0.2.7"), &member),
            url("https://192.0.2.7:8443")
        );
        let v6 = Endpoint::parse("http://[fd00::8]:80").unwrap();
        assert_eq!(master_of(&e("192.0.2.7"), &v6), url("http://192.0.2.7:80"));
        assert_eq!(master_of(&e("evil/path?x"), &dom0), None);
        assert_eq!(master_of(&e(""), &dom0), None);
        let other = XapiError::Api {
            code: "SESSION_INVALID".into(),
            params: vec!["x".into()],
        };
        assert_eq!(master_of(&other, &dom0), None);
    }

    #[test]
    fn a_credential_file_holds_a_user_and_a_password() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cred");
        std::fs::write(&p, "root\ns3cret pass\n").unwrap();
        let c = read_credentials(&p).unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.as_str()),
            ("root", "s3cret pass")
        );
        std::fs::write(&p, "root\n").unwrap();
        let e = read_credentials(&p).unwrap_err();
        assert!(e.to_string().contains("second"), "{e}");
        let e = read_credentials(&d.path().join("none")).unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
    }
}
