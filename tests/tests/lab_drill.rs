//! The local pool end to end (root): `xenft-lab up` (the XenAPI test server as the pool's
//! xapi, `xenft pool-init` and `xenft vm-protect`, the production agents), real faults (an A-link cut; a host
//! killed, repaired and re-protected, then a partition and an uplink failure against the new
//! primary), `xenft-lab down`.
//!
//! Runs the real binaries: two node processes and a client in network namespaces, a
//! synthetic guest protected at level 3, a mirrored disk. The drill cuts `alink1` with
//! `ip link set down` and must report PASS: path loss detected, no failover, every write the
//! client had acknowledged read back, full protection again after the repair.

use std::process::Command;

use xenft_tests::lab::{build_binaries, target_dir, text, Lab};
use xenft_tests::netns::require_root;

#[test]
fn cut_alink_drill_passes_with_no_acknowledged_write_lost() {
    if !require_root("cut_alink_drill_passes_with_no_acknowledged_write_lost") {
        return;
    }
    let lab = Lab::new();
    let up = lab.run(&["up"]);
    assert!(up.status.success(), "lab up failed: {}", text(&up));
    let out = String::from_utf8_lossy(&up.stdout);
    assert!(out.contains("protected at level 3"), "{out}");
    // Protection was asked for through XenAPI only (`xenft vm-protect`), and the agents'
    // state came back into xapi: `xenft vm-status` said protected, every write read back.
    assert!(
        out.contains("protect vm1 through XenAPI") && out.contains("ms after vm-protect"),
        "{out}"
    );
    assert!(
        out.contains("0 missing") && out.contains("verdict   : PASS"),
        "{out}"
    );

    let drill = lab.run(&["drill", "fault=alink", "--hold-ms", "1500", "--json"]);
    let out = String::from_utf8_lossy(&drill.stdout);
    let line = out.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {}", text(&drill)));
    assert!(drill.status.success(), "drill failed: {}", text(&drill));
    assert_eq!(report["failures"], serde_json::json!([]), "{report}");
    assert!(report["detection_ms"].as_u64().is_some(), "{report}");
    assert!(report["resync_ms"].as_u64().is_some(), "{report}");
    let acked = report["acked_writes"].as_u64().expect("acked_writes");
    assert!(acked > 0, "{report}");
    assert_eq!(report["data"]["checked"].as_u64(), Some(acked), "{report}");
    assert_eq!(report["data"]["missing"].as_u64(), Some(0), "{report}");
    assert!(
        report["action"]
            .as_str()
            .unwrap_or_default()
            .contains("no failover"),
        "{report}"
    );

    let status = lab.run(&["status"]);
    let s = String::from_utf8_lossy(&status.stdout);
    assert!(
        s.contains("host1: Primary agent=protected serving=true"),
        "{s}"
    );
    assert!(s.contains("host2: Secondary"), "{s}");

    // Both cables cut: no failover, replication suspended; after the repair the level-3
    // replica whose stream broke is replaced by a fresh one and the VM is protected again.
    let r = crate::drill(
        &lab,
        &["drill", "fault=alinks", "--hold-ms", "1500", "--json"],
    );
    assert!(r["resync_ms"].as_u64().is_some(), "{r}");
    assert_eq!(
        r["final_state"], "protected (vm1 on host1, host2 secondary)",
        "{r}"
    );
}

/// Runs one drill with `--json`; its report.
fn drill(lab: &Lab, args: &[&str]) -> serde_json::Value {
    let d = lab.run(args);
    let out = String::from_utf8_lossy(&d.stdout);
    let line = out.lines().last().unwrap_or_default();
    let report: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("no JSON report ({e}): {}", text(&d)));
    assert!(d.status.success(), "drill failed: {}", text(&d));
    assert_eq!(report["failures"], serde_json::json!([]), "{report}");
    let acked = report["acked_writes"].as_u64().expect("acked_writes");
    assert_eq!(report["data"]["missing"].as_u64(), Some(0), "{report}");
    assert_eq!(report["data"]["checked"].as_u64(), Some(acked), "{report}");
    report
}

