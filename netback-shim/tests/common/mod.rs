//! Topologies for the privileged netback tests and the benchmark: network namespaces standing
//! for the VM, the host(s) running the shim, a switch and a client. Everything is removed when
//! the returned values drop (namespaces delete their interfaces).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xenft_netback::frame::{self, MacAddr};
use xenft_netback::sys::PacketSocket;
use xenft_netback::{Shim, ShimConfig};
use xenft_tests::netns::{self, Netns};

/// The VM's MAC (locally administered).
pub const VM_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x05]);
/// The client's MAC.
pub const CLIENT_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x01]);
/// The VM's address.
pub const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

pub type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Runs `prog args` inside `ns` and fails with its stderr when it fails.
pub fn sh(ns: &Netns, prog: &str, args: &[&str]) -> R<String> {
    let out = ns.command(prog).args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "{prog} {} in {}: {}",
            args.join(" "),
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// No IPv6 autoconfiguration noise on a namespace's interfaces (host and switch roles).
pub fn no_ipv6(ns: &Netns) -> R<()> {
    sh(ns, "sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
    sh(
        ns,
        "sysctl",
        &["-qw", "net.ipv6.conf.default.disable_ipv6=1"],
    )?;
    Ok(())
}

/// Offloads off on one interface (no super-frames, full checksums).
pub fn offloads_off(ns: &Netns, ifname: &str) -> R<()> {
    sh(
        ns,
        "ethtool",
        &[
            "-K", ifname, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
        ],
    )?;
    Ok(())
}

/// A veth pair without addresses on either end.
pub fn bare_veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> R<()> {
    netns::veth(a, a_if, "192.0.2.1/32", b, b_if, "192.0.2.2/32")?;
    a.ip(&["addr", "flush", "dev", a_if])?;
    b.ip(&["addr", "flush", "dev", b_if])?;
    Ok(())
}

/// Gives the VM side its MAC and address. Offloads stay on (the default, as on a real vif):
/// the relay carries checksum-offloaded frames and GSO super-frames.
fn setup_vm(vm: &Netns) -> R<()> {
    vm.ip(&["link", "set", "eth0", "address", &VM_MAC.to_string()])?;
    vm.ip(&["addr", "add", &format!("{VM_IP}/24"), "dev", "eth0"])?;
    Ok(())
}

fn setup_client(client: &Netns) -> R<()> {
    client.ip(&["link", "set", "eth0", "address", &CLIENT_MAC.to_string()])?;
    client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
    Ok(())
}

/// vm (eth0) ── host (vif0 | up0) ── client (eth0): the shim relays between vif0 and up0.
pub struct Line {
    pub vm: Netns,
    pub host: Netns,
    pub client: Netns,
}

impl Line {
    pub fn new() -> R<Line> {
        let line = Line::without_vif()?;
        line.create_vif()?;
        Ok(line)
    }

    /// Like [`Line::new`] but without the VM and its vif (`vif0`): the domain is not running
    /// yet. [`Line::add_vif`] creates them.
    pub fn without_vif() -> R<Line> {
        let vm = Netns::new()?;
        let host = Netns::new()?;
        let client = Netns::new()?;
        // No IPv6 autoconfiguration: the tests count the VM's frames exactly.
        for ns in [&vm, &host, &client] {
            no_ipv6(ns)?;
        }
        bare_veth(&host, "up0", &client, "eth0")?;
        setup_client(&client)?;
        Ok(Line { vm, host, client })
    }

    /// Creates the vif (`vif0` in the host, `eth0` in the VM) with the VM's MAC and address,
    /// as a domain start does, and the static neighbour entries.
    pub fn add_vif(&self) -> R<()> {
        self.create_vif()?;
        self.static_neighbours()
    }

    fn create_vif(&self) -> R<()> {
        bare_veth(&self.vm, "eth0", &self.host, "vif0")?;
        setup_vm(&self.vm)
    }

    /// Removes the vif (both ends), as a domain destroy does.
    pub fn del_vif(&self) -> R<()> {
        self.host.ip(&["link", "del", "vif0"])?;
        Ok(())
    }

    /// Static neighbour entries both ways, so no ARP exchange is needed.
    pub fn static_neighbours(&self) -> R<()> {
        self.vm.ip(&[
            "neigh",
            "replace",
            &CLIENT_IP.to_string(),
            "lladdr",
            &CLIENT_MAC.to_string(),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        self.client.ip(&[
            "neigh",
            "replace",
            &VM_IP.to_string(),
            "lladdr",
            &VM_MAC.to_string(),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        Ok(())
    }
}

/// Two hosts and a client on one switch (bridge `br0` in its own namespace):
/// vm_a ── host_a (vif0|up0) ── sw:pa ┐
/// vm_b ── host_b (vif0|up0) ── sw:pb ┼─ br0
///                 client (eth0) ── sw:pc ┘
/// Both VMs have the same MAC and address (the primary's and the secondary's copy).
pub struct Pool {
    pub vm_a: Netns,
    pub host_a: Netns,
    pub vm_b: Netns,
    pub host_b: Netns,
    pub sw: Netns,
    pub client: Netns,
}

impl Pool {
    pub fn new() -> R<Pool> {
        let p = Pool {
            vm_a: Netns::new()?,
            host_a: Netns::new()?,
            vm_b: Netns::new()?,
            host_b: Netns::new()?,
            sw: Netns::new()?,
            client: Netns::new()?,
        };
        for ns in [&p.host_a, &p.host_b, &p.sw] {
            no_ipv6(ns)?;
        }
        p.sw.ip(&["link", "add", "br0", "type", "bridge", "stp_state", "0"])?;
        p.sw.ip(&["link", "set", "br0", "up"])?;
        bare_veth(&p.vm_a, "eth0", &p.host_a, "vif0")?;
        bare_veth(&p.vm_b, "eth0", &p.host_b, "vif0")?;
        bare_veth(&p.host_a, "up0", &p.sw, "pa")?;
        bare_veth(&p.host_b, "up0", &p.sw, "pb")?;
        bare_veth(&p.client, "eth0", &p.sw, "pc")?;
        for port in ["pa", "pb", "pc"] {
            p.sw.ip(&["link", "set", port, "master", "br0"])?;
        }
        setup_vm(&p.vm_a)?;
        setup_vm(&p.vm_b)?;
        setup_client(&p.client)?;
        Ok(p)
    }

    /// The switch port the bridge has learnt `mac` on, if any.
    pub fn fdb_port(&self, mac: MacAddr) -> R<Option<String>> {
        let out = sh(&self.sw, "bridge", &["fdb", "show", "br", "br0"])?;
        let m = mac.to_string();
        Ok(out.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            if w.next() != Some(m.as_str()) || w.next() != Some("dev") {
                return None;
            }
            w.next().map(str::to_string)
        }))
    }
}

/// Starts a shim inside `ns`.
pub fn start_shim(ns: &Netns, cfg: ShimConfig) -> R<Shim> {
    let h = ns.spawn(move || Shim::start(cfg))?;
    let shim = h.join().map_err(|_| "shim start thread panicked")??;
    Ok(shim)
}

/// A default config for the topologies above.
pub fn shim_config() -> ShimConfig {
    let mut cfg = ShimConfig::new("vif0", "up0");
    cfg.vm_mac = Some(VM_MAC);
    cfg
}

/// Polls `f` every 10 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An AF_PACKET capture on one interface of a namespace: keeps the frames sent by `src`.
pub struct Capture {
    pub frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Capture {
    pub fn start(ns: &Netns, ifname: &str, src: MacAddr) -> R<Capture> {
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (f2, s2, ifname) = (Arc::clone(&frames), Arc::clone(&stop), ifname.to_string());
        let handle = ns.spawn(move || {
            let sock = match PacketSocket::open(&ifname) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = sock.set_recv_timeout(Duration::from_millis(50));
            let _ = ready_tx.send(Ok(()));
            let mut buf = vec![0u8; 65_600];
            while !s2.load(Ordering::Relaxed) {
                if let Ok(Some(n)) = sock.recv(&mut buf) {
                    let n = n.min(buf.len());
                    if frame::src_mac(&buf[..n]) == Some(src) {
                        f2.lock().unwrap().push(buf[..n].to_vec());
                    }
                }
            }
        })?;
        ready_rx.recv()??;
        Ok(Capture {
            frames,
            stop,
            handle: Some(handle),
        })
    }

    /// The sequence numbers (first four payload bytes, big-endian) of the captured IPv4/UDP
    /// frames to destination `port`, as `vm_send_udp` numbers them.
    pub fn udp_seqs(&self, port: u16) -> Vec<u32> {
        self.udp_payloads(port)
            .iter()
            .map(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
            .collect()
    }

    /// Payloads of captured IPv4/UDP frames to destination `port`.
    pub fn udp_payloads(&self, port: u16) -> Vec<Vec<u8>> {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter_map(|f| udp_payload(f, port))
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The payload of an IPv4/UDP frame to destination `port`.
pub fn udp_payload(f: &[u8], port: u16) -> Option<Vec<u8>> {
    if f.get(12..14)? != [0x08, 0x00] || *f.get(23)? != 17 {
        return None;
    }
    let ihl = usize::from(f.get(14)? & 0x0f) * 4;
    let udp = f.get(14 + ihl..)?;
    if u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]) != port {
        return None;
    }
    Some(udp.get(8..)?.to_vec())
}

/// A thread in the client namespace serving one TCP connection; `join` returns what it served.
pub struct Server<T>(JoinHandle<std::io::Result<T>>);

impl<T> Server<T> {
    /// Waits for the server to finish (the connection closed) and returns its result.
    pub fn join(self) -> R<T> {
        Ok(self.0.join().map_err(|_| "server panicked")??)
    }
}

/// A TCP server on `CLIENT_IP:port` inside `client` that serves the first connection with
/// `serve` in its own thread, and that connection opened from `vm` (5 s to connect, 10 s read
/// timeout, so a lost reply fails the test instead of hanging it).
pub fn tcp_from_vm<T: Send + 'static>(
    client: &Netns,
    vm: &Netns,
    port: u16,
    serve: impl FnOnce(TcpStream) -> std::io::Result<T> + Send + 'static,
) -> R<(TcpStream, Server<T>)> {
    let listener = client
        .spawn(move || TcpListener::bind((CLIENT_IP, port)))?
        .join()
        .map_err(|_| "bind panicked")??;
    let server = Server(std::thread::spawn(move || {
        let (c, _) = listener.accept()?;
        serve(c)
    }));
    let conn = vm
        .spawn(move || {
            TcpStream::connect_timeout(&(CLIENT_IP, port).into(), Duration::from_secs(5))
        })?
        .join()
        .map_err(|_| "connect panicked")??;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok((conn, server))
}

/// Echoes what arrives on `c` until the peer closes it.
pub fn echo(mut c: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        c.write_all(&buf[..n])?;
    }
}

/// Sends UDP datagrams carrying `seqs` (as 4-byte big-endian numbers, padded to `size` bytes)
/// from the VM's address in `vm` to the client's `port`.
pub fn vm_send_udp(vm: &Netns, port: u16, seqs: std::ops::Range<u32>, size: usize) -> R<()> {
    let h = vm.spawn(move || -> std::io::Result<()> {
        let s = std::net::UdpSocket::bind((VM_IP, 0))?;
        for seq in seqs {
            let mut payload = seq.to_be_bytes().to_vec();
            payload.resize(size.max(4), 0xab);
            s.send_to(&payload, (CLIENT_IP, port))?;
        }
        Ok(())
    })?;
    h.join().map_err(|_| "sender panicked")??;
    Ok(())
}

/// Kills the child on drop, so a failing test leaves no relay running.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The relay binary run in `ns` between `vif0` and `up0` for the VM's MAC; the caller adds the
/// mode, control socket and A-link options.
pub fn relay_command(ns: &Netns) -> std::process::Command {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_xenft-netback"));
    cmd.args([
        "--vif",
        "vif0",
        "--uplink",
        "up0",
        "--mac",
        &VM_MAC.to_string(),
    ]);
    cmd
}

/// One request to the relay's control socket, through the contract's client.
pub fn call(
    sock: &std::path::Path,
    req: &xenft_control::netback::Request,
) -> R<xenft_control::netback::Reply> {
    Ok(xenft_tests::components::call::<xenft_control::Netback>(
        sock, req,
    )?)
}

/// The relay's counters, through the contract's client.
pub fn counters(sock: &std::path::Path) -> R<xenft_control::netback::Counters> {
    match call(sock, &xenft_control::netback::Request::Counters)? {
        xenft_control::netback::Reply::Counters { counters } => Ok(*counters),
        other => Err(format!("counters answered with {other:?}").into()),
    }
}
