//! Running `xenft-sr` exactly as xapi-storage-script does (`main.ml`, `fork_exec_rpc`): the
//! executable named after the method in the plugin's directory (here symlinks to the binary,
//! as the package installs them), argv `[path, "--json"]`, the named arguments as one JSON
//! object on stdin, the reply on stdout, exit 0 or the error object with a non-zero exit.
#![allow(dead_code)]

pub mod tapdisk;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_xenft-sr");

/// The methods installed as scripts (volume plugin, then datapath plugin).
pub const VOLUME_METHODS: &[&str] = &[
    "Plugin.query",
    "Plugin.diagnostics",
    "SR.create",
    "SR.attach",
    "SR.detach",
    "SR.destroy",
    "SR.stat",
    "SR.ls",
    "Volume.create",
    "Volume.destroy",
    "Volume.resize",
    "Volume.stat",
    "Volume.set_name",
    "Volume.set_description",
    "Volume.set",
    "Volume.unset",
];
pub const DATAPATH_METHODS: &[&str] = &[
    "Plugin.query",
    "Datapath.open",
    "Datapath.attach",
    "Datapath.activate",
    "Datapath.deactivate",
    "Datapath.detach",
    "Datapath.close",
];

/// The two plugin directories under `root`, filled with symlinks named after the methods.
pub fn install_plugins(root: &Path) -> (PathBuf, PathBuf) {
    let vol = root.join("volume/org.xen.xapi.storage.xenft");
    let dp = root.join("datapath/xenft");
    for (dir, methods) in [(&vol, VOLUME_METHODS), (&dp, DATAPATH_METHODS)] {
        std::fs::create_dir_all(dir).unwrap();
        for m in methods {
            std::os::unix::fs::symlink(BIN, dir.join(m)).unwrap();
        }
    }
    (vol, dp)
}

/// A finished call: the exit status's success, stdout parsed, stderr.
#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    pub code: Option<i32>,
    pub out: Value,
    pub stderr: String,
}

impl Outcome {
    /// The reply; panics with the error otherwise.
    pub fn reply(self, what: &str) -> Value {
        assert!(self.ok, "{what} failed: {} / {}", self.out, self.stderr);
        self.out
    }
    /// The error object; panics on success. Checks the shape xapi parses.
    pub fn error(self, what: &str) -> (String, Vec<String>) {
        assert!(!self.ok, "{what} should fail, replied {}", self.out);
        assert_eq!(
            self.code,
            Some(1),
            "{what}: exit code (101 would be a panic)"
        );
        let code = self.out["code"].as_str().expect("error code").to_string();
        let params = self.out["params"]
            .as_array()
            .expect("error params")
            .iter()
            .map(|p| p.as_str().expect("string param").to_string())
            .collect();
        assert!(self.out["backtrace"]["files"].is_array(), "backtrace shape");
        (code, params)
    }
}

/// Runs `script` (a method symlink) with raw stdin bytes, prefixed by `prefix` (e.g.
/// `ip netns exec NS env XENFT_SR_CONFIG=...`).
pub fn run_raw(prefix: &[String], script: &Path, stdin: &[u8]) -> Outcome {
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(script);
            c
        }
        None => Command::new(script),
    };
    let mut child = cmd
        .arg("--json")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the plugin");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let out = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{}: stdout is not one JSON value ({e}): {stdout:?} stderr {}",
            script.display(),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    Outcome {
        ok: o.status.success(),
        code: o.status.code(),
        out,
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}
