//! `xenft-lab`: the local two-host pool and its fire drill (see the crate docs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use xenft_lab::drill::{self, DrillConfig, Fault};
use xenft_lab::pool::{self, UpConfig};
use xenft_lab::state::{StateDir, DEFAULT_DIR};
use xenft_lab::topology::{Host, SERVICE_IP, SERVICE_PORT};

#[derive(Parser)]
#[command(
    name = "xenft-lab",
    version,
    about = "Local two-host xenft pool and fire drill (root)"
)]
struct Cli {
    /// State directory.
    #[arg(long, global = true, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct UpArgs {
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 16)]
    memory_mib: u64,
    /// Disk size, MiB.
    #[arg(long, default_value_t = 64)]
    disk_mib: u64,
    /// Checkpoint epoch, ms.
    #[arg(long, default_value_t = 100)]
    epoch_ms: u64,
    /// xenft-synthetic-guest (default: next to this binary).
    #[arg(long)]
    guest_binary: Option<PathBuf>,
    /// Agent timing: `lab` (3x slower detection, for a loaded machine) or `product` (the
    /// agent's defaults, take-over within 1 s).
    #[arg(long, default_value = "lab")]
    agent_timing: String,
}

impl UpArgs {
    fn config(self, exe: PathBuf) -> anyhow::Result<UpConfig> {
        mib(self.memory_mib)?;
        mib(self.disk_mib)?;
        anyhow::ensure!(
            (5..=10_000).contains(&self.epoch_ms),
            "--epoch-ms out of range 5..=10000"
        );
        Ok(UpConfig {
            guest_binary: self
                .guest_binary
                .unwrap_or_else(|| exe.with_file_name("xenft-synthetic-guest")),
            exe,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
            epoch_ms: self.epoch_ms,
            product_timing: parse_timing(&self.agent_timing)?,
            ready_timeout: Duration::from_secs(60),
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the pool and protect the VM at level 3.
    Up {
        #[command(flatten)]
        up: UpArgs,
    },
    /// Remove the pool (kills its processes, deletes its namespaces). Idempotent.
    Down,
    /// Show the pool.
    Status,
    /// What this machine supports per protection level (Xen and local pool), and why.
    Compat {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Inject a fault and report: fault=host|alink|alinks|disk (local pool only).
    Drill {
        /// `fault=KIND` or `KIND`.
        fault: String,
        /// How long a cut A-link stays cut, ms.
        #[arg(long, default_value_t = 3000)]
        hold_ms: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build the pool, drill host, disk, alink and alinks (rebuilding as needed), print a
    /// summary table, remove the pool. Exit status 1 unless every drill passed.
    Demo {
        #[command(flatten)]
        up: UpArgs,
        /// Faults to drill, in order.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "host,alink,alinks,partition,isolate,uplink,disk"
        )]
        faults: Vec<String>,
        /// How long a cut A-link stays cut, ms.
        #[arg(long, default_value_t = 3000)]
        hold_ms: u64,
    },
    /// (internal) The VM: the record service on its disk, in the VM's namespace.
    #[command(hide = true)]
    Vm {
        #[arg(long)]
        host: String,
        #[arg(long)]
        nbd: PathBuf,
    },
    /// (internal) One host of the pool: its agent (which serves the console), hypervisor stand-in and status.
    #[command(hide = true)]
    Host {
        #[arg(long)]
        host: String,
    },
    /// (internal) Pauses (`stop`) or unpauses (`cont`) a host's VM process: the agents'
    /// host-local fence when xapi cannot be reached.
    #[command(hide = true)]
    VmSignal {
        #[arg(long)]
        host: String,
        action: String,
    },
    /// (internal) The client load generator.
    #[command(hide = true)]
    Client {
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
    /// (internal) One request to the service; prints the answer.
    #[command(hide = true)]
    Ask {
        #[arg(long)]
        addr: Option<SocketAddr>,
        #[arg(long)]
        request: String,
        /// Connect/read timeout.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
}

fn parse_timing(s: &str) -> anyhow::Result<bool> {
    match s {
        "lab" => Ok(false),
        "product" => Ok(true),
        _ => anyhow::bail!("--agent-timing must be lab or product, not {s:?}"),
    }
}

fn mib(v: u64) -> anyhow::Result<u64> {
    anyhow::ensure!(
        (1..=4096).contains(&v),
        "size {v} MiB out of range 1..=4096"
    );
    Ok(v << 20)
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let dir = StateDir::new(cli.dir);
    let exe = std::env::current_exe().context("locating this binary")?;
    match cli.cmd {
        Cmd::Up { up } => {
            let cfg = up.config(exe)?;
            pool::up(&dir, &cfg)?;
            let protect: Option<xenft_lab::xapi_pool::ProtectReport> =
                dir.read_json(&dir.file("protect.json"))?;
            if let Some(p) = protect {
                print!("{p}");
            }
            print!("{}", pool::status(&dir)?);
            println!("lab up: vm1 protected at level 3 (host1 -> host2)");
        }
        Cmd::Demo {
            up,
            faults,
            hold_ms,
        } => {
            let faults = faults
                .iter()
                .map(|f| f.parse::<Fault>())
                .collect::<Result<Vec<_>, _>>()?;
            let cfg = up.config(exe)?;
            let reports = xenft_lab::demo::run(
                &dir,
                &cfg,
                &faults,
                Duration::from_millis(hold_ms.min(60_000)),
                &mut |s| println!("{}", s.trim_end()),
            )?;
            if !reports.passed() {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Down => {
            pool::down(&dir)?;
            println!("lab down");
        }
        Cmd::Status => print!("{}", pool::status(&dir)?),
        Cmd::Compat { json } => {
            let r = xenft_lab::compat::check(&dir);
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{r}");
            }
        }
        Cmd::Drill {
            fault,
            hold_ms,
            json,
        } => {
            let kind = fault.strip_prefix("fault=").unwrap_or(&fault);
            let fault: Fault = kind.parse()?;
            let report = drill::run(
                &dir,
                &DrillConfig {
                    fault,
                    exe,
                    hold: Duration::from_millis(hold_ms.min(60_000)),
                },
            )?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{report}");
            }
            if !report.passed() {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Host { host } => {
            xenft_lab::xapi_pool::host::run(&xenft_lab::xapi_pool::host::HostConfig {
                host: host.parse()?,
                dir,
                exe,
            })?;
        }
        Cmd::Vm { host, nbd } => {
            let host: Host = host.parse()?;
            xenft_lab::xapi_pool::vm::run(&dir, host, &nbd)?;
        }
        Cmd::VmSignal { host, action } => {
            xenft_lab::xapi_pool::vm::signal(&dir, host.parse()?, &action)?;
        }
        Cmd::Client { interval_ms } => {
            xenft_lab::client::run(&xenft_lab::client::ClientConfig {
                addr: SocketAddr::from((SERVICE_IP, SERVICE_PORT)),
                acks: dir.acks_file(),
                interval: Duration::from_millis(interval_ms.clamp(1, 10_000)),
                timeout: Duration::from_millis(300),
            })?;
        }
        Cmd::Ask {
            addr,
            request,
            timeout_ms,
        } => {
            let addr = addr.unwrap_or_else(|| SocketAddr::from((SERVICE_IP, SERVICE_PORT)));
            let timeout = Duration::from_millis(timeout_ms.clamp(10, 600_000));
            let mut c = xenft_lab::service::Conn::connect(addr, timeout)
                .with_context(|| format!("connecting to {addr}"))?;
            println!("{}", c.ask(&request)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xenft-lab: {e:#}");
            ExitCode::from(2)
        }
    }
}