#[test]
fn host_drill_reprotects_then_partition_isolation_and_uplink_keep_one_serving_copy() {
    if !require_root(
        "host_drill_reprotects_then_partition_isolation_and_uplink_keep_one_serving_copy",
    ) {
        return;
    }
    let lab = Lab::new();
    let up = lab.run(&["up"]);
    assert!(up.status.success(), "lab up failed: {}", text(&up));

    // host1 dies: host2's agent takes over (quorum granted), host1 comes back as secondary.
    let r = drill(&lab, &["drill", "fault=host", "--hold-ms", "500", "--json"]);
    assert!(
        r["why"]
            .as_str()
            .unwrap_or_default()
            .contains("quorum granted"),
        "{r}"
    );
    assert!(r["resync_ms"].as_u64().is_some(), "{r}");
    assert_eq!(
        r["final_state"], "protected (vm1 on host2, host1 secondary)",
        "{r}"
    );

    // Partition against the new primary: the quorum server keeps it there.
    let r = drill(
        &lab,
        &["drill", "fault=partition", "--hold-ms", "3000", "--json"],
    );
    assert_eq!(r["primary"], "host2", "{r}");
    let action = r["action"].as_str().unwrap_or_default();
    assert!(action.contains("0 with two serving copies"), "{r}");
    assert!(
        r["why"]
            .as_str()
            .unwrap_or_default()
            .contains("claims were denied"),
        "{r}"
    );

    // host2 is cut from host1 and the quorum server but clients still reach it: it fences,
    // host1 takes over, host2 comes back as the secondary.
    let r = drill(
        &lab,
        &["drill", "fault=isolate", "--hold-ms", "3000", "--json"],
    );
    assert!(
        r["action"]
            .as_str()
            .unwrap_or_default()
            .contains("0 with two serving copies"),
        "{r}"
    );
    assert!(
        r["why"].as_str().unwrap_or_default().contains("fenced"),
        "{r}"
    );
    assert_eq!(
        r["final_state"], "protected (vm1 on host1, host2 secondary)",
        "{r}"
    );

    // host1's uplink fails: host2 relays, no failover.
    let r = drill(
        &lab,
        &["drill", "fault=uplink", "--hold-ms", "2000", "--json"],
    );
    assert!(
        r["action"]
            .as_str()
            .unwrap_or_default()
            .contains("no failover"),
        "{r}"
    );
    assert_eq!(
        r["final_state"], "protected (vm1 on host1, host2 secondary)",
        "{r}"
    );
}

#[test]
fn lab_commands_refuse_clearly_without_a_pool() {
    build_binaries();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(target_dir().join("xenft-lab"))
        .arg("--dir")
        .arg(dir.path().join("none"))
        .arg("status")
        .output()
        .expect("run xenft-lab");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no lab pool"));
    let bad = Command::new(target_dir().join("xenft-lab"))
        .args(["drill", "fault=meteor"])
        .output()
        .expect("run xenft-lab");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown fault"));
}

#[test]
fn compat_says_why_xen_levels_are_unsupported_on_a_host_without_xen() {
    build_binaries();
    let out = Command::new(target_dir().join("xenft-lab"))
        .args(["compat", "--json"])
        .output()
        .expect("run xenft-lab compat");
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("compat JSON");
    let xen = r["facts"]
        .as_array()
        .and_then(|f| f.iter().find(|x| x["name"] == "xen"))
        .expect("xen fact")
        .clone();
    if std::path::Path::new("/dev/xen/privcmd").exists() {
        eprintln!("SKIP: this host has Xen");
        return;
    }
    assert_eq!(xen["ok"], false, "{xen}");
    for l in r["levels"].as_array().expect("levels") {
        if l["platform"] == "xen" {
            assert_eq!(l["supported"], false, "{l}");
            assert!(l["why"].as_str().unwrap_or("").contains("no Xen"), "{l}");
        }
    }
    let local3 = r["levels"]
        .as_array()
        .and_then(|v| {
            v.iter()
                .find(|l| l["platform"] == "local pool" && l["level"] == 3)
        })
        .expect("local level 3");
    assert!(local3["why"].as_str().unwrap_or("").contains("userfaultfd"));
}
