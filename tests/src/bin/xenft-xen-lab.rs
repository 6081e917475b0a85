//! `xenft-xen-lab`: probes run inside the nested Xen lab's dom0 (`scripts/xen-lab`) to
//! exercise our Xen backends against the real thing.
//!
//! - `xenstore`: the agent's xenstore backend ([`XenXs`]) against the real xenstored: watches
//!   `@introduceDomain` / `@releaseDomain`, sees a named domain appear and vanish, reads its
//!   device nodes, and checks writes and transactions (including a conflict) in `/xenft`.
//! - `domain`: the checkpoint engine's Xen domain backend on a running guest: pause/resume,
//!   log-dirty enable/clean, foreign page mapping, vCPU context.
//! - `protect` / `replica`: our checkpoint engine between two lab hosts over an A-link on the
//!   lab's private wire (primary protects a running domain; secondary applies epochs to a
//!   paused domain and, when the primary vanishes, fails over to it).
//!
//! Every line meant for the lab harness starts with `XENLAB`; figures are
//! `XENLAB-RESULT key=value`.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use xenft_agent::xenstore::xen::XenXs;
use xenft_agent::xenstore::{list_domains, XenStore, XsError, INTRODUCE_DOMAIN, RELEASE_DOMAIN};
use xenft_checkpoint::domain::Domain;
use xenft_checkpoint::engine::commit::RecordingSink;
use xenft_checkpoint::engine::primary::{start_protection, EpochPolicy, Phase, PrimaryConfig};
use xenft_checkpoint::engine::secondary::{start_secondary, SecondaryConfig};
use xenft_checkpoint::run;
use xenft_checkpoint::workload::PAGE_SIZE;
use xenft_checkpoint::xen::XenDomain;

#[derive(Parser)]
#[command(about = "Probes of xenft's Xen backends, run inside the nested Xen lab")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Watch a domain named NAME appear and vanish through the agent's xenstore backend.
    Xenstore {
        /// Domain name (xenstore `/local/domain/N/name`).
        #[arg(long, default_value = "domu1")]
        name: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Exercise the checkpoint engine's Xen domain backend on running domain DOMID.
    Domain {
        /// Domain id.
        domid: u32,
        /// Seconds the guest runs with log-dirty on between two reads of the log.
        #[arg(long, default_value_t = 3)]
        run_secs: u64,
    },
    /// Protect running domain DOMID with our engine, towards the `replica` on the peer.
    Protect {
        /// Domain id.
        domid: u32,
        #[command(flatten)]
        link: LinkArgs,
        /// Epoch length in ms.
        #[arg(long, default_value_t = 500)]
        epoch_ms: u64,
        /// Stop after this many checkpoints (default: until killed).
        #[arg(long)]
        checkpoints: Option<u64>,
        /// Stop this many seconds after protection started (default: until killed).
        #[arg(long)]
        run_secs: Option<u64>,
    },
    /// Time the suspends of domain DOMID (ours or `xl remus`'s checkpoints) by polling its
    /// state: count, p50/p99 of the time it spends suspended.
    SuspendWatch {
        /// Domain id.
        domid: u32,
        /// How long to watch.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Prefix of the result keys (ours, remus).
        #[arg(long)]
        label: String,
        /// Poll period in ms.
        #[arg(long, default_value_t = 5)]
        poll_ms: u64,
    },
    /// Receive checkpoints into paused domain DOMID; fail over when the primary vanishes.
    Replica {
        /// Domain id of the paused replica (same configuration as the primary's guest).
        domid: u32,
        #[command(flatten)]
        link: LinkArgs,
        /// Fail over after the link has been down for this many seconds.
        #[arg(long, default_value_t = 15)]
        dead_after: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// When the primary vanishes, stop without failing over (benchmark).
        #[arg(long)]
        no_failover: bool,
    },
}

#[derive(clap::Args)]
struct LinkArgs {
    /// This host's name (host1, host2).
    #[arg(long)]
    me: String,
    /// The peer's name.
    #[arg(long)]
    peer: String,
    /// This host's IP on the lab wire.
    #[arg(long)]
    local_ip: std::net::IpAddr,
    /// The peer's IP on the lab wire.
    #[arg(long)]
    peer_ip: std::net::IpAddr,
    /// First of two consecutive ports (one A-link path each).
    #[arg(long, default_value_t = 7400)]
    port: u16,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.cmd {
        Cmd::Xenstore { name, timeout } => rt.block_on(xenstore_probe(&name, timeout)),
        Cmd::Domain { domid, run_secs } => domain_probe(domid, run_secs),
        Cmd::Protect {
            domid,
            link,
            epoch_ms,
            checkpoints,
            run_secs,
        } => protect(&rt, domid, &link, epoch_ms, checkpoints, run_secs),
        Cmd::SuspendWatch {
            domid,
            secs,
            label,
            poll_ms,
        } => suspend_watch(domid, secs, &label, poll_ms),
        Cmd::Replica {
            domid,
            link,
            dead_after,
            timeout,
            no_failover,
        } => replica(&rt, domid, &link, dead_after, timeout, no_failover),
    }
}

