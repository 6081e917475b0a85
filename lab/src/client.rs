//! The client: writes records 1, 2, 3, ... to the service every `interval`, retrying the
//! same record until it is acknowledged, and appends `n unix_ms` to the acknowledgement log
//! for each `OK n`. Runs in the client namespace until killed.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::service::Conn;
use crate::{now_ms, LabError};

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The service.
    pub addr: SocketAddr,
    /// The acknowledgement log.
    pub acks: PathBuf,
    /// Pause between writes.
    pub interval: Duration,
    /// Connect / answer timeout.
    pub timeout: Duration,
}

/// Runs forever (until killed); returns only on a log write error.
pub fn run(cfg: &ClientConfig) -> Result<(), LabError> {
    let io = |source| LabError::Io {
        path: cfg.acks.clone(),
        source,
    };
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cfg.acks)
        .map_err(io)?;
    let mut n: u64 = 1;
    let mut conn: Option<Conn> = None;
    loop {
        if conn.is_none() {
            conn = Conn::connect(cfg.addr, cfg.timeout).ok();
        }
        if let Some(c) = conn.as_mut() {
            match c.ask(&format!("PUT {n}")) {
                Ok(a) if a == format!("OK {n}") => {
                    writeln!(log, "{n} {}", now_ms()).map_err(io)?;
                    n += 1;
                }
                Ok(a) => {
                    tracing::warn!(answer = %a, n, "write refused");
                    conn = None;
                }
                Err(e) => {
                    tracing::debug!(error = %e, n, "no answer; reconnecting");
                    conn = None;
                }
            }
        }
        std::thread::sleep(cfg.interval);
    }
}
