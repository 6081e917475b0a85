//! `xenft vm-protect` on a pool with a xenft SR: a level-2/3 VM's disks must be on it, and
//! `move=true` moves them there with `VDI.pool_migrate` first. The `xenft` binary against the
//! XenAPI test server, whose `VDI.pool_migrate` does what xapi's does (new VDI on the SR, VBD
//! re-pointed, old VDI destroyed, xapi's SR-feature and power-state checks).

use std::process::{Command, Output};

use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig, DEFAULT_SR};

const GIB: i64 = 1 << 30;

/// The features a SMAPIv3 SR needs for xapi to move a disk into it (xen-api
/// `ocaml/xapi/xapi_vm_migrate.ml`, `assert_can_migrate`), beside the xenft SR's own.
const MIGRATION_TARGET: &[&str] = &["VDI_CREATE", "VDI_SNAPSHOT", "VDI_MIRROR_IN"];

struct Pool {
    srv: FakeXapi,
    dir: tempfile::TempDir,
    web: String,
}

fn pool(power_state: Option<&str>) -> Pool {
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, _) = srv.add_host("host1", "10.0.0.1", 32 * GIB);
    srv.add_host("host2", "10.0.0.2", 32 * GIB);
    let running = power_state.is_none_or(|s| s != "Halted");
    let (web, _) = srv.add_vm("web01", 4 * GIB, running.then_some(h1.as_str()));
    if let Some(s) = power_state.filter(|s| *s != "Halted") {
        srv.set_field(&web, "power_state", s);
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), format!("{}\n", srv.password())).unwrap();
    std::fs::write(dir.path().join("config"), "# empty\n").unwrap();
    Pool { srv, dir, web }
}