fn result(key: &str, value: impl std::fmt::Display) {
    println!("XENLAB-RESULT {key}={value}");
}

/// Domain ids whose `name` is `name`.
async fn domains_named(xs: &XenXs, name: &str) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for id in list_domains(xs).await? {
        if xs
            .read(None, &format!("/local/domain/{id}/name"))
            .await?
            .as_deref()
            == Some(name)
        {
            out.push(id);
        }
    }
    Ok(out)
}

async fn xenstore_probe(name: &str, timeout: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let xs = XenXs::connect().await.context("connecting to xenstored")?;
    // Writes and transactions in our own subtree.
    xs.write(None, "/xenft/lab/probe", "1").await?;
    let got = xs.read(None, "/xenft/lab/probe").await?;
    if got.as_deref() != Some("1") {
        bail!("read back {got:?} after writing 1");
    }
    let t1 = xs.begin().await?;
    let t2 = xs.begin().await?;
    let _ = xs.read(Some(t1), "/xenft/lab/probe").await?;
    xs.write(Some(t1), "/xenft/lab/probe", "t1").await?;
    let _ = xs.read(Some(t2), "/xenft/lab/probe").await?;
    xs.write(Some(t2), "/xenft/lab/probe", "t2").await?;
    xs.end(t1, true).await.context("first transaction commit")?;
    match xs.end(t2, true).await {
        Err(XsError::Again) => println!("XENLAB xenstore: conflicting transaction ended EAGAIN"),
        other => bail!("the conflicting transaction ended with {other:?}, expected EAGAIN"),
    }
    let v = xs.read(None, "/xenft/lab/probe").await?;
    if v.as_deref() != Some("t1") {
        bail!("after the conflict the node holds {v:?}, expected t1");
    }
    xs.rm(None, "/xenft/lab").await?;
    if xs.read(None, "/xenft/lab/probe").await?.is_some() {
        bail!("rm left the node");
    }

    let mut intro = xs.watch(INTRODUCE_DOMAIN).await?;
    let mut release = xs.watch(RELEASE_DOMAIN).await?;
    println!("XENLAB xenstore: watches armed");
    let mut seen: Option<u32> = None;
    let mut intro_events = 0u32;
    let mut release_events = 0u32;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "timeout: domain {name} seen={seen:?}, {intro_events} introduce and \
                 {release_events} release events"
            );
        }
        tokio::select! {
            e = intro.recv() => {
                e.context("introduce watch closed")?;
                intro_events += 1;
                if seen.is_none() {
                    if let Some(&id) = domains_named(&xs, name).await?.first() {
                        println!("XENLAB xenstore: @introduceDomain: {name} is domain {id}");
                        report_devices(&xs, id).await?;
                        seen = Some(id);
                    }
                }
            }
            e = release.recv() => {
                e.context("release watch closed")?;
                release_events += 1;
                if let Some(id) = seen {
                    let gone = !list_domains(&xs).await?.contains(&id);
                    if gone {
                        println!("XENLAB xenstore: @releaseDomain: domain {id} vanished");
                        result("xs_introduce_events", intro_events);
                        result("xs_release_events", release_events);
                        println!("XENLAB xenstore: OK");
                        return Ok(());
                    }
                }
            }
            () = tokio::time::sleep(left.min(Duration::from_secs(5))) => {}
        }
    }
}

