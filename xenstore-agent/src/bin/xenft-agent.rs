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
    let mut file = AgentFile::load(&args.config)
        .with_context(|| format!("configuration {}", args.config.display()))?;
    let xapi = file
        .xapi_follower()
        .with_context(|| format!("configuration {}", args.config.display()))?;
    let domains_via = file.xapi.as_ref().map(|x| x.domains.clone());
    let run_dir = file
        .xapi
        .as_ref()
        .and_then(|x| x.components.as_ref().map(|c| c.run_dir.clone()));
    let local_fence = file.xapi.as_ref().and_then(|x| x.local_fence.clone());
    let components_file = file.xapi.as_ref().and_then(|x| x.components.clone());
    let mgmt_port = file.xapi.as_ref().map(|x| x.mgmt_port);
    let secret_file = file.config.secret_file.clone();
    let console_file = file.console.clone();
    // The console's settings are checked with the rest (`--check` included).
    if let Some(c) = &console_file {
        if file.xapi.is_none() {
            anyhow::bail!("configuration {}: console: it needs the xapi section (the console shows the pool's registry)", args.config.display());
        }
        c.token()
            .map_err(|e| anyhow::anyhow!(e))
            .with_context(|| format!("configuration {}", args.config.display()))?;
    }
    let xapi_trust = xapi.as_ref().map(|x| (x.endpoint.clone(), x.tls.clone()));
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    // The registry in the pool's xapi, followed from the start: the pool's membership may
    // come from it, the domains may go through it, and the plane feeds the core from it.
    let follower = {
        let _rt = rt.enter();
        xapi.map(xenft_agent::xapi::follower::Follower::start)
    };
    let membership = match (&follower, mgmt_port) {
        (Some(f), Some(port)) if file.config.peers.is_empty() => {
            let me = file.config.host.to_string();
            let read = xenft_agent::xapi::membership::read(f, &me, port, REGISTRY_SAY_EVERY);
            let (m, key) = if args.check {
                rt.block_on(tokio::time::timeout(CHECK_REGISTRY_WAIT, read))
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "the pool's membership was not in the registry within {} s (see the log above)",
                            CHECK_REGISTRY_WAIT.as_secs()
                        )
                    })?
            } else {
                rt.block_on(read)
            }
            .map_err(|e| anyhow::anyhow!("the pool's membership from the registry: {e}"))?;
            file.config.peers = m.peer_files();
            if file.config.quorum.is_empty() {
                file.config.quorum.clone_from(&m.quorum);
            }
            if let Some(key) = &key {
                write_secret(&secret_file, key)?;
            }
            tracing::info!(
                peers = m.peers.len(),
                quorum = m.quorum.len(),
                "pool membership read from the registry"
            );
            Some(m)
        }
        _ => None,
    };
    let (cfg, drivers) = file
        .validate()
        .with_context(|| format!("configuration {}", args.config.display()))?;
    if args.check {
        println!("configuration ok: host {}", cfg.core.me);
        return Ok(());
    }
    let restart = rt.block_on(async move {
        let membership_changed = match (&follower, membership, mgmt_port) {
            (Some(f), Some(m), Some(port)) => Some(watch_membership(
                f.desired(),
                cfg.core.me.to_string(),
                port,
                m,
            )),
            _ => None,
        };
        // The VM processes' pids (domains the agent runs itself) live next to its state file.
        let domain_dir = || -> anyhow::Result<std::path::PathBuf> {
            let mut dir = cfg.state_file.clone().into_os_string();
            dir.push(".domains");
            let dir = std::path::PathBuf::from(dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            Ok(dir)
        };
        let mut seams = match &drivers {
            Drivers::Record => {
                tracing::warn!("drivers: record — components are recording stand-ins");
                Seams::recording(&Recorder::new())
            }
            Drivers::Real(vms) => xenft_agent::drivers::real_seams(vms, Some(domain_dir()?)),
        };
        if let (Some(f), Some(via)) = (&follower, domains_via) {
            let xapi = xenft_agent::xapi::domain::XapiDomain::new(
                f.api(),
                f.desired(),
                cfg.core.me.clone(),
                tokio::runtime::Handle::current(),
            )
            .with_local_fence(local_fence);
            seams.domains = match via {
                DomainsVia::Xapi => std::sync::Arc::new(xapi),
                DomainsVia::Command(commands) => std::sync::Arc::new(
                    xenft_agent::xapi::domain_command::RegistryCommandDomain::new(
                        commands,
                        run_dir,
                        f.desired(),
                        xapi,
                        Some(domain_dir()?),
                    ),
                ),
            };
        }
        // The agent supervises the VMs' components itself: their sockets by convention.
        let mut components = match components_file {
            Some(c) => {
                let me = std::env::current_exe().context("locating the agent's binary")?;
                let blkback = match c.blkback {
                    Some(b) => b,
                    None => me.with_file_name("xenft-blkback"),
                };
                let engine = match &c.checkpoint {
                    Some(e) => Some(
                        e.facts(me.parent().unwrap_or(std::path::Path::new("/")))
                            .map_err(|e| anyhow::anyhow!(e))?,
                    ),
                    None => None,
                };
                for d in [&c.run_dir, &c.disk_dir] {
                    std::fs::create_dir_all(d)
                        .with_context(|| format!("creating {}", d.display()))?;
                }
                let convention = xenft_agent::drivers::Convention {
                    run_dir: c.run_dir.clone(),
                    request_timeout: std::time::Duration::from_secs(10),
                    sync_timeout: std::time::Duration::from_secs(3600),
                };
                seams.disk = xenft_agent::drivers::supervised_disks(convention.clone());
                if engine.is_some() {
                    // The level-3 VMs' engines are supervised too: the Checkpointer is each
                    // VM's engine, found by its socket.
                    seams.checkpoint =
                        xenft_agent::drivers::supervised_checkpoints(convention.clone());
                }
                let relay = match c.relay {
                    Some(r) => {
                        seams.net = xenft_agent::drivers::supervised::relays(convention);
                        Some(xenft_agent::xapi::relay_plan::RelayFacts {
                            netback: match r.netback {
                                Some(b) => b,
                                None => std::env::current_exe()
                                    .context("locating the agent's binary")?
                                    .with_file_name("xenft-netback"),
                            },
                            uplink: r.uplink,
                            vif_name: r.vif_name,
                        })
                    }
                    None => None,
                };
                Some(xenft_agent::xapi::plane::Components {
                    facts: xenft_agent::xapi::components::HostFacts {
                        me: String::new(),
                        run_dir: c.run_dir.clone(),
                        disk_dir: c.disk_dir,
                        sr_run_dir: xenft_agent::xapi::sr_disk::sr_run_dir(),
                        blkback,
                        secret_file: secret_file.clone(),
                        disk_size: c.disk_size_bytes,
                        relay,
                        engine,
                        alink_path_timeout_ms: c.alink_path_timeout_ms,
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
        let t = &cfg.core.timing;
        let console_facts = (
            cfg.secret.clone(),
            t.peer_dead_ms.max(t.lease_ms) + t.heartbeat_ms,
        );
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
        // The availability console: the registry, this agent and the other hosts' consoles.
        let console = match (&console_file, &follower, xapi_trust) {
            (Some(c), Some(f), Some((endpoint, tls))) => {
                let deps = xenft_agent::console::ConsoleDeps {
                    me: agent_me.to_string(),
                    hub: agent.hub(),
                    desired: f.desired(),
                    api: f.api(),
                    protection: std::sync::Arc::clone(&protection),
                    pool_secret: console_facts.0,
                    expected_failover_ms: console_facts.1,
                    xapi_login: Some(
                        xenft_agent::console::xapi_checker(c, endpoint, tls, f.api())
                            .map_err(|e| anyhow::anyhow!(e))?,
                    ),
                };
                // Protection never waits for the console: one that cannot listen is logged.
                match xenft_agent::console::Console::start(c, deps).await {
                    Ok(c) => {
                        println!("console {}", c.addr());
                        Some(c)
                    }
                    Err(e) => {
                        tracing::error!(listen = %c.listen, error = %e, "the console is not served");
                        None
                    }
                }
            }
            _ => None,
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
        let restart = match membership_changed {
            Some(changed) => tokio::select! {
                () = wait_for_signal() => false,
                _ = changed => true,
            },
            None => {
                wait_for_signal().await;
                false
            }
        };
        status.shutdown().await;
        if let Some(c) = console {
            c.shutdown().await;
        }
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
        anyhow::Ok(restart)
    })?;
    if restart {
        // The service manager starts the agent again (the unit has Restart=always); the VMs'
        // components and domains run on and are adopted.
        eprintln!("xenft-agent: the pool's membership changed in the registry: exiting to restart with it");
        std::process::exit(EXIT_RESTART);
    }
    Ok(())
}

/// How often the agent says why it still waits for the pool's membership in the registry.
const REGISTRY_SAY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// `--check`: longest wait for the registry.
const CHECK_REGISTRY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Exit status asking the service manager for a restart (EX_TEMPFAIL).
const EXIT_RESTART: i32 = 75;

/// Keeps the pool's A-link key read from xapi in `path` (mode 0600), for the agent and the
/// components it starts.
fn write_secret(path: &std::path::Path, key: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::read(path).is_ok_and(|k| k == key) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("new");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(key)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Resolves when the registry's membership for this host differs from `current` (a registry
/// that cannot be read as a membership for a while changes nothing: the agent goes on with
/// what it has).
fn watch_membership(
    mut desired: tokio::sync::watch::Receiver<
        Option<std::sync::Arc<xenft_agent::xapi::desired::Desired>>,
    >,
    me: String,
    port: u16,
    current: xenft_agent::xapi::membership::Membership,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if desired.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            let Some(d) = desired.borrow_and_update().clone() else {
                continue;
            };
            match xenft_agent::xapi::membership::derive(&d, &me, port) {
                Ok(m) if m != current => {
                    tracing::warn!("the pool's membership changed in the registry");
                    return;
                }
                Ok(_) => {}
                Err(why) => {
                    tracing::warn!(reason = %why, "the registry's membership is unusable; going on with the one read at start");
                }
            }
        }
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
