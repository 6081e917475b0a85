//! `xenft-lab host`: one host of the local pool, as its dom0 would run it. The production
//! `xenft-agent` (host-local configuration only; restarted a second after it exits, as
//! systemd's `Restart=always` does — it exits on purpose when the pool's membership
//! changes), the hypervisor stand-in ([`super::hypervisor`]), and what the lab needs to watch
//! from outside: the status file and the agent's decisions in the event log
//! ([`super::status`]). The availability console is the agent's own (its `console` section).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::hypervisor::{self, HypervisorConfig};
use super::status::{self, Pending};
use super::xapi_url;
use crate::state::{Event, StateDir};
use crate::topology::Host;
use crate::{now_ms, LabError};

/// A host's settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Which host.
    pub host: Host,
    /// The lab's state directory (`<dir>/<host>/agent.json` is the agent's configuration).
    pub dir: StateDir,
    /// `xenft-lab`; `xenft-agent` is beside it.
    pub exe: PathBuf,
}

/// How long the agent stays down after it exited before it is started again.
const AGENT_RESTART: Duration = Duration::from_secs(1);

/// Runs the host until killed.
///
/// # Errors
/// The agent cannot be started at all.
pub fn run(cfg: &HostConfig) -> Result<(), LabError> {
    let h = cfg.host;
    let home = cfg.dir.file(h.name());
    let run_dir = home.join("run");
    let hv = HypervisorConfig {
        host: h,
        url: xapi_url(h),
        credential_file: cfg.dir.file("xapi-credentials"),
        run_dir: run_dir.clone(),
        exe: cfg.exe.clone(),
        log_dir: cfg.dir.root().to_path_buf(),
    };
    std::thread::spawn(move || {
        if let Err(e) = hypervisor::run(&hv) {
            tracing::error!(error = %e, "the hypervisor stand-in stopped");
        }
    });
    let agent_bin = cfg.exe.with_file_name("xenft-agent");
    let agent_cfg = home.join("agent.json");
    let log_path = cfg.dir.file(&format!("{}.agent.log", h.name()));
    let dir = cfg.dir.clone();
    let start = move || -> Result<std::process::Child, LabError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| LabError::Io {
                path: log_path.clone(),
                source,
            })?;
        Command::new(&agent_bin)
            .arg("--config")
            .arg(&agent_cfg)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| LabError::Spawn {
                cmd: agent_bin.display().to_string(),
                source,
            })
    };
    let mut agent = start()?;
    std::thread::spawn(move || loop {
        let st = agent.wait();
        dir.log_event(&Event {
            t_ms: now_ms(),
            host: h.name().into(),
            what: format!(
                "xenft-agent exited ({}): restarted in {} s",
                st.map_or_else(|e| e.to_string(), |s| s.to_string()),
                AGENT_RESTART.as_secs()
            ),
            why: "the host's service manager restarts the agent (its components and VM run on)"
                .into(),
        });
        std::thread::sleep(AGENT_RESTART);
        match start() {
            Ok(c) => agent = c,
            Err(e) => {
                tracing::error!(error = %e, "cannot restart the agent");
                return;
            }
        }
    });
    let pending = Arc::new(Mutex::new(Pending::default()));
    {
        let (dir, pending) = (cfg.dir.clone(), Arc::clone(&pending));
        std::thread::spawn(move || status::follow_decisions(h, &dir, &pending));
    }
    loop {
        let st = status::snapshot(h, &cfg.dir, &run_dir, &pending);
        if let Err(e) = cfg.dir.write_json(&cfg.dir.status_file(h), &st) {
            tracing::warn!(error = %e, "cannot write the status file");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
