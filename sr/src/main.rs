//! `xenft-sr`: one SMAPIv3 plugin method per run, as xapi-storage-script runs it (see the
//! crate docs): the method is argv\[0\]'s basename (a symlink named after it) or the first
//! argument; the arguments are a JSON object on stdin; the reply goes to stdout, exit 0, or
//! the error object with exit 1.

use std::io::Read;
use std::path::Path;

use serde_json::Value;
use xenft_sr::error::SrError;

/// Largest arguments object accepted on stdin.
const MAX_INPUT: u64 = 4 << 20;

fn method() -> Result<String, SrError> {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let base = Path::new(&argv0)
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if base.contains('.') {
        return Ok(base);
    }
    args.map(|a| a.to_string_lossy().into_owned())
        .find(|a| a != "--json")
        .ok_or_else(|| {
            SrError::bad_args(
                "no method: run as a symlink named after it (SR.attach, ...) or as xenft-sr METHOD",
            )
        })
}

fn run() -> Result<Value, SrError> {
    let m = method()?;
    let mut input = Vec::new();
    std::io::stdin()
        .take(MAX_INPUT + 1)
        .read_to_end(&mut input)
        .map_err(|e| SrError::bad_args(format!("reading stdin: {e}")))?;
    if input.len() as u64 > MAX_INPUT {
        return Err(SrError::bad_args(format!(
            "arguments over {MAX_INPUT} bytes"
        )));
    }
    let args: Value = serde_json::from_slice(&input)
        .map_err(|e| SrError::bad_args(format!("arguments are not JSON: {e}")))?;
    let host = xenft_sr::config::HostConfig::load()?;
    xenft_sr::call(&host, &m, &args)
}

fn main() {
    match run() {
        Ok(v) => {
            println!("{v}");
        }
        Err(e) => {
            eprintln!("xenft-sr: {e}");
            println!("{}", e.to_json());
            std::process::exit(1);
        }
    }
}