async fn report_devices(xs: &XenXs, id: u32) -> Result<()> {
    let base = format!("/local/domain/{id}");
    for node in [
        "name",
        "vm",
        "domid",
        "console/ring-ref",
        "console/port",
        "store/ring-ref",
    ] {
        let v = xs.read(None, &format!("{base}/{node}")).await?;
        println!("XENLAB xenstore: {base}/{node} = {v:?}");
    }
    let kids = xs.directory(None, &base).await?;
    println!("XENLAB xenstore: {base}/ = {kids:?}");
    match xs.directory(None, &format!("{base}/device")).await {
        Ok(d) => println!("XENLAB xenstore: {base}/device/ = {d:?}"),
        Err(XsError::NotFound(_)) => println!("XENLAB xenstore: {base}/device absent"),
        Err(e) => return Err(e.into()),
    }
    let backend = format!("/local/domain/0/backend/console/{id}/0");
    match xs.directory(None, &backend).await {
        Ok(d) => println!("XENLAB xenstore: {backend}/ = {d:?}"),
        Err(XsError::NotFound(_)) => println!("XENLAB xenstore: {backend} absent"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

fn domain_probe(domid: u32, run_secs: u64) -> Result<()> {
    let mut d = XenDomain::open(domid, 1).context("opening the domain")?;
    let pages = d.memory_pages();
    result("domain_pages", pages);
    let t = Instant::now();
    d.pause()?;
    result("pause_ms", ms(t.elapsed()));
    d.enable_dirty_log().context("log-dirty enable")?;
    let ctx = d.vcpu_context().context("vCPU context")?;
    result("vcpu_context_bytes", ctx.0.len());
    d.resume()?;
    std::thread::sleep(Duration::from_secs(run_secs));
    d.pause()?;
    let t = Instant::now();
    let dirty = d.read_and_clear_dirty().context("log-dirty clean")?;
    result("logdirty_clean_ms", ms(t.elapsed()));
    result("dirty_pages", dirty.len());
    let mut buf = vec![0u8; dirty.len() * PAGE_SIZE];
    let t = Instant::now();
    d.read_pages(&dirty, &mut buf)
        .context("mapping the dirty pages")?;
    result("map_copy_ms", ms(t.elapsed()));
    let nonzero = buf
        .chunks(PAGE_SIZE)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count();
    result("dirty_pages_nonzero", nonzero);
    let again = d.read_and_clear_dirty()?;
    result("dirty_after_clean_paused", again.len());
    d.resume()?;
    d.disable_dirty_log()?;
    if dirty.is_empty() {
        bail!("the running guest dirtied no page in {run_secs} s");
    }
    println!("XENLAB domain: OK");
    Ok(())
}

fn suspend_watch(domid: u32, secs: u64, label: &str, poll_ms: u64) -> Result<()> {
    let mut d = XenDomain::open(domid, 1).context("opening the domain")?;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut since: Option<Instant> = None;
    let mut pauses: Vec<f64> = Vec::new();
    let t0 = Instant::now();
    while Instant::now() < end {
        let now_suspended = d.is_suspended()?;
        match (now_suspended, since) {
            (true, None) => since = Some(Instant::now()),
            (false, Some(s)) => {
                pauses.push(s.elapsed().as_secs_f64() * 1000.0);
                since = None;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(poll_ms));
    }
    pauses.sort_by(f64::total_cmp);
    let pct = |q: f64| -> f64 {
        if pauses.is_empty() {
            return 0.0;
        }
        // nearest-rank percentile on integers: index = ceil(q * n) - 1
        let n = pauses.len();
        let q_per_mille = if q >= 0.99 { 990 } else { 500 };
        let i = (n * q_per_mille).div_ceil(1000).saturating_sub(1);
        pauses[i.min(n - 1)]
    };
    let elapsed = t0.elapsed().as_secs_f64();
    result(&format!("{label}_suspends"), pauses.len());
    result(
        &format!("{label}_suspends_per_s"),
        format!("{:.3}", pauses.len() as f64 / elapsed),
    );
    result(
        &format!("{label}_suspended_p50_ms"),
        format!("{:.1}", pct(0.5)),
    );
    result(
        &format!("{label}_suspended_p99_ms"),
        format!("{:.1}", pct(0.99)),
    );
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn start_link(rt: &tokio::runtime::Runtime, a: &LinkArgs) -> Result<xenft_alink::Link> {
    let paths = (0..2u16)
        .map(|i| xenft_alink::PathConfig {
            local: SocketAddr::new(a.local_ip, a.port + i),
            peer: SocketAddr::new(a.peer_ip, a.port + i),
        })
        .collect();
    let mut cfg = xenft_alink::LinkConfig::new(
        a.me.clone(),
        a.peer.clone(),
        b"xenft-xen-lab-private-wire-secret".to_vec(),
        paths,
    );
    // Everything is slow under TCG: do not take a busy path for a dead one.
    cfg.heartbeat_interval = Duration::from_millis(500);
    cfg.path_timeout = Duration::from_secs(8);
    let link = run::start_link(rt, cfg, Some(Duration::from_secs(120)))?;
    println!("XENLAB link: connected to {}", a.peer);
    Ok(link)
}

fn protect(
    rt: &tokio::runtime::Runtime,
    domid: u32,
    a: &LinkArgs,
    epoch_ms: u64,
    checkpoints: Option<u64>,
    run_secs: Option<u64>,
) -> Result<()> {
    let link = start_link(rt, a)?;
    let ep = xenft_checkpoint::alink::endpoint(&link, rt.handle().clone())?;
    let domain = XenDomain::open(domid, 1).context("opening the domain")?;
    let p = start_protection(
        domain,
        ep,
        Arc::new(RecordingSink::new()),
        PrimaryConfig {
            epoch: EpochPolicy::Fixed(Duration::from_millis(epoch_ms)),
            max_checkpoints: checkpoints,
            ..PrimaryConfig::default()
        },
    )?;
    let t0 = Instant::now();
    let mut last = 0;
    let st = run::drive_primary(&p, Duration::from_secs(2), |st| {
        if st.committed_epoch != last || t0.elapsed().as_secs() % 10 < 2 {
            last = st.committed_epoch;
            println!(
                "XENLAB protect: t={:.0}s phase={:?} epoch={} committed={} checkpoints={} \
                 pause_p50={:.1}ms p99={:.1}ms wire={}B raw={}B",
                t0.elapsed().as_secs_f64(),
                st.phase,
                st.epoch,
                st.committed_epoch,
                st.checkpoints,
                st.pause.p50,
                st.pause.p99,
                st.wire_bytes,
                st.raw_bytes
            );
        }
        result("ours_checkpoints", st.checkpoints);
        result("ours_engine_pause_p99_ms", format!("{:.1}", st.pause.p99));
        result(
            "ours_protected_s",
            format!("{:.1}", st.protected_for.as_secs_f64()),
        );
        if run_secs.is_some_and(|r| st.protected_for >= Duration::from_secs(r)) {
            let secs = st.protected_for.as_secs_f64();
            result(
                "ours_epochs_per_s",
                format!("{:.3}", st.checkpoints as f64 / secs.max(0.001)),
            );
            println!("XENLAB protect: done after {secs:.1} s protected");
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    if let Phase::Failed(r) = &st.phase {
        bail!("protection failed: {r}");
    }
    p.stop()?;
    Ok(())
}

fn replica(
    rt: &tokio::runtime::Runtime,
    domid: u32,
    a: &LinkArgs,
    dead_after: u64,
    timeout: u64,
    no_failover: bool,
) -> Result<()> {
    let link = start_link(rt, a)?;
    let ep = xenft_checkpoint::alink::endpoint(&link, rt.handle().clone())?;
    let t = Instant::now();
    let domain = XenDomain::open_replica(domid, 1).context("opening the replica")?;
    result("replica_zeroing_ms", ms(t.elapsed()));
    let sec = start_secondary(domain, ep, SecondaryConfig::default())?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut last = None;
    let mut ticks = 0u64;
    let liveness = run::Liveness::Link {
        link: &link,
        dead_after: Duration::from_secs(dead_after),
    };
    let tick = |st: &xenft_checkpoint::engine::secondary::SecondaryStatus| {
        if st.committed_epoch != last || ticks.is_multiple_of(20) {
            last = st.committed_epoch;
            println!(
                "XENLAB replica: committed={:?} applied={} rejected={} bytes={} error={:?}",
                st.committed_epoch,
                st.applied_epochs,
                st.rejected_epochs,
                st.bytes_received,
                st.last_error
            );
        }
        ticks += 1;
    };
    match run::wait_primary_lost(
        &sec,
        &liveness,
        Duration::from_millis(500),
        Some(deadline),
        tick,
    ) {
        Ok(st) => {
            let last = st.committed_epoch;
            if no_failover {
                println!("XENLAB replica: primary gone, stopping at epoch {last:?}");
                sec.stop()?;
                return Ok(());
            }
            println!("XENLAB replica: primary gone, failing over at epoch {last:?}");
            let t = Instant::now();
            let (_d, epoch) = sec.failover()?;
            result("failover_ms", ms(t.elapsed()));
            result("failover_epoch", epoch);
            println!("XENLAB replica: replica running from epoch {epoch}");
            Ok(())
        }
        Err(run::RunError::Deadline) => bail!("timeout: the primary never went away"),
        Err(e) => Err(e.into()),
    }
}
