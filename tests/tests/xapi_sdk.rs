//! The official XenAPI Python SDK (PyPI `XenAPI`) against our XenAPI test server: a real
//! client checks the server's wire format and semantics. Test names contain `sdk` so that
//! `cargo test --workspace -- sdk` runs exactly these. The SDK is installed with pip when
//! missing (scripts/deps/xapi.pip lists it for scripts/test).

use std::process::Command;

use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};

const GIB: i64 = 1 << 30;

fn ensure_sdk() {
    let have = Command::new("python3")
        .args(["-c", "import XenAPI"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have {
        let st = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "XenAPI"])
            .status()
            .expect("python3 runs");
        assert!(
            st.success(),
            "pip install XenAPI failed; the sdk tests need it"
        );
    }
}

/// Runs `script` with the SDK imported as `XenAPI` and `url`, `user`, `pw` defined; returns
/// the JSON object it prints last.
fn run_sdk(srv: &FakeXapi, script: &str) -> serde_json::Value {
    ensure_sdk();
    let prelude = "import sys, json, XenAPI\nurl, user, pw = sys.argv[1:4]\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!("{prelude}{script}"))
        .args([srv.url().as_str(), srv.user(), srv.password()])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sdk script failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("bad output {stdout:?}: {e}"))
}

fn pool() -> (FakeXapi, String, String) {
    FakeXapi::with_pool()
}

#[test]
fn sdk_login_records_and_api_version() {
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, _) = srv.add_host("host1", "10.0.0.1", 16 * GIB);
    let (h2, _) = srv.add_host("host2", "10.0.0.2", 16 * GIB);
    let (vm, _) = srv.add_vm("web01", 4 * GIB, Some(&h1));
    let r = run_sdk(
        &srv,
        r#"
s = XenAPI.Session(url)
s.xenapi.login_with_password(user, pw, "1.0", "xenft-sdk-test")
recs = s.xenapi.VM.get_all_records()
(ref, rec), = [(r, v) for r, v in recs.items()
               if not v["is_a_template"] and not v["is_control_domain"]]
out = {"ref": ref, "dom0s": sorted(v["resident_on"] for v in recs.values() if v["is_control_domain"]),
       "templates": sum(1 for v in recs.values() if v["is_a_template"]), "name": rec["name_label"], "mem": rec["memory_static_max"],
       "power": rec["power_state"], "api": s.API_version,
       "by_uuid": s.xenapi.VM.get_by_uuid(rec["uuid"])}
s.xenapi.session.logout()
print(json.dumps(out))
"#,
    );
    assert_eq!(r["ref"], vm.as_str());
    assert_eq!(r["name"], "web01");
    let mut hosts = vec![h1, h2];
    hosts.sort();
    assert_eq!(r["dom0s"], serde_json::json!(hosts), "one dom0 per host");
    assert_eq!(r["templates"], 2);
    assert_eq!(
        r["mem"],
        (4 * GIB).to_string(),
        "XenAPI ints are decimal strings"
    );
    assert_eq!(r["power"], "Running");
    assert_eq!(r["api"], "2.21", "pool.get_master + host.get_API_version_*");
    assert_eq!(r["by_uuid"], vm.as_str());
    assert_eq!(srv.session_count(), 0, "logout ends the session");
}

#[test]
fn sdk_bad_password_raises_failure_with_code() {
    let (srv, _, _) = pool();
    let r = run_sdk(
        &srv,
        r#"
s = XenAPI.Session(url)
try:
    s.xenapi.login_with_password(user, "wrong", "1.0", "t")
    out = {"ok": True}
except XenAPI.Failure as e:
    out = {"details": e.details}
print(json.dumps(out))
"#,
    );
    assert_eq!(r["details"][0], "SESSION_AUTHENTICATION_FAILED");
    assert_eq!(r["details"][1], "root");
}

#[test]
fn sdk_other_config_add_duplicate_and_remove() {
    let (srv, _, vm) = pool();
    let r = run_sdk(
        &srv,
        r#"
s = XenAPI.Session(url)
s.xenapi.login_with_password(user, pw, "1.0", "t")
vm = s.xenapi.VM.get_by_name_label("web01")[0]
s.xenapi.VM.add_to_other_config(vm, "xenft.level", "2")
try:
    s.xenapi.VM.add_to_other_config(vm, "xenft.level", "3")
    dup = None
except XenAPI.Failure as e:
    dup = e.details
after_add = s.xenapi.VM.get_other_config(vm)
s.xenapi.VM.remove_from_other_config(vm, "xenft.level")
s.xenapi.VM.remove_from_other_config(vm, "absent-key")
print(json.dumps({"dup": dup, "after_add": after_add,
                  "after_remove": s.xenapi.VM.get_other_config(vm)}))
"#,
    );
    assert_eq!(r["after_add"]["xenft.level"], "2");
    assert_eq!(
        r["dup"],
        serde_json::json!(["MAP_DUPLICATE_KEY", "VM", "other_config", vm, "xenft.level"])
    );
    assert_eq!(r["after_remove"], serde_json::json!({}));
}

