//! `xenft-fake-xapi`: runs the XenAPI test server (tests/src/xapi_server/) for demos and
//! manual checks with `xe`-like clients, the Python SDK or `xenft`.
//!
//! ```text
//! xenft-fake-xapi --listen 127.0.0.1:8080 --hosts 2 --vm web01:2048 --vm db01:4096
//! ```
//! Prints the URL, then serves until killed. Hosts are `host1..N` with `--host-memory-mib` each
//! and a control domain each; xapi's default templates are there too; VMs given as
//! `NAME:MEMORY_MIB` run on host1. `--slave-of ADDRESS` makes it a pool member: logins answer
//! `HOST_IS_SLAVE [ADDRESS]`.

use std::path::PathBuf;

use clap::Parser;
use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};

#[derive(Parser, Debug)]
#[command(about = "XenAPI test server with xapi's semantics (for tests and demos)")]
struct Args {
    /// TCP address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Also listen on this Unix socket.
    #[arg(long)]
    unix_socket: Option<PathBuf>,
    /// Accepted user.
    #[arg(long, default_value = "root")]
    user: String,
    /// File holding the accepted password (default password: xenroot).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Directory of host plugins for host.call_plugin.
    #[arg(long)]
    plugin_dir: Option<PathBuf>,
    /// Number of hosts.
    #[arg(long, default_value_t = 2)]
    hosts: u32,
    /// Guest memory per host, MiB.
    #[arg(long, default_value_t = 16384)]
    host_memory_mib: i64,
    /// A running VM on host1, `NAME:MEMORY_MIB`; repeatable.
    #[arg(long = "vm")]
    vms: Vec<String>,
    /// Act as a pool member whose master is at this address (logins answer HOST_IS_SLAVE).
    #[arg(long)]
    slave_of: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let password = match &a.password_file {
        Some(p) => std::fs::read_to_string(p)?
            .trim_end_matches(['\r', '\n'])
            .to_string(),
        None => "xenroot".to_string(),
    };
    let srv = FakeXapi::start(FakeXapiConfig {
        user: a.user,
        password,
        plugin_dir: a.plugin_dir,
        unix_socket: a.unix_socket,
        listen: a.listen,
        slave_of: a.slave_of,
        ..Default::default()
    })?;
    let mut first = None;
    for i in 1..=a.hosts {
        let (r, _) = srv.add_host(
            &format!("host{i}"),
            &format!("10.0.0.{i}"),
            a.host_memory_mib << 20,
        );
        first.get_or_insert(r);
    }
    for spec in &a.vms {
        let (name, mib) = spec
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--vm {spec:?}: expected NAME:MEMORY_MIB"))?;
        let mib: i64 = mib
            .parse()
            .map_err(|_| anyhow::anyhow!("--vm {spec:?}: bad MiB"))?;
        srv.add_vm(name, mib << 20, first.as_deref());
    }
    println!("{}", srv.url());
    loop {
        std::thread::park();
    }
}
