//! The `xenft` binary against the XenAPI test server: what an administrator types and sees.

use std::process::{Command, Output};

use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::customfields::{value_key, FIELD_LEVEL, FIELD_SECONDARY, GUI_CONFIG_KEY};

const GIB: i64 = 1 << 30;

struct Pool {
    srv: FakeXapi,
    dir: tempfile::TempDir,
    h2: String,
    web: String,
}

fn pool(h2_mem: i64) -> Pool {
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, _) = srv.add_host("host1", "10.0.0.1", 32 * GIB);
    let (h2, _) = srv.add_host("host2", "10.0.0.2", h2_mem);
    let (web, _) = srv.add_vm("web01", 4 * GIB, Some(&h1));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), format!("{}\n", srv.password())).unwrap();
    std::fs::write(dir.path().join("config"), "# empty\n").unwrap();
    Pool { srv, dir, h2, web }
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

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn protect_then_unprotect_updates_registry_and_custom_fields() {
    let p = pool(16 * GIB);
    let out = ok(&xenft(
        &p,
        &["vm-protect", "vm=web01", "level=2", "secondary=host2"],
    ));
    assert!(out.contains("level 2"), "{out}");
    let oc = p.srv.map_field(&p.web, "other_config");
    let h2_uuid = p.srv.record(&p.h2).unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(oc["xenft.level"], "2");
    assert_eq!(oc["xenft.secondary"], h2_uuid);
    assert_eq!(oc["xenft.state"], "pending");
    assert_eq!(
        oc[&value_key(FIELD_LEVEL)],
        "2",
        "XenCenter shows the level"
    );
    assert_eq!(oc[&value_key(FIELD_SECONDARY)], "host2");

    // The agents report `protected`; a level change leaves their state for them to update.
    p.srv
        .set_map_key(&p.web, "other_config", "xenft.state", Some("protected"));
    ok(&xenft(
        &p,
        &["vm-protect", "vm=web01", "level=3", "secondary=host2"],
    ));
    let oc = p.srv.map_field(&p.web, "other_config");
    assert_eq!(oc["xenft.level"], "3");
    assert_eq!(oc["xenft.state"], "protected");
    ok(&xenft(
        &p,
        &["vm-protect", "vm=web01", "level=2", "secondary=host2"],
    ));

    let status: serde_json::Value =
        serde_json::from_str(&ok(&xenft(&p, &["vm-status", "vm=web01", "--json"]))).unwrap();
    assert_eq!(status["level"], 2);
    assert_eq!(status["secondary"], "host2");
    assert_eq!(status["host"], "host1");

    let out = ok(&xenft(&p, &["vm-unprotect", "vm=web01"]));
    assert!(out.contains("unprotected"), "{out}");
    let oc = p.srv.map_field(&p.web, "other_config");
    assert!(!oc.contains_key("xenft.level"));
    assert!(!oc.contains_key("xenft.secondary"));
    assert!(!oc.contains_key(&value_key(FIELD_LEVEL)));
    assert_eq!(oc["xenft.state"], "unprotected");
}

#[test]
fn protect_refuses_with_numbers_when_secondary_lacks_memory() {
    let p = pool(2 * GIB);
    let o = xenft(
        &p,
        &["vm-protect", "vm=web01", "level=3", "secondary=host2"],
    );
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("4.00 GiB") && e.contains("2.00 GiB"), "{e}");
    assert!(!p
        .srv
        .map_field(&p.web, "other_config")
        .contains_key("xenft.level"));
}

#[test]
fn protect_counts_memory_already_reserved_by_other_protected_vms() {
    let p = pool(8 * GIB);
    let h1 = p.srv.record(&p.web).unwrap()["resident_on"]
        .as_str()
        .unwrap()
        .to_string();
    p.srv.add_vm("db01", 6 * GIB, Some(&h1));
    ok(&xenft(
        &p,
        &["vm-protect", "vm=web01", "level=1", "secondary=host2"],
    ));
    let o = xenft(&p, &["vm-protect", "vm=db01", "level=1", "secondary=host2"]);
    assert_eq!(o.status.code(), Some(5));
    let e = stderr(&o);
    assert!(
        e.contains("web01") && e.contains("6.00 GiB") && e.contains("4.00 GiB"),
        "{e}"
    );
}

