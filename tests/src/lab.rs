//! The local pool (`xenft-lab`) as a test fixture.
//!
//! The lab's namespaces have fixed names (`xftlab-*`), so lab tests take an exclusive lock
//! (`flock` on a file in the temp directory) for as long as their pool lives: nextest runs them
//! in parallel processes, one at a time gets the pool. `Drop` runs `xenft-lab down`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::fcntl::{Flock, FlockArg};

/// The cargo target directory of the running test binary (`target/debug`).
#[must_use]
pub fn target_dir() -> PathBuf {
    // target/debug/deps/<test>-HASH -> target/debug
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned()
}

/// Builds `xenft-lab`, `xenft-synthetic-guest`, `xenft-quorum`, `xenft-blkback` and
/// `xenft-netback` (a no-op after a workspace build), so a test never runs stale binaries.
pub fn build_binaries() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let st = Command::new(cargo)
        .args([
            "build",
            "-q",
            "-p",
            "xenft-lab",
            "-p",
            "xenft-checkpoint",
            "-p",
            "xenft-agent",
            "-p",
            "xenft-blkback",
            "-p",
            "xenft-netback",
            "-p",
            "xenft-xapi",
            "-p",
            "xenft-tests",
            "--bins",
        ])
        .arg("--manifest-path")
        .arg(manifest)
        .status()
        .expect("run cargo build");
    assert!(
        st.success(),
        "building xenft-lab and the binaries its pool runs failed"
    );
}

/// A lab pool owned by one test: state in a temp directory, removed on drop.
pub struct Lab {
    /// The `xenft-lab` binary.
    pub exe: PathBuf,
    /// Temp directory (state dir, browser profile).
    pub dir: tempfile::TempDir,
    _lock: Flock<File>,
}

impl Lab {
    /// Waits for the lab lock, builds the binaries. The pool is not up yet.
    #[must_use]
    pub fn new() -> Self {
        let f = File::create(std::env::temp_dir().join("xenft-lab-tests.lock")).expect("lock file");
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("lab lock");
        build_binaries();
        Self {
            exe: target_dir().join("xenft-lab"),
            dir: tempfile::tempdir().expect("temp dir"),
            _lock: lock,
        }
    }

    /// Runs `xenft-lab --dir <temp>/state ARGS`.
    #[must_use]
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.exe)
            .arg("--dir")
            .arg(self.dir.path().join("state"))
            .args(args)
            .output()
            .expect("run xenft-lab")
    }
}

impl Lab {
    /// Starts `xenft-lab --dir <temp>/state ARGS` in the background (output captured).
    #[must_use]
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        Command::new(&self.exe)
            .arg("--dir")
            .arg(self.dir.path().join("state"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start xenft-lab")
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = self.run(&["down"]);
        if !out.status.success() {
            eprintln!("xenft-lab down: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// An `Output` as text for assertion messages.
#[must_use]
pub fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
