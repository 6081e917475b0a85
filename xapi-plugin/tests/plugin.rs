//! The host plugin binary, called the way xapi calls it: by Python's `xmlrpc.client` (building
//! the methodCall argv and parsing the methodResponse), and through the test server's
//! `host.call_plugin`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};
use xenft_xapi::transport::Endpoint;
use xenft_xapi::{ConnectOptions, Credentials, XenApi};

const GIB: i64 = 1 << 30;
const PLUGIN: &str = env!("CARGO_BIN_EXE_xenft-xapi-plugin");

fn api(srv: &FakeXapi) -> XenApi {
    let mut o = ConnectOptions::new(
        Endpoint::parse(&srv.url()).unwrap(),
        Credentials {
            user: srv.user().into(),
            password: srv.password().into(),
        },
    );
    o.timeout = Duration::from_secs(20);
    XenApi::new(o).unwrap()
}

/// Python plays xapi: `argv[1]` = xmlrpc.client.dumps((session, args), fn); prints the decoded
/// response as JSON.
fn python_calls_plugin(
    srv: &FakeXapi,
    raw_argv: Option<&str>,
    session: &str,
    func: &str,
    args: &str,
) -> serde_json::Value {
    let script = r#"
import sys, json, subprocess, xmlrpc.client
plugin, url, session, fn, args, raw = sys.argv[1:7]
argv = [raw] if raw != "-" else [xmlrpc.client.dumps((session, json.loads(args)), fn)]
if raw == "<none>":
    argv = []
p = subprocess.run([plugin] + argv, capture_output=True, text=True, env={"XENFT_URL": url}, timeout=30)
(resp,), _ = xmlrpc.client.loads(p.stdout)
print(json.dumps({"rc": p.returncode, "resp": resp}))
"#;
    let o = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args([
            PLUGIN,
            &srv.url(),
            session,
            func,
            args,
            raw_argv.unwrap_or("-"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn setup() -> (FakeXapi, String, String) {
    let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap();
    let (h1, _) = srv.add_host("host1", "10.0.0.1", 16 * GIB);
    srv.add_host("host2", "10.0.0.2", 16 * GIB);
    let (vm, _) = srv.add_vm("web01", 4 * GIB, Some(&h1));
    (srv, h1, vm)
}

#[tokio::test]
async fn python_xmlrpc_caller_protects_and_reads_status() {
    let (srv, _, vm) = setup();
    let session = api(&srv).login().await.unwrap();
    let r = python_calls_plugin(
        &srv,
        None,
        &session,
        "protect",
        r#"{"vm": "web01", "level": "2", "secondary": "host2"}"#,
    );
    assert_eq!(r["rc"], 0);
    assert_eq!(r["resp"]["Status"], "Success", "{r}");
    let v: serde_json::Value = serde_json::from_str(r["resp"]["Value"].as_str().unwrap()).unwrap();
    assert_eq!(v["level"], 2);
    assert_eq!(v["secondary_name"], "host2");
    assert_eq!(srv.map_field(&vm, "other_config")["xenft.level"], "2");

    let r = python_calls_plugin(&srv, None, &session, "status", r#"{"vm": "web01"}"#);
    let v: serde_json::Value = serde_json::from_str(r["resp"]["Value"].as_str().unwrap()).unwrap();
    assert_eq!(v["level"], 2);

    let r = python_calls_plugin(&srv, None, &session, "unprotect", r#"{"vm": "web01"}"#);
    assert_eq!(r["resp"]["Status"], "Success", "{r}");
    assert!(!srv
        .map_field(&vm, "other_config")
        .contains_key("xenft.level"));
}

#[tokio::test]
async fn malformed_argv_gets_a_failure_response_not_a_crash() {
    let (srv, _, _) = setup();
    for (raw, code) in [
        (Some("<methodCall><methodName>status"), "XENFT_PLUGIN_BAD_CALL"),
        (Some("<none>"), "XENFT_PLUGIN_BAD_CALL"),
        (Some("<methodCall><methodName>status</methodName><params><param><value><int>1</int></value></param></params></methodCall>"), "XENFT_PLUGIN_BAD_CALL"),
    ] {
        let r = python_calls_plugin(&srv, raw, "OpaqueRef:x", "status", "{}");
        assert_eq!(r["rc"], 0);
        assert_eq!(r["resp"]["Status"], "Failure", "{r}");
        assert_eq!(r["resp"]["ErrorDescription"][0], code, "{r}");
    }
    let r = python_calls_plugin(&srv, None, "OpaqueRef:x", "wipe_everything", "{}");
    assert_eq!(
        r["resp"]["ErrorDescription"],
        serde_json::json!(["UNKNOWN_XENAPI_PLUGIN_FUNCTION", "wipe_everything"])
    );
    // A missing argument and an unknown VM are failures with their own codes.
    let session = api(&srv).login().await.unwrap();
    let r = python_calls_plugin(&srv, None, &session, "status", "{}");
    assert_eq!(
        r["resp"]["ErrorDescription"][0], "XENFT_INVALID_ARGUMENT",
        "{r}"
    );
    let r = python_calls_plugin(&srv, None, &session, "status", r#"{"vm": "web1"}"#);
    assert_eq!(r["resp"]["ErrorDescription"][0], "XENFT_NOT_FOUND", "{r}");
    assert!(r["resp"]["ErrorDescription"][1]
        .as_str()
        .unwrap()
        .contains("web01"));
}

#[tokio::test]
async fn host_call_plugin_runs_the_plugin_and_passes_failures_through() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(PLUGIN, dir.path().join("xenft")).unwrap();
    let srv = FakeXapi::start(FakeXapiConfig {
        plugin_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    let (h1, _) = srv.add_host("host1", "10.0.0.1", 16 * GIB);
    srv.add_host("host2", "10.0.0.2", 2 * GIB);
    srv.add_host("host3", "10.0.0.3", 16 * GIB);
    let (vm, _) = srv.add_vm("web01", 4 * GIB, Some(&h1));
    let api = api(&srv);
    let mut args = BTreeMap::new();
    args.insert("vm".to_string(), "web01".to_string());
    args.insert("level".to_string(), "1".to_string());
    args.insert("secondary".to_string(), "host2".to_string());
    let e = api
        .host_call_plugin(&h1, "xenft", "protect", &args)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("XENFT_REFUSED"), "{e}");
    args.insert("secondary".to_string(), "host3".to_string());
    let out = api
        .host_call_plugin(&h1, "xenft", "protect", &args)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["secondary_name"], "host3");
    assert_eq!(srv.map_field(&vm, "other_config")["xenft.level"], "1");
    let list = api
        .host_call_plugin(&h1, "xenft", "list", &BTreeMap::new())
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["name"], "web01");
}
