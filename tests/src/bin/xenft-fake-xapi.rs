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
//!
//! A pool with named hosts and VMs with devices (the local pool's xapi):
//! ```text
//! xenft-fake-xapi --host host1=10.202.1.2 --host host2=10.202.2.2 \
//!     --vm vm1:256,disk=67108864,mac=02:16:3e:00:00:0a
//! ```
//! `--host NAME=ADDRESS` (repeatable) replaces `--hosts`; a VM's `disk=BYTES` adds a disk at
//! userdevice 0 (a VDI of that `virtual_size` and its VBD), `mac=MAC` a vif at device 0.

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
    /// Number of hosts (`host1..N`, addresses 10.0.0.N).
    #[arg(long, default_value_t = 2)]
    hosts: u32,
    /// A host `NAME=ADDRESS`; repeatable; when given, replaces `--hosts`.
    #[arg(long = "host")]
    named_hosts: Vec<String>,
    /// Guest memory per host, MiB.
    #[arg(long, default_value_t = 16384)]
    host_memory_mib: i64,
    /// A running VM on the first host, `NAME:MEMORY_MIB[,disk=BYTES][,mac=MAC]`; repeatable.
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
    let hosts: Vec<(String, String)> = if a.named_hosts.is_empty() {
        (1..=a.hosts)
            .map(|i| (format!("host{i}"), format!("10.0.0.{i}")))
            .collect()
    } else {
        a.named_hosts
            .iter()
            .map(|h| parse_host(h))
            .collect::<anyhow::Result<_>>()?
    };
    let mut first = None;
    for (name, address) in &hosts {
        let (r, _) = srv.add_host(name, address, a.host_memory_mib << 20);
        first.get_or_insert(r);
    }
    for spec in &a.vms {
        let vm = parse_vm(spec)?;
        let (r, _) = srv.add_vm(&vm.name, vm.memory_mib << 20, first.as_deref());
        if let Some(size) = vm.disk_bytes {
            srv.add_disk(&r, 0, size);
        }
        if let Some(mac) = &vm.mac {
            srv.add_vif(&r, 0, mac);
        }
    }
    println!("{}", srv.url());
    loop {
        std::thread::park();
    }
}

/// `NAME=ADDRESS`.
fn parse_host(spec: &str) -> anyhow::Result<(String, String)> {
    match spec.split_once('=') {
        Some((n, a)) if !n.is_empty() && !a.is_empty() => Ok((n.to_string(), a.to_string())),
        _ => anyhow::bail!("--host {spec:?}: expected NAME=ADDRESS"),
    }
}

/// A `--vm` argument.
#[derive(Debug, PartialEq)]
struct VmSpec {
    name: String,
    memory_mib: i64,
    disk_bytes: Option<i64>,
    mac: Option<String>,
}

/// `NAME:MEMORY_MIB[,disk=BYTES][,mac=MAC]`.
fn parse_vm(spec: &str) -> anyhow::Result<VmSpec> {
    let mut parts = spec.split(',');
    let head = parts.next().unwrap_or_default();
    let (name, mib) = head
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("--vm {spec:?}: expected NAME:MEMORY_MIB"))?;
    if name.is_empty() {
        anyhow::bail!("--vm {spec:?}: the VM has no name");
    }
    let memory_mib = match mib.parse::<i64>() {
        Ok(m) if m > 0 && m <= 1 << 30 => m,
        _ => anyhow::bail!("--vm {spec:?}: memory {mib:?} is not a MiB count"),
    };
    let mut vm = VmSpec {
        name: name.to_string(),
        memory_mib,
        disk_bytes: None,
        mac: None,
    };
    for p in parts {
        match p.split_once('=') {
            Some(("disk", b)) => match b.parse::<i64>() {
                Ok(b) if b > 0 => vm.disk_bytes = Some(b),
                _ => anyhow::bail!("--vm {spec:?}: disk {b:?} is not a byte count"),
            },
            Some(("mac", m)) if m.split(':').count() == 6 => vm.mac = Some(m.to_string()),
            _ => anyhow::bail!("--vm {spec:?}: unknown part {p:?} (disk=BYTES, mac=MAC)"),
        }
    }
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_specs_with_devices_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_vm("vm1:256,disk=1048576,mac=02:16:3e:00:00:0a").unwrap(),
            VmSpec {
                name: "vm1".into(),
                memory_mib: 256,
                disk_bytes: Some(1_048_576),
                mac: Some("02:16:3e:00:00:0a".into()),
            }
        );
        assert_eq!(parse_vm("web:64").unwrap().disk_bytes, None);
        for bad in [
            "web",
            ":64",
            "web:x",
            "web:64,disk=-1",
            "web:64,mac=zz",
            "web:64,cpu=2",
        ] {
            let e = parse_vm(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        assert_eq!(
            parse_host("host1=10.202.1.2").unwrap(),
            ("host1".into(), "10.202.1.2".into())
        );
        assert!(parse_host("host1").is_err());
    }
}