#[test]
fn protect_refuses_the_host_the_vm_runs_on() {
    let p = pool(16 * GIB);
    let o = xenft(
        &p,
        &["vm-protect", "vm=web01", "level=2", "secondary=host1"],
    );
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
}

#[test]
fn unknown_names_get_did_you_mean() {
    let p = pool(16 * GIB);
    let o = xenft(&p, &["vm-status", "vm=web1"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        stderr(&o).contains("did you mean \"web01\""),
        "{}",
        stderr(&o)
    );
    let o = xenft(
        &p,
        &["vm-protect", "vm=web01", "level=2", "secondary=hots2"],
    );
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("host2"), "{}", stderr(&o));
    let o = xenft(&p, &["vm-lst"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("vm-list"), "{}", stderr(&o));
    let o = xenft(
        &p,
        &["vm-protect", "vm=web01", "level=7", "secondary=host2"],
    );
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn uuids_work_as_names_and_minimal_prints_uuids() {
    let p = pool(16 * GIB);
    let uuid = p.srv.record(&p.web).unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let out = ok(&xenft(&p, &["vm-list", "--minimal"]));
    assert_eq!(out.trim(), uuid);
    ok(&xenft(
        &p,
        &[
            "vm-protect",
            &format!("vm={uuid}"),
            "level=1",
            "secondary=host2",
        ],
    ));
    assert_eq!(
        ok(&xenft(&p, &["vm-status", "vm=web01", "--minimal"])).trim(),
        "1"
    );
}

#[test]
fn malformed_registry_is_reported_and_left_untouched() {
    let p = pool(16 * GIB);
    let pool_ref = p.srv.pool_ref();
    for bad in ["{not json", r#"{"format_version": 99, "future": true}"#] {
        p.srv
            .set_map_key(&pool_ref, "other_config", "xenft.pool", Some(bad));
        let o = xenft(&p, &["pool-status"]);
        assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
        let o = xenft(&p, &["pool-init", "quorum=10.0.0.9:7100", "force=true"]);
        assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
        let o = xenft(
            &p,
            &["vm-protect", "vm=web01", "level=1", "secondary=host2"],
        );
        assert_eq!(
            o.status.code(),
            Some(6),
            "protect stops too: {}",
            stderr(&o)
        );
        assert_eq!(
            p.srv.map_field(&pool_ref, "other_config")["xenft.pool"],
            bad
        );
    }
    // A malformed VM level shows as an error in vm-list, it is not hidden.
    p.srv
        .set_map_key(&p.web, "other_config", "xenft.level", Some("high"));
    let out = ok(&xenft(&p, &["vm-list"]));
    assert!(out.contains("ERROR"), "{out}");
}

#[test]
fn pool_init_writes_registry_and_keeps_existing_custom_fields() {
    let p = pool(16 * GIB);
    let pool_ref = p.srv.pool_ref();
    let theirs = "<CustomFieldDefinitions><CustomFieldDefinition name=\"owner\" type=\"String\" defaultValue=\"\" /></CustomFieldDefinitions>";
    p.srv
        .set_map_key(&pool_ref, "gui_config", GUI_CONFIG_KEY, Some(theirs));
    ok(&xenft(
        &p,
        &[
            "pool-init",
            "alink:host1=10.1.0.1:7000,10.2.0.1:7000",
            "alink:host2=10.1.0.2:7000,10.2.0.2:7000",
            "quorum=10.0.0.9:7100",
        ],
    ));
    let raw = &p.srv.map_field(&pool_ref, "other_config")["xenft.pool"];
    let cfg = xenft_xapi::registry::parse_pool_config(raw, "pool").unwrap();
    assert_eq!(cfg.hosts.len(), 2);
    assert_eq!(cfg.quorum_servers, vec!["10.0.0.9:7100".to_string()]);
    let defs = &p.srv.map_field(&pool_ref, "gui_config")[GUI_CONFIG_KEY];
    let names = xenft_xapi::customfields::definition_names(defs).unwrap();
    assert_eq!(
        names,
        vec!["owner", "xenft-level", "xenft-secondary", "xenft-status"]
    );

    // The A-link key went into a xapi secret, not into other_config.
    let secret_uuid = cfg.secret_uuid.clone().expect("pool-init stores a secret");
    let api = xenft_xapi::XenApi::new(xenft_xapi::ConnectOptions::new(
        xenft_xapi::transport::Endpoint::parse(&p.srv.url()).unwrap(),
        xenft_xapi::Credentials {
            user: p.srv.user().into(),
            password: p.srv.password().into(),
        },
    ))
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = rt.block_on(api.secret_value(&secret_uuid)).unwrap();
    assert_eq!(key.len(), 64, "a generated 256-bit key");
    assert!(!raw.contains(&key), "the key is not in other_config");

    // A second init does not silently replace the first.
    let o = xenft(&p, &["pool-init", "quorum=10.0.0.8:7100"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    let status: serde_json::Value =
        serde_json::from_str(&ok(&xenft(&p, &["pool-status", "--json"]))).unwrap();
    assert_eq!(status["registry"]["quorum_servers"][0], "10.0.0.9:7100");

    // host-list shows the A-links; compat check gives level 3 with two A-links.
    let hosts: serde_json::Value =
        serde_json::from_str(&ok(&xenft(&p, &["host-list", "--json"]))).unwrap();
    assert_eq!(hosts[0]["alinks"][1], "10.2.0.1:7000");
    let compat: serde_json::Value = serde_json::from_str(&ok(&xenft(
        &p,
        &["host-compat-check", "host=host2", "--json"],
    )))
    .unwrap();
    assert_eq!(compat[0]["levels"], serde_json::json!([1, 2, 3]));
    // force=true replaces it and keeps the key; secret-file= brings one's own.
    ok(&xenft(
        &p,
        &["pool-init", "quorum=10.0.0.8:7100", "force=true"],
    ));
    let raw2 = &p.srv.map_field(&pool_ref, "other_config")["xenft.pool"];
    let cfg2 = xenft_xapi::registry::parse_pool_config(raw2, "pool").unwrap();
    assert_eq!(cfg2.secret_uuid.as_deref(), Some(secret_uuid.as_str()));
    std::fs::write(p.dir.path().join("key"), "0123456789abcdef0123\n").unwrap();
    let keyfile = format!("secret-file={}", p.dir.path().join("key").display());
    ok(&xenft(
        &p,
        &["pool-init", "quorum=10.0.0.8:7100", "force=true", &keyfile],
    ));
    let raw3 = &p.srv.map_field(&pool_ref, "other_config")["xenft.pool"];
    let cfg3 = xenft_xapi::registry::parse_pool_config(raw3, "pool").unwrap();
    let key = rt
        .block_on(api.secret_value(cfg3.secret_uuid.as_deref().unwrap()))
        .unwrap();
    assert_eq!(key, "0123456789abcdef0123");
}

#[test]
fn compat_check_result_gates_protection_levels() {
    let p = pool(16 * GIB);
    // No A-links registered: host2 supports level 1 only.
    ok(&xenft(&p, &["pool-init", "quorum=10.0.0.9:7100"]));
    let out = ok(&xenft(&p, &["host-compat-check", "host=host2"]));
    assert!(out.contains("levels 1"), "{out}");
    let o = xenft(
        &p,
        &["vm-protect", "vm=web01", "level=2", "secondary=host2"],
    );
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("A-link"), "{}", stderr(&o));
    ok(&xenft(
        &p,
        &["vm-protect", "vm=web01", "level=1", "secondary=host2"],
    ));
}

#[test]
fn expired_session_is_renewed_without_the_user_noticing() {
    let p = pool(16 * GIB);
    p.srv
        .fail_next("VM.get_all_records", "SESSION_INVALID", &["OpaqueRef:old"]);
    ok(&xenft(&p, &["vm-list"]));
    assert_eq!(p.srv.calls("session.login_with_password"), 2);
}

#[test]
fn connection_problems_exit_3_and_passwords_never_come_from_argv() {
    let p = pool(16 * GIB);
    std::fs::write(p.dir.path().join("pw"), "wrong\n").unwrap();
    let o = xenft(&p, &["vm-list"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("SESSION_AUTHENTICATION_FAILED"));
    let o = xenft(&p, &["--password", "x", "vm-list"]);
    assert_eq!(o.status.code(), Some(2));
    let o = Command::new(env!("CARGO_BIN_EXE_xenft"))
        .args(["--url", "http://127.0.0.1:1", "--password-file"])
        .arg(p.dir.path().join("pw"))
        .arg("vm-list")
        .env("XENFT_CONFIG", p.dir.path().join("absent"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "unreadable explicit config: {}",
        stderr(&o)
    );
}

#[test]
fn migrate_moves_the_vm_but_not_onto_its_secondary() {
    let p = pool(16 * GIB);
    p.srv.add_host("host3", "10.0.0.3", 16 * GIB);
    ok(&xenft(
        &p,
        &["vm-protect", "vm=web01", "level=1", "secondary=host2"],
    ));
    let o = xenft(&p, &["vm-migrate", "vm=web01", "host=host2"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    ok(&xenft(
        &p,
        &["vm-migrate", "vm=web01", "host=host3", "live=true"],
    ));
    let status: serde_json::Value =
        serde_json::from_str(&ok(&xenft(&p, &["vm-status", "vm=web01", "--json"]))).unwrap();
    assert_eq!(status["host"], "host3");
}

#[test]
fn event_list_streams_changes_as_json_lines() {
    let p = pool(16 * GIB);
    let child = Command::new(env!("CARGO_BIN_EXE_xenft"))
        .args(["event-list", "classes=vm", "timeout=3", "--json"])
        .env("XENFT_URL", p.srv.url())
        .env("XENFT_PASSWORD_FILE", p.dir.path().join("pw"))
        .env("XENFT_CONFIG", p.dir.path().join("config"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for i in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(700));
        p.srv
            .set_map_key(&p.web, "other_config", "tick", Some(&i.to_string()));
    }
    let out = ok(&child.wait_with_output().unwrap());
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!events.is_empty(), "no events in {out:?}");
    for e in &events {
        assert_eq!(e["class"], "vm");
        assert_eq!(e["operation"], "mod");
        assert_eq!(e["ref"], p.web.as_str());
        assert_eq!(e["name"], "web01");
    }
}

#[test]
fn jsonrpc_transport_gives_the_same_results() {
    let p = pool(16 * GIB);
    ok(&xenft(
        &p,
        &[
            "--jsonrpc",
            "vm-protect",
            "vm=web01",
            "level=3",
            "secondary=host2",
        ],
    ));
    let status: serde_json::Value = serde_json::from_str(&ok(&xenft(
        &p,
        &["--jsonrpc", "vm-status", "vm=web01", "--json"],
    )))
    .unwrap();
    assert_eq!(status["level"], 3);
    assert!(
        p.srv.calls(xenft_tests::xapi_server::JSONRPC_REQUESTS) >= 4,
        "went over /jsonrpc"
    );
    let o = xenft(
        &p,
        &[
            "--jsonrpc",
            "vm-protect",
            "vm=web02",
            "level=3",
            "secondary=host2",
        ],
    );
    assert_eq!(o.status.code(), Some(4));
}
