//! A drill's report and the demo's summary table.

use std::fmt;

use serde::Serialize;

use super::Fault;
use crate::service::CheckResult;
use crate::topology::Host;

/// What a drill found.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    /// The fault.
    pub fault: Fault,
    /// Fault injected → the pool noticed (ms).
    pub detection_ms: Option<u64>,
    /// What the pool did.
    pub action: String,
    /// Why (the deciding agent's reasoning).
    pub why: String,
    /// Longest gap between two acknowledged client writes around the fault (ms).
    pub downtime_ms: Option<u64>,
    /// Writes acknowledged to the client when the check ran.
    pub acked_writes: u64,
    /// Reading every acknowledged record back.
    pub data: Option<CheckResult>,
    /// Repair → replication back to full protection (ms).
    pub resync_ms: Option<u64>,
    /// The host that ran the VM when the fault was injected.
    pub primary: Option<Host>,
    /// The VM's state after the drill (and its repair).
    pub final_state: Option<String>,
    /// Notes (what was not measured and why).
    pub notes: Vec<String>,
    /// Checks that failed.
    pub failures: Vec<String>,
}

impl DrillReport {
    pub(super) fn new(fault: Fault) -> Self {
        Self {
            fault,
            detection_ms: None,
            action: String::new(),
            why: String::new(),
            downtime_ms: None,
            acked_writes: 0,
            data: None,
            resync_ms: None,
            primary: None,
            final_state: None,
            notes: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// PASS when nothing failed and the data check ran.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.data.is_some_and(|d| d.missing == 0)
    }

    pub(super) fn fail(&mut self, what: impl Into<String>) {
        self.failures.push(what.into());
    }
}

fn ms(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v} ms"))
}

impl fmt::Display for DrillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "drill fault={} (vm1 on {})",
            self.fault,
            self.primary.map_or("-", Host::name)
        )?;
        writeln!(f, "  detection : {}", ms(self.detection_ms))?;
        writeln!(f, "  action    : {}", self.action)?;
        writeln!(f, "  why       : {}", self.why)?;
        writeln!(
            f,
            "  downtime  : {} (longest gap between acknowledged client writes)",
            ms(self.downtime_ms)
        )?;
        match self.data {
            Some(d) => writeln!(
                f,
                "  data      : {} acknowledged writes, {} read back, {} missing",
                self.acked_writes,
                d.checked - d.missing,
                d.missing
            )?,
            None => writeln!(f, "  data      : NOT CHECKED")?,
        }
        writeln!(f, "  resync    : {}", ms(self.resync_ms))?;
        if let Some(st) = &self.final_state {
            writeln!(f, "  state     : {st}")?;
        }
        for n in &self.notes {
            writeln!(f, "  note      : {n}")?;
        }
        for e in &self.failures {
            writeln!(f, "  FAILED    : {e}")?;
        }
        writeln!(
            f,
            "  verdict   : {}",
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

/// A summary table of several drills.
#[must_use]
pub fn table(reports: &[DrillReport]) -> String {
    let mut s = format!(
        "{:<10} {:<6} {:>10} {:>10} {:>14} {:>10}  {:<8} {}\n",
        "fault", "vm on", "detection", "downtime", "acked/missing", "resync", "verdict", "after"
    );
    for r in reports {
        let data = r.data.map_or_else(
            || "not checked".into(),
            |d| format!("{}/{}", r.acked_writes, d.missing),
        );
        s.push_str(&format!(
            "{:<10} {:<6} {:>10} {:>10} {:>14} {:>10}  {:<8} {}\n",
            r.fault.to_string(),
            r.primary.map_or("-", Host::name),
            ms(r.detection_ms),
            ms(r.downtime_ms),
            data,
            ms(r.resync_ms),
            if r.passed() { "PASS" } else { "FAIL" },
            r.final_state.as_deref().unwrap_or("-")
        ));
    }
    s
}
