//! Network namespaces and veth pairs for privileged integration tests.
//!
//! Names carry the creating process id (`xft<pid>n<k>`), so that parallel test processes never
//! collide and namespaces left by a killed process can be swept by the next one.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{setns, CloneFlags};

/// What can go wrong while building a topology.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command (`ip ...`) could not be started.
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Entering a namespace failed.
    #[error("cannot enter namespace {name}: {reason}")]
    Enter {
        /// The namespace.
        name: String,
        /// Why.
        reason: String,
    },
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// True when the process runs as root (network namespaces need it).
#[must_use]
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Returns true when the test may go on; prints a clear skip message otherwise.
#[must_use]
pub fn require_root(test: &str) -> bool {
    if is_root() {
        true
    } else {
        eprintln!("SKIP {test}: needs root to create network namespaces and veth pairs");
        false
    }
}

/// Runs a command to completion and fails with its stderr when it fails.
///
/// # Errors
/// [`NetnsError::Spawn`] or [`NetnsError::Failed`].
pub fn run(program: &str, args: &[&str]) -> Result<Output, NetnsError> {
    let cmd = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NetnsError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            cmd,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Deletes namespaces made by test processes that no longer exist.
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("xft") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('n') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", &name]);
        }
    }
}

/// A network namespace owned by this test; deleted (with its interfaces) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with its loopback up.
    ///
    /// # Errors
    /// When `ip netns add` fails (not root, or no iproute2).
    pub fn new() -> Result<Self, NetnsError> {
        sweep_stale();
        let k = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("xft{}n{k}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS` inside the namespace.
    ///
    /// # Errors
    /// When the command fails.
    pub fn ip(&self, args: &[&str]) -> Result<Output, NetnsError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command that will run inside the namespace (`ip netns exec NAME program`).
    #[must_use]
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Moves the calling thread into this namespace. Sockets the thread opens afterwards live
    /// in the namespace. Use it at the start of a thread dedicated to one simulated host.
    ///
    /// # Errors
    /// When the namespace file cannot be opened or `setns` fails.
    pub fn enter_current_thread(&self) -> Result<(), NetnsError> {
        let path = format!("/var/run/netns/{}", self.name);
        let f = File::open(&path).map_err(|e| NetnsError::Enter {
            name: self.name.clone(),
            reason: e.to_string(),
        })?;
        setns(f, CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Enter {
            name: self.name.clone(),
            reason: e.to_string(),
        })
    }

    /// Spawns a thread that runs `f` inside this namespace.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn spawn<F, R>(&self, f: F) -> std::io::Result<std::thread::JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::Builder::new()
            .name(format!("ns-{}", self.name))
            .spawn(move || {
                let f_ns = File::open(&path).expect("namespace file exists while its owner lives");
                setns(f_ns, CloneFlags::CLONE_NEWNET).expect("setns into a live namespace");
                f()
            })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Creates a veth pair between two namespaces, names each end, gives each an address
/// (`a_addr`/`b_addr` in CIDR form, e.g. `10.1.0.1/24`) and brings both ends up.
///
/// # Errors
/// When an `ip` command fails.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addr: &str,
    b: &Netns,
    b_if: &str,
    b_addr: &str,
) -> Result<(), NetnsError> {
    let k = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Temporary names in the root namespace must be unique and at most 15 bytes.
    let ta = format!("xa{}_{k}", std::process::id() % 100_000);
    let tb = format!("xb{}_{k}", std::process::id() % 100_000);
    run(
        "ip",
        &["link", "add", &ta, "type", "veth", "peer", "name", &tb],
    )?;
    let moved = run("ip", &["link", "set", &ta, "netns", a.name(), "name", a_if])
        .and_then(|_| run("ip", &["link", "set", &tb, "netns", b.name(), "name", b_if]));
    if let Err(e) = moved {
        let _ = run("ip", &["link", "del", &ta]);
        let _ = run("ip", &["link", "del", &tb]);
        return Err(e);
    }
    a.ip(&["addr", "add", a_addr, "dev", a_if])?;
    b.ip(&["addr", "add", b_addr, "dev", b_if])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}
