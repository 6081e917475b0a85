//! The demo: build the pool, run a series of drills (rebuilding the pool whenever a drill
//! leaves the VM unprotected), print every report and a summary table, remove the pool.

use std::time::{Duration, Instant};

use crate::drill::{self, DrillConfig, DrillReport, Fault};
use crate::pool::{self, UpConfig};
use crate::state::StateDir;
use crate::topology;
use crate::LabError;

/// Runs `faults` in order; `say` receives the narration. The pool is removed at the end,
/// also when a step fails.
pub fn run(
    dir: &StateDir,
    up: &UpConfig,
    faults: &[Fault],
    hold: Duration,
    say: &mut dyn FnMut(&str),
) -> Result<Vec<DrillReport>, LabError> {
    if !topology::existing_namespaces()?.is_empty() {
        if !dir.pool_file().exists() {
            return Err(LabError::WrongState(format!(
                "a lab pool from another state directory is running (namespaces {}*); \
                 remove it with `xenft-lab --dir DIR down` first",
                topology::PREFIX
            )));
        }
        say("== removing the previous lab pool");
        pool::down(dir)?;
    }
    let r = steps(dir, up, faults, hold, say);
    say("== lab down");
    let d = pool::down(dir);
    let reports = r?;
    d?;
    Ok(reports)
}

fn ensure_protected(
    dir: &StateDir,
    up: &UpConfig,
    say: &mut dyn FnMut(&str),
) -> Result<(), LabError> {
    if dir.pool_file().exists() && pool::protected(dir)? {
        return Ok(());
    }
    if dir.pool_file().exists() {
        say("== the last drill left the VM unprotected: rebuilding the pool (lab down, lab up)");
        pool::down(dir)?;
    }
    let t = Instant::now();
    say("== lab up: namespaces host1, host2, client; 2 A-links; production bridge; protect vm1 at level 3");
    pool::up(dir, up)?;
    say(&format!(
        "   protected in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    say(&pool::status(dir)?);
    Ok(())
}

fn steps(
    dir: &StateDir,
    up: &UpConfig,
    faults: &[Fault],
    hold: Duration,
    say: &mut dyn FnMut(&str),
) -> Result<Vec<DrillReport>, LabError> {
    let mut reports = Vec::new();
    for &fault in faults {
        ensure_protected(dir, up, say)?;
        say(&format!("== drill fault={fault}"));
        let r = drill::run(
            dir,
            &DrillConfig {
                fault,
                exe: up.exe.clone(),
                hold,
            },
        )?;
        say(&r.to_string());
        reports.push(r);
    }
    say("== summary");
    say(&drill::table(&reports));
    Ok(reports)
}
