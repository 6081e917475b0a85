//! The demo: build the pool and protect its VM through XenAPI (the `protect` row: `xenft
//! vm-protect` until `xenft vm-status` says protected), run a series of drills (rebuilding the
//! pool whenever a drill leaves the VM unprotected), print every report and a summary table,
//! remove the pool.

use std::time::{Duration, Instant};

use crate::drill::{self, DrillConfig, DrillReport, Fault};
use crate::pool::{self, UpConfig};
use crate::state::StateDir;
use crate::topology;
use crate::xapi_pool::ProtectReport;
use crate::LabError;

/// What the demo found: the first protection through XenAPI, then each drill.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// The `protect` row (the first `up`).
    pub protect: Option<ProtectReport>,
    /// The drills, in order.
    pub drills: Vec<DrillReport>,
}

impl DemoReport {
    /// PASS: protected through XenAPI, and every drill passed.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.protect.as_ref().is_some_and(ProtectReport::passed)
            && self.drills.iter().all(DrillReport::passed)
    }
}

/// Runs `faults` in order; `say` receives the narration. The pool is removed at the end,
/// also when a step fails.
pub fn run(
    dir: &StateDir,
    up: &UpConfig,
    faults: &[Fault],
    hold: Duration,
    say: &mut dyn FnMut(&str),
) -> Result<DemoReport, LabError> {
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

/// Makes sure a protected pool runs; the `protect` report of the pool it built, if it built
/// one.
fn ensure_protected(
    dir: &StateDir,
    up: &UpConfig,
    say: &mut dyn FnMut(&str),
) -> Result<Option<ProtectReport>, LabError> {
    if dir.pool_file().exists() && pool::protected(dir)? {
        return Ok(None);
    }
    if dir.pool_file().exists() {
        say("== the last drill left the VM unprotected: rebuilding the pool (lab down, lab up)");
        pool::down(dir)?;
    }
    let t = Instant::now();
    say(
        "== lab up: namespaces host1, host2, client; 2 A-links; production bridge; the pool's \
         xapi (XenAPI test server); xenft pool-init; xenft-agent on each host; \
         xenft vm-protect vm=vm1 level=3 secondary=host2",
    );
    pool::up(dir, up)?;
    let report: Option<ProtectReport> = dir.read_json(&dir.file("protect.json"))?;
    if let Some(r) = &report {
        say(&r.to_string());
    }
    say(&format!("   pool up in {:.1} s", t.elapsed().as_secs_f64()));
    say(&pool::status(dir)?);
    Ok(report)
}

fn steps(
    dir: &StateDir,
    up: &UpConfig,
    faults: &[Fault],
    hold: Duration,
    say: &mut dyn FnMut(&str),
) -> Result<DemoReport, LabError> {
    let mut reports = Vec::new();
    let mut protect = None;
    for &fault in faults {
        let built = ensure_protected(dir, up, say)?;
        if protect.is_none() {
            protect = built;
        }
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
    if protect.is_none() {
        protect = ensure_protected(dir, up, say)?;
    }
    say("== summary");
    let mut table = drill::table(&reports);
    if let Some(p) = &protect {
        // The protect row first, under the header.
        let at = table.find('\n').map_or(table.len(), |i| i + 1);
        table.insert_str(at, &p.row());
    }
    say(&table);
    Ok(DemoReport {
        protect,
        drills: reports,
    })
}
