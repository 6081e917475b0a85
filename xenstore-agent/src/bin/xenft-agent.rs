//! `xenft-agent`: the per-host xenft daemon.
//!
//! Reads a JSON config file, validates it, and runs the agent with its status API until
//! SIGTERM or Ctrl-C. The components are the real ones of [`xenft_agent::drivers`] (the VMs'
//! `xenft-blkback` and `xenft-netback` control sockets, the domain command), or — only with
//! `"drivers": "record"` in the config — the recording stand-ins.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use xenft_agent::config::{AgentFile, DomainsVia, Drivers};
use xenft_agent::protection_api::ProtectionApi;
use xenft_agent::runtime::Agent;
use xenft_agent::seams::{Recorder, Seams};
use xenft_agent::status::StatusServer;

/// Per-host xenft agent: membership, failure detection, quorum, fencing, failover.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Configuration file (JSON).
    #[arg(long, short)]
    config: PathBuf,
    /// Only validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let file = AgentFile::load(&args.config)
        .with_context(|| format!("configuration {}", args.config.display()))?;
    let xapi = file
        .xapi_follower()
        .with_context(|| format!("configuration {}", args.config.display()))?;
    let domains_via = file.xapi.as_ref().map(|x| x.domains);
    let components_file = file.xapi.as_ref().and_then(|x| x.components.clone());
    let secret_file = file.config.secret_file.clone();
    let (cfg, drivers) = file
        .validate()
        .with_context(|| format!("configuration {}", args.config.display()))?;
    if args.check {
        println!("configuration ok: host {}", cfg.core.me);
        return Ok(());
    }
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        // The registry in the pool's xapi, followed from the start: the domains may go
        // through it, and the plane below feeds the core from it.
        let follower = xapi.map(xenft_agent::xapi::follower::Follower::start);
        let mut seams = match &drivers {
            Drivers::Record => {
                tracing::warn!("drivers: record — components are recording stand-ins");
                Seams::recording(&Recorder::new())
            }
            Drivers::Real(vms) => {
                // The VM processes' pids live next to the agent's state file.
                let mut dir = cfg.state_file.clone().into_os_string();
                dir.push(".domains");
                let dir = std::path::PathBuf::from(dir);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                xenft_agent::drivers::real_seams(vms, Some(dir))
            }
        };
        if let (Some(f), Some(DomainsVia::Xapi)) = (&follower, domains_via) {
            seams.domains = std::sync::Arc::new(xenft_agent::xapi::domain::XapiDomain::new(
                f.api(),
                f.desired(),
                cfg.core.me.clone(),
                tokio::runtime::Handle::current(),
            ));
        }
        // The agent supervises the VMs' components itself: their sockets by convention.
        let mut components = match components_file {
            Some(c) => {
                let blkback = match c.blkback {
                    Some(b) => b,
                    None => std::env::current_exe()
                        .context("locating the agent's binary")?
                        .with_file_name("xenft-blkback"),
                };
                std::fs::create_dir_all(&c.run_dir)
                    .with_context(|| format!("creating {}", c.run_dir.display()))?;
                seams.disk =
                    xenft_agent::drivers::supervised_disks(xenft_agent::drivers::Convention {
                        run_dir: c.run_dir.clone(),
                        request_timeout: std::time::Duration::from_secs(10),
                        sync_timeout: std::time::Duration::from_secs(3600),
                    });
                Some(xenft_agent::xapi::plane::Components {
                    facts: xenft_agent::xapi::components::HostFacts {
                        me: String::new(),
                        run_dir: c.run_dir.clone(),
                        disk_dir: c.disk_dir,
                        blkback,
                        secret_file: secret_file.clone(),
                        disk_size: c.disk_size_bytes,
                    },
                    supervisor: xenft_agent::xapi::components::Supervisor::new(c.run_dir),
                })
            }
            None => None,
        };
        let listen = cfg.status_listen;
        let token = cfg.status_token.clone();
        let links = start_links(&cfg).await?;
        let (me, use_xenstore) = (cfg.core.me.clone(), cfg.xenstore);
        let agent_me = me.clone();
        let vm_names: Vec<_> = cfg.vms.iter().map(|v| v.vm.clone()).collect();
        let (configured, pool_hosts) = (cfg.vms.clone(), cfg.core.peers.clone());
        let agent = Agent::start_with_links(cfg, seams.clone(), links).await?;
        // Protect / unprotect through the status API: into the registry when the agent
        // follows one (as `xenft vm-protect`), straight to the core otherwise.
        let protection = match &follower {
            Some(f) => ProtectionApi::xapi(f.api()),
            None => ProtectionApi::core(
                agent.inputs(),
                agent.hub(),
                agent_me.clone(),
                pool_hosts,
                &configured,
            ),
        };
        // The components' own state (disk role and resync progress, relay mode) in /status.
        let (stop_reports, stop_rx) = tokio::sync::watch::channel(false);
        let reports = matches!(drivers, Drivers::Real(_)).then(|| {
            tokio::spawn(xenft_agent::drivers::publish_reports(
                seams,
                vm_names,
                agent.hub(),
                stop_rx,
            ))
        });
        // What the components push (a failed disk, a lost uplink) reaches the core.
        let stop_events = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let followers = match &drivers {
            Drivers::Real(vms) => {
                xenft_agent::drivers::events::follow(vms, &agent.inputs(), &stop_events)
                    .context("starting the component event followers")?
            }
            Drivers::Record => Vec::new(),
        };
        // The registry in the pool's xapi: the VMs to protect, and their state written back.
        let plane = follower.map(|f| {
            xenft_agent::xapi::plane::Plane::with_follower(
                f,
                agent_me.clone(),
                agent.inputs(),
                agent.hub(),
                components.take(),
            )
        });
        let bridge = if use_xenstore {
            let xs = xenft_agent::xenstore::xen::XenXs::connect()
                .await
                .context("connecting to xenstored")?;
            Some(xenft_agent::xenstore::bridge::Bridge::start(
                std::sync::Arc::new(xs),
                me,
                agent.hub(),
            ))
        } else {
            None
        };
        let status =
            StatusServer::start_with_protection(listen, token, agent.hub(), Some(protection))
                .await
                .with_context(|| format!("status API on {listen}"))?;
        println!("status {}", status.addr());
        wait_for_signal().await;
        status.shutdown().await;
        let _ = stop_reports.send(true);
        if let Some(r) = reports {
            let _ = r.await;
        }
        if let Some(b) = bridge {
            b.shutdown().await;
        }
        if let Some(p) = plane {
            p.shutdown().await;
        }
        stop_events.store(true, std::sync::atomic::Ordering::Relaxed);
        for f in followers {
            let _ = tokio::task::spawn_blocking(move || f.join()).await;
        }
        agent.shutdown().await;
        anyhow::Ok(())
    })
}

