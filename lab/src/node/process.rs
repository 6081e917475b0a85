//! The component processes a node starts on its host (`xenft-blkback`, `xenft-netback`): spawned
//! with their log in the state directory, waited for until they answer on their control socket,
//! killed when the host's role changes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{lock, with_port, Node};
use crate::LabError;

/// How long a starting component may take to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);

impl Node {
    /// Starts component `name` from `binary` with `args` into `slot` (killing what ran there),
    /// its log in `<host>.<name>.log`, and waits until `ready` (it answers on its control
    /// socket).
    pub(super) fn start_component(
        &self,
        slot: &Mutex<Option<Child>>,
        name: &str,
        binary: &Path,
        args: &[String],
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), LabError> {
        stop_component(slot);
        let log = self
            .cfg
            .dir
            .open_log(&format!("{}.{name}.log", self.me().name()))?;
        let child =
            crate::spawn_logged(Command::new(binary).args(args), log).map_err(|source| {
                LabError::Spawn {
                    cmd: binary.display().to_string(),
                    source,
                }
            })?;
        *lock(slot) = Some(child);
        let start = Instant::now();
        while !ready() {
            if start.elapsed() > START_TIMEOUT {
                return Err(LabError::Timeout(format!(
                    "{} did not answer on its control socket",
                    binary.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// Kills the component in `slot`, if one runs.
pub(super) fn stop_component(slot: &Mutex<Option<Child>>) {
    if let Some(mut c) = lock(slot).take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Command-line arguments: `words`, then each flag with its path.
pub(super) fn args(words: &[&str], paths: &[(&str, PathBuf)]) -> Vec<String> {
    let mut v: Vec<String> = words.iter().map(|s| (*s).to_string()).collect();
    for (flag, path) in paths {
        v.push((*flag).to_string());
        v.push(path.display().to_string());
    }
    v
}

impl Node {
    /// `--alink-path LOCAL=PEER` for both A-link interfaces, on `port` (a component's own
    /// A-link).
    pub(super) fn alink_path_args(&self, port: u16) -> Vec<String> {
        let (me, peer) = (self.me(), self.me().peer());
        (0..2)
            .flat_map(|p| {
                [
                    "--alink-path".to_string(),
                    format!(
                        "{}={}",
                        with_port(me.alink_addr(p), port),
                        with_port(peer.alink_addr(p), port)
                    ),
                ]
            })
            .collect()
    }
}
