//! The local pool's VM as a process (`xenft-lab vm`): what runs "inside" the VM on the host
//! that runs it — the record service on the VM's disk (the NBD export of the VM's supervised
//! `xenft-blkback`, `<run_dir>/<vm uuid>/nbd.sock`) at the service address on `vm0`, the VM's
//! interface in its namespace. Started, paused (SIGSTOP), continued and killed by the host's
//! hypervisor stand-in ([`super::hypervisor`]) as xapi says; the agent never touches it.
//!
//! Until the VM is protected its disk has no export yet: the process waits for it (a real VM
//! waits on its disk the same way while its storage attaches), then recovers the service's
//! counter from the records on the disk and serves.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::service::{NbdDisk, Service};
use crate::topology::{Host, SERVICE_IP, SERVICE_PORT, VM_IF};
use crate::LabError;

/// Runs the VM of `host` on the disk exported at `nbd`; once it serves, writes its
/// [`super::status::VmProcStatus`] to [`super::status::vm_file`] in `dir`. Returns only on
/// an error.
///
/// # Errors
/// The service address cannot be added, or the listener cannot be bound.
pub fn run(dir: &crate::state::StateDir, host: Host, nbd: &Path) -> Result<(), LabError> {
    // This process runs in the VM's namespace (`ip netns exec`): the address goes on its vm0.
    let ip = format!("{SERVICE_IP}/24");
    match crate::topology::run("ip", &["addr", "add", &ip, "dev", VM_IF]) {
        Ok(_) => {}
        Err(LabError::Command { stderr, .. })
            if stderr.contains("exists") || stderr.contains("already assigned") => {}
        Err(e) => return Err(e),
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LabError::component("VM runtime", e))?;
    rt.block_on(async {
        let volume = wait_disk(nbd).await;
        let svc = Service::recover(Arc::new(volume), host.name()).await;
        tracing::info!(records = svc.count(), "VM up: service on its disk");
        let listener = bind().await?;
        let st = super::status::VmProcStatus {
            pid: std::process::id(),
            serving_ms: crate::now_ms(),
            recovered_count: svc.count(),
        };
        dir.write_json(&super::status::vm_file(dir, host), &st)?;
        svc.serve(listener).await;
        Err(LabError::WrongState("the service's listener failed".into()))
    })
}

/// Connects to the VM's disk, waiting until it is exported.
async fn wait_disk(nbd: &Path) -> NbdDisk {
    let mut said = false;
    loop {
        match NbdDisk::connect(nbd).await {
            Ok(d) => return d,
            Err(e) => {
                if !said {
                    tracing::info!(disk = %nbd.display(), error = %e, "waiting for the VM's disk");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The service's listener (a restarted VM may find its old socket lingering a moment).
async fn bind() -> Result<tokio::net::TcpListener, LabError> {
    let mut last = None;
    for _ in 0..50 {
        match tokio::net::TcpListener::bind((SERVICE_IP, SERVICE_PORT)).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(LabError::component(
        "service listener",
        last.map_or_else(|| "bind failed".into(), |e| e.to_string()),
    ))
}

/// Pauses (`stop`: SIGSTOP) or unpauses (`cont`: SIGCONT) host `h`'s VM process, found by the
/// status file it wrote: the host-local fence an isolated host's agent uses when it cannot
/// reach xapi.
///
/// # Errors
/// No VM process runs on `h`, or the action is unknown.
pub fn signal(dir: &crate::state::StateDir, h: Host, action: &str) -> Result<(), LabError> {
    use nix::sys::signal::{kill, Signal};
    let sig = match action {
        "stop" => Signal::SIGSTOP,
        "cont" => Signal::SIGCONT,
        other => {
            return Err(LabError::WrongState(format!(
                "unknown action {other:?} (stop, cont)"
            )))
        }
    };
    let st: super::status::VmProcStatus = dir
        .read_json(&super::status::vm_file(dir, h))?
        .ok_or_else(|| LabError::WrongState(format!("no VM process on {}", h.name())))?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", st.pid)).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("xenft-lab") {
        return Err(LabError::WrongState(format!(
            "the VM process of {} ({}) is gone",
            h.name(),
            st.pid
        )));
    }
    let pid = nix::unistd::Pid::from_raw(
        i32::try_from(st.pid).map_err(|_| LabError::WrongState("pid out of range".into()))?,
    );
    kill(pid, sig).map_err(|e| LabError::component("VM signal", e))
}
