//! `scripts/bench xen-lab-checkpoint`: inside the nested Xen lab (`scripts/xen-lab run
//! bench`), our checkpoint engine and then `xl remus` protect the same PVH guest from host 1
//! to host 2 with the same epoch interval for the same time. Both are timed by the same
//! outside instrument (the domain's SHUTDOWN_suspend state polled from dom0): checkpoints per
//! second and the time the guest spends suspended per checkpoint. Under TCG absolute times
//! mean little; the ratios are the result. Last line: a JSON object.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf);
    let lab = root.join("scripts/xen-lab");
    let build = Command::new(&lab).arg("build").status();
    if !build.is_ok_and(|s| s.success()) {
        println!("{{\"skipped\":\"scripts/xen-lab build failed\"}}");
        std::process::exit(1);
    }
    let out = Command::new(&lab)
        .args(["run", "bench"])
        .output()
        .expect("running scripts/xen-lab run bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    let Some(dir) = stdout.split("logs: ").nth(1).map(str::trim) else {
        println!("{{\"error\":\"no log folder in the lab output\"}}");
        std::process::exit(1);
    };
    let results = std::fs::read_to_string(Path::new(dir).join("results.txt")).unwrap_or_default();
    let mut r = BTreeMap::new();
    for line in results.lines() {
        if let Some((k, v)) = line.trim_start_matches("XENLAB-RESULT ").split_once('=') {
            if let Ok(x) = v.trim().parse::<f64>() {
                r.insert(k.to_string(), x);
            }
        }
    }
    let get = |k: &str| r.get(k).copied().unwrap_or(f64::NAN);
    let ours = get("ours_suspends_per_s");
    let remus = get("remus_suspends_per_s");
    let ratio = if remus > 0.0 { ours / remus } else { f64::NAN };
    let num = |x: f64| {
        if x.is_finite() {
            format!("{x:.3}")
        } else {
            "null".into()
        }
    };
    println!(
        "{{\"ours_vs_remus_epochs\":{},\"ours_pause_p99_ms\":{},\"remus_pause_p99_ms\":{},\
         \"ours_epochs_per_s\":{},\"remus_epochs_per_s\":{},\"ours_pause_p50_ms\":{},\
         \"remus_pause_p50_ms\":{},\"ours_engine_pause_p99_ms\":{},\"lab_passed\":{},\
         \"logs\":\"{}\"}}",
        num(ratio),
        num(get("ours_suspended_p99_ms")),
        num(get("remus_suspended_p99_ms")),
        num(ours),
        num(remus),
        num(get("ours_suspended_p50_ms")),
        num(get("remus_suspended_p50_ms")),
        num(get("ours_engine_pause_p99_ms")),
        out.status.success(),
        dir
    );
}