#[test]
fn sdk_event_from_with_token_and_timeout() {
    let (srv, _, vm) = pool();
    let r = run_sdk(
        &srv,
        r#"
import time
s = XenAPI.Session(url)
s.xenapi.login_with_password(user, pw, "1.0", "t")
ev_from = getattr(s.xenapi.event, "from")
first = ev_from(["vm"], "", 0.0)
guests = [e for e in first["events"]
          if not e["snapshot"]["is_a_template"] and not e["snapshot"]["is_control_domain"]]
t0 = time.time()
idle = ev_from(["vm"], first["token"], 0.3)
waited = time.time() - t0
vm = guests[0]["ref"]
s.xenapi.VM.add_to_other_config(vm, "k", "v")
s.xenapi.pool.add_to_other_config(s.xenapi.pool.get_all()[0], "ignored", "x")
nxt = ev_from(["vm"], idle["token"], 5.0)
print(json.dumps({"first": [(e["class"], e["operation"], e["ref"]) for e in guests],
                  "vm_events": len(first["events"]),
                  "idle": len(idle["events"]), "waited": waited,
                  "next": [(e["class"], e["operation"], e["ref"], e["snapshot"]["other_config"])
                           for e in nxt["events"]]}))
"#,
    );
    assert_eq!(r["first"], serde_json::json!([["vm", "add", vm]]));
    assert_eq!(
        r["vm_events"], 5,
        "web01, two control domains, two templates"
    );
    assert_eq!(r["idle"], 0);
    assert!(
        r["waited"].as_f64().unwrap() >= 0.25,
        "event.from honours its timeout"
    );
    assert_eq!(
        r["next"],
        serde_json::json!([["vm", "mod", vm, {"k": "v"}]]),
        "only the vm class, with the new snapshot"
    );
}

#[test]
fn sdk_host_call_plugin_runs_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("echo");
    std::fs::write(
        &plugin,
        "#!/usr/bin/env python3\nimport sys, json, xmlrpc.client\n\
         params, method = xmlrpc.client.loads(sys.argv[1])\n\
         print(xmlrpc.client.dumps(({'Status': 'Success', 'Value': json.dumps({'fn': method, \
         'session_is_ref': params[0].startswith('OpaqueRef:'), 'args': params[1]})},), \
         methodresponse=True))\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let srv = FakeXapi::start(FakeXapiConfig {
        plugin_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    srv.add_host("host1", "10.0.0.1", GIB);
    let r = run_sdk(
        &srv,
        r#"
s = XenAPI.Session(url)
s.xenapi.login_with_password(user, pw, "1.0", "t")
h = s.xenapi.host.get_all()[0]
res = json.loads(s.xenapi.host.call_plugin(h, "echo", "hello", {"a": "b"}))
try:
    s.xenapi.host.call_plugin(h, "nope", "x", {})
    missing = None
except XenAPI.Failure as e:
    missing = e.details
print(json.dumps({"res": res, "missing": missing}))
"#,
    );
    assert_eq!(
        r["res"],
        serde_json::json!({"fn": "hello", "session_is_ref": true, "args": {"a": "b"}})
    );
    assert_eq!(
        r["missing"],
        serde_json::json!(["XENAPI_MISSING_PLUGIN", "nope"])
    );
}

#[test]
fn sdk_relogs_in_on_session_invalid_from_our_server() {
    let (srv, _, vm) = pool();
    srv.fail_next("VM.get_all", "SESSION_INVALID", &["OpaqueRef:expired"]);
    let r = run_sdk(
        &srv,
        r#"
s = XenAPI.Session(url)
s.xenapi.login_with_password(user, pw, "1.0", "t")
print(json.dumps({"vms": s.xenapi.VM.get_all()}))
"#,
    );
    assert_eq!(
        r["vms"].as_array().unwrap().len(),
        5,
        "web01, 2 dom0s, 2 templates"
    );
    assert!(r["vms"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(vm)));
    assert_eq!(
        srv.calls("session.login_with_password"),
        2,
        "the SDK recognised our SESSION_INVALID envelope and logged in again"
    );
}

#[test]
fn sdk_reads_protection_written_by_xenft() {
    let (srv, _, vm) = pool();
    let api = xenft_xapi::XenApi::new(xenft_xapi::ConnectOptions::new(
        xenft_xapi::transport::Endpoint::parse(&srv.url()).unwrap(),
        xenft_xapi::Credentials {
            user: srv.user().into(),
            password: srv.password().into(),
        },
    ))
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(xenft_xapi::ops::protect(
        &api,
        "web01",
        xenft_xapi::registry::Level::Component,
        "host2",
    ))
    .unwrap();
    let r = run_sdk(
        &srv,
        r#"
s = XenAPI.Session(url)
s.xenapi.login_with_password(user, pw, "1.0", "t")
vm = s.xenapi.VM.get_by_name_label("web01")[0]
oc = s.xenapi.VM.get_other_config(vm)
sec = s.xenapi.host.get_record(s.xenapi.host.get_by_uuid(oc["xenft.secondary"]))
print(json.dumps({"vm": vm, "level": oc["xenft.level"], "secondary": sec["name_label"]}))
"#,
    );
    assert_eq!(r["vm"], vm.as_str());
    assert_eq!(r["level"], "2");
    assert_eq!(r["secondary"], "host2");
}

#[test]
fn sdk_over_the_unix_socket_like_xapi_local() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("xapi");
    let path = sock.to_str().unwrap().to_string();
    assert!(
        !path.contains('_'),
        "the SDK spells the socket path with '_' for '/'"
    );
    let srv = FakeXapi::start(FakeXapiConfig {
        unix_socket: Some(sock),
        ..Default::default()
    })
    .unwrap();
    srv.add_host("host1", "10.0.0.1", GIB);
    let r = run_sdk(
        &srv,
        &format!(
            r#"
s = XenAPI.Session("http://{}/", transport=XenAPI.UDSTransport())
s.xenapi.login_with_password(user, pw, "1.0", "t")
print(json.dumps({{"hosts": [h["name_label"] for h in s.xenapi.host.get_all_records().values()]}}))
"#,
            path.replace('/', "_")
        ),
    );
    assert_eq!(r["hosts"], serde_json::json!(["host1"]));
}