/// With `alink_transport: link`, one `xenft-alink` link per peer over the A-link addresses.
async fn start_links(
    cfg: &xenft_agent::config::ValidConfig,
) -> anyhow::Result<std::collections::BTreeMap<xenft_agent::ids::HostId, xenft_alink::Link>> {
    use xenft_agent::config::AlinkTransport;
    let mut links = std::collections::BTreeMap::new();
    if cfg.alink_transport != AlinkTransport::Link {
        return Ok(links);
    }
    for peer in cfg.core.peers.iter().filter(|p| **p != cfg.core.me) {
        let paths: Vec<xenft_alink::PathConfig> = cfg
            .paths
            .iter()
            .filter(|(h, p, _)| h == peer && matches!(p, xenft_agent::ids::PathId::Alink(_)))
            .map(|(_, _, a)| xenft_alink::PathConfig {
                local: a.local,
                peer: a.peer,
            })
            .collect();
        let mut lc = xenft_alink::LinkConfig::new(
            cfg.core.me.as_str(),
            peer.as_str(),
            cfg.secret.clone(),
            paths,
        );
        lc.heartbeat_interval = std::time::Duration::from_millis(cfg.core.timing.heartbeat_ms / 2);
        lc.path_timeout = std::time::Duration::from_millis(cfg.core.timing.path_down_ms);
        let link = xenft_alink::Link::start(lc)
            .await
            .with_context(|| format!("A-link to {peer}"))?;
        links.insert(peer.clone(), link);
    }
    Ok(links)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