/// The features the xenft SR declares to xapi today (its `Plugin.query`), as xapi-storage-
/// script passes them on (it adds `VDI_SNAPSHOT` only for a `Volume.snapshot` script, which
/// the SR does not install).
fn xenft_sr_features_today() -> Vec<String> {
    xenft_sr::volume_ops::query()["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

fn xenft(p: &Pool, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xenft"))
        .args(args)
        .env("XENFT_URL", p.srv.url())
        .env("XENFT_USER", p.srv.user())
        .env("XENFT_PASSWORD_FILE", p.dir.path().join("pw"))
        .env("XENFT_CONFIG", p.dir.path().join("config"))
        .env("HOME", p.dir.path())
        .env_remove("XENFT_LOG")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn field(p: &Pool, r: &str, f: &str) -> String {
    p.srv.record(r).unwrap()[f].as_str().unwrap().to_string()
}

fn protect(p: &Pool, extra: &[&str]) -> Output {
    let mut args = vec!["vm-protect", "vm=web01", "level=2", "secondary=host2"];
    args.extend_from_slice(extra);
    xenft(p, &args)
}

fn unprotected(p: &Pool) -> bool {
    !p.srv
        .map_field(&p.web, "other_config")
        .contains_key("xenft.level")
}

#[test]
fn level_2_with_a_disk_outside_the_xenft_sr_is_refused_naming_it_its_sr_and_the_move() {
    let p = pool(None);
    let root = p.srv.add_disk(&p.web, 0, 8 * GIB);
    let (xsr, _) = p.srv.add_sr("mirrored", "xenft", MIGRATION_TARGET);
    p.srv.add_disk_on(&p.web, 1, GIB, &xsr);
    let o = protect(&p, &[]);
    let all = text(&o);
    assert_eq!(o.status.code(), Some(5), "refused: {all}");
    let vdi = field(&p, &root, "uuid");
    assert!(
        all.contains(&format!(
            "disk 0 (VDI \"disk 0\", {vdi}) on SR \"{DEFAULT_SR}\" (type nfs"
        )),
        "names the disk and its SR: {all}"
    );
    assert!(
        !all.contains("disk 1 ("),
        "disk 1 is on the xenft SR: {all}"
    );
    assert!(all.contains("\"mirrored\""), "names the xenft SR: {all}");
    let uuid = field(&p, &p.web, "uuid");
    assert!(
        all.contains(&format!(
            "xenft vm-protect vm={uuid} level=2 secondary=host2 move=true"
        )),
        "says how to move: {all}"
    );
    assert!(unprotected(&p), "nothing written");
    assert_eq!(p.srv.calls("VDI.pool_migrate"), 0);
    // Level 1 restarts the VM on its shared disk: no mirror, no check.
    let o = xenft(
        &p,
        &["vm-protect", "vm=web01", "level=1", "secondary=host2"],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn without_a_xenft_sr_level_2_protects_as_before_and_move_says_there_is_no_sr() {
    let p = pool(None);
    p.srv.add_disk(&p.web, 0, 8 * GIB);
    let o = protect(&p, &["move=true"]);
    let all = text(&o);
    assert_eq!(o.status.code(), Some(5), "{all}");
    assert!(all.contains("no xenft SR"), "{all}");
    assert!(all.contains("xe sr-create type=xenft"), "{all}");
    assert!(unprotected(&p));
    let o = protect(&p, &[]);
    assert!(
        o.status.success(),
        "the agent mirrors it itself: {}",
        text(&o)
    );
    let o = protect(&p, &["sr=mirrored"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "sr= without move=true: {}",
        text(&o)
    );
}

#[test]
fn move_true_moves_each_disk_into_the_xenft_sr_then_protects() {
    let p = pool(None);
    let root = p.srv.add_disk(&p.web, 0, 8 * GIB);
    let nfs = p.srv.default_sr();
    let (xsr, xsr_uuid) = p.srv.add_sr("mirrored", "xenft", MIGRATION_TARGET);
    let data = p.srv.add_disk_on(&p.web, 1, GIB, &xsr);
    let old_uuid = field(&p, &root, "uuid");
    let o = protect(&p, &["move=true"]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    assert_eq!(
        p.srv.calls("VDI.pool_migrate"),
        1,
        "only the disk outside: {all}"
    );
    let new = p.srv.disk_at(&p.web, 0).unwrap();
    assert_ne!(new, root, "xapi's copy is a new VDI");
    assert!(p.srv.record(&root).is_none(), "the old VDI is destroyed");
    let rec = p.srv.record(&new).unwrap();
    assert_eq!(rec["SR"].as_str(), Some(xsr.as_str()));
    assert_eq!(rec["virtual_size"].as_i64(), Some(8 * GIB));
    let new_uuid = rec["uuid"].as_str().unwrap().to_string();
    assert_ne!(new_uuid, old_uuid);
    assert!(
        all.contains(&format!(
            "disk 0 moved from SR \"{DEFAULT_SR}\" into SR \"mirrored\" (VDI {old_uuid} is now {new_uuid})"
        )),
        "{all}"
    );
    assert_eq!(p.srv.disk_at(&p.web, 1).as_deref(), Some(data.as_str()));
    let in_sr = |sr: &str| -> Vec<String> {
        p.srv.record(sr).unwrap()["VDIs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert!(in_sr(&xsr).contains(&new) && !in_sr(&nfs).contains(&root));
    let oc = p.srv.map_field(&p.web, "other_config");
    assert_eq!(oc["xenft.level"], "2", "protected after the move");
    // Everything on the SR now: a plain protect passes, a second move moves nothing.
    let o = protect(&p, &["move=true", &format!("sr={xsr_uuid}"), "--json"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["moved"], serde_json::json!([]), "{out}");
    assert_eq!(j["level"], 2, "{out}");
    assert_eq!(p.srv.calls("VDI.pool_migrate"), 1);
}

#[test]
fn a_halted_vms_disks_are_copied_into_the_xenft_sr_as_it_is_today_and_a_paused_one_is_refused() {
    // VDI.copy needs only VDI_CREATE of the SR (xen-api ocaml/xapi/xapi_vdi.ml), which the
    // xenft SR declares: a halted VM's disk is copied and its VBD replaced by the copy's.
    let halted = pool(Some("Halted"));
    let root = halted.srv.add_disk(&halted.web, 0, GIB);
    let root_uuid = field(&halted, &root, "uuid");
    let features = xenft_sr_features_today();
    let features: Vec<&str> = features.iter().map(String::as_str).collect();
    let (xsr, _) = halted.srv.add_sr("mirrored", "xenft", &features);
    let o = protect(&halted, &["move=true"]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    assert_eq!(halted.srv.calls("VDI.pool_migrate"), 0, "{all}");
    assert_eq!(halted.srv.calls("VDI.copy"), 1, "{all}");
    let new = halted.srv.disk_at(&halted.web, 0).unwrap();
    assert_ne!(new, root);
    assert_eq!(field(&halted, &new, "SR"), xsr);
    let vbd = halted.srv.record(&halted.web).unwrap()["VBDs"]
        .as_array()
        .unwrap()[0]
        .as_str()
        .unwrap()
        .to_string();
    let vbd = halted.srv.record(&vbd).unwrap();
    assert_eq!(
        vbd["bootable"].as_bool(),
        Some(true),
        "the old VBD's settings"
    );
    assert_eq!(vbd["mode"].as_str(), Some("RW"));
    assert!(
        halted.srv.record(&root).is_some(),
        "the original is kept, detached"
    );
    assert!(
        all.contains(&format!("the original VDI {root_uuid} is kept, detached")),
        "{all}"
    );
    assert_eq!(
        halted.srv.map_field(&halted.web, "other_config")["xenft.level"],
        "2"
    );

    let paused = pool(Some("Paused"));
    paused.srv.add_disk(&paused.web, 0, GIB);
    paused.srv.add_sr("mirrored", "xenft", MIGRATION_TARGET);
    let o = protect(&paused, &["move=true"]);
    let all = text(&o);
    assert_eq!(o.status.code(), Some(5), "{all}");
    assert!(all.contains("is paused"), "{all}");
    assert_eq!(paused.srv.calls("VDI.pool_migrate"), 0);
    assert!(unprotected(&paused));
}

#[test]
fn moving_into_the_xenft_sr_as_it_is_today_is_refused_by_xapi_with_the_reason() {
    let p = pool(None);
    let root = p.srv.add_disk(&p.web, 0, 8 * GIB);
    let features = xenft_sr_features_today();
    let features: Vec<&str> = features.iter().map(String::as_str).collect();
    let (xsr, _) = p.srv.add_sr("mirrored", "xenft", &features);
    let o = protect(&p, &["move=true"]);
    let all = text(&o);
    assert_eq!(o.status.code(), Some(5), "{all}");
    assert!(
        all.contains(&format!(
            "SR_DOES_NOT_SUPPORT_MIGRATION [{xsr}, VDI_SNAPSHOT;VDI_MIRROR_IN]"
        )) || all.contains(&format!(
            "SR_DOES_NOT_SUPPORT_MIGRATION [\"{xsr}\", \"VDI_SNAPSHOT;VDI_MIRROR_IN\"]"
        )),
        "xapi's refusal: {all}"
    );
    assert!(all.contains("no disk was moved"), "{all}");
    assert!(all.contains("xapi_vm_migrate.ml"), "says why: {all}");
    assert!(
        all.contains("shut the VM down"),
        "and what works today: {all}"
    );
    assert_eq!(p.srv.disk_at(&p.web, 0).as_deref(), Some(root.as_str()));
    assert!(unprotected(&p));
}

#[test]
fn a_halted_vm_whose_new_disk_cannot_be_attached_gets_its_original_back() {
    let p = pool(Some("Halted"));
    let root = p.srv.add_disk(&p.web, 0, GIB);
    p.srv.add_sr("mirrored", "xenft", MIGRATION_TARGET);
    p.srv
        .fail_next("VBD.create", "INTERNAL_ERROR", &["injected by the test"]);
    let o = protect(&p, &["move=true"]);
    let all = text(&o);
    assert_eq!(o.status.code(), Some(5), "{all}");
    assert!(all.contains("INTERNAL_ERROR"), "{all}");
    assert_eq!(
        p.srv.disk_at(&p.web, 0).as_deref(),
        Some(root.as_str()),
        "the VM has its original disk again: {all}"
    );
    assert!(unprotected(&p));
}
