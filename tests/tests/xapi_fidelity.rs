//! The XenAPI test server answers as xapi does where clients depend on it (issue 14, item 6):
//! dispatch order and errors from the datamodel method list, `system.listMethods` without a
//! session, `SESSION_INVALID` as a XenAPI failure, `HOST_IS_SLAVE`, `event.inject`,
//! `VM.start_on` events, `VDI.pool_migrate`. Each over XML-RPC and JSON-RPC.

use std::io::{Read, Write};
use std::time::Duration;

use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig, DEFAULT_TEMPLATES, SMAPIV1_NFS_FEATURES};
use xenft_xapi::xmlrpc::{self, Value};
use xenft_xapi::{Protocol, XapiError, XenApi};

const GIB: i64 = 1 << 30;
const BOTH: [Protocol; 2] = [Protocol::XmlRpc, Protocol::JsonRpc];

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn client(srv: &FakeXapi, protocol: Protocol) -> XenApi {
    XenApi::new(srv.client_options(protocol)).unwrap()
}

/// One raw HTTP POST; returns (status line, content type, body).
fn post(srv: &FakeXapi, path: &str, ctype: &str, body: &str) -> (String, String, String) {
    let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let ct = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_string();
    (
        head.lines().next().unwrap().to_string(),
        ct,
        body.to_string(),
    )
}

fn api_err(r: Result<Value, XapiError>) -> (String, Vec<String>) {
    match r {
        Err(XapiError::Api { code, params }) => (code, params),
        other => panic!("expected a XenAPI failure, got {other:?}"),
    }
}

fn pool() -> (FakeXapi, String, String) {
    FakeXapi::with_pool()
}

#[test]
fn xapi_list_methods_answers_without_a_session_in_both_encodings() {
    let (srv, _, _) = pool();
    let call = xmlrpc::encode_call("system.listMethods", &[]);
    let (status, ct, body) = post(&srv, "/", "text/xml", &call);
    assert!(status.contains("200"), "{status}");
    assert_eq!(ct, "text/xml");
    let xmlrpc::Response::Success(Value::Array(names)) = xmlrpc::decode_response(&body).unwrap()
    else {
        panic!("xapi answers listMethods with a bare array, outside the envelope: {body}");
    };
    let names: Vec<&str> = names.iter().filter_map(Value::as_str).collect();
    for m in [
        "VM.get_all_records",
        "event.from",
        "event.inject",
        "host.call_plugin",
    ] {
        assert!(names.contains(&m), "{m} missing");
    }
    assert!(!names.iter().any(|n| n.starts_with("system.")));

    let (_, ct, body) = post(
        &srv,
        "/jsonrpc",
        "application/json",
        r#"{"jsonrpc":"2.0","method":"system.listMethods","params":[],"id":0}"#,
    );
    assert_eq!(ct, "application/json");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["result"].as_array().unwrap().len(), names.len());
}

#[test]
fn xapi_logged_out_or_expired_session_is_session_invalid_failure_in_both_encodings() {
    let (srv, _, _) = pool();
    rt().block_on(async {
        for p in BOTH {
            let api = client(&srv, p);
            let s = api.login().await.unwrap();
            api.call_raw("session.logout", vec![Value::str(&s)], Duration::ZERO)
                .await
                .unwrap();
            let (code, params) = api_err(
                api.call_raw("VM.get_all", vec![Value::str(&s)], Duration::ZERO)
                    .await,
            );
            assert_eq!(
                (code.as_str(), params),
                ("SESSION_INVALID", vec![s]),
                "{p:?}"
            );
            let s = api.login().await.unwrap();
            srv.expire_sessions();
            let (code, _) = api_err(
                api.call_raw("VM.get_all", vec![Value::str(&s)], Duration::ZERO)
                    .await,
            );
            assert_eq!(code, "SESSION_INVALID", "{p:?}");
        }
    });
    // Over XML-RPC a failure is an HTTP 200 carrying the Failure envelope.
    let call = xmlrpc::encode_call("VM.get_all", &[Value::str("OpaqueRef:gone")]);
    let (status, _, body) = post(&srv, "/", "text/xml", &call);
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("SESSION_INVALID"), "{body}");
}

#[test]
fn xapi_unknown_methods_and_wrong_counts_answer_before_the_session_check() {
    let (srv, _, _) = pool();
    rt().block_on(async {
        for p in BOTH {
            let api = client(&srv, p);
            let raw = |m: &'static str, params: Vec<Value>| {
                let api = &api;
                async move { api_err(api.call_raw(m, params, Duration::ZERO).await) }
            };
            assert_eq!(
                raw("VM.no_such_call", vec![Value::str("OpaqueRef:x")]).await,
                (
                    "MESSAGE_METHOD_UNKNOWN".into(),
                    vec!["VM.no_such_call".into()]
                )
            );
            // xapi counts without the session: VM.get_record(session, vm) sent with only a
            // (bogus) session is a count mismatch [name, 1, 0], not SESSION_INVALID.
            assert_eq!(
                raw("VM.get_record", vec![Value::str("OpaqueRef:x")]).await,
                (
                    "MESSAGE_PARAMETER_COUNT_MISMATCH".into(),
                    vec!["VM.get_record".into(), "1".into(), "0".into()]
                )
            );
            // A datamodel method the test server does not model says so.
            let s = api.login().await.unwrap();
            assert_eq!(
                raw(
                    "VM.clean_reboot",
                    vec![Value::str(&s), Value::str("OpaqueRef:x")]
                )
                .await,
                ("NOT_IMPLEMENTED".into(), vec!["VM.clean_reboot".into()])
            );
        }
    });
}

#[test]
fn xapi_login_to_a_pool_member_is_host_is_slave_with_the_master_address() {
    let srv = FakeXapi::start(FakeXapiConfig {
        slave_of: Some("10.0.0.1".into()),
        ..Default::default()
    })
    .unwrap();
    rt().block_on(async {
        for p in BOTH {
            let e = client(&srv, p).login().await.unwrap_err();
            match e {
                XapiError::Api { code, params } => {
                    assert_eq!(code, "HOST_IS_SLAVE");
                    assert_eq!(params, vec!["10.0.0.1".to_string()]);
                }
                e => panic!("{p:?}: {e}"),
            }
        }
    });
}

#[test]
fn xapi_event_inject_returns_a_token_just_before_an_event_for_that_object() {
    let (srv, _, vm) = pool();
    let pool_ref = srv.pool_ref();
    rt().block_on(async {
        for p in BOTH {
            let api = client(&srv, p);
            let tok = api
                .call(
                    "event.inject",
                    vec![Value::str("pool"), Value::str(&pool_ref)],
                )
                .await
                .unwrap();
            let tok = tok.as_str().unwrap().to_string();
            assert_eq!(tok.len(), 41, "xapi's %020d,%020d token: {tok}");
            let b = api
                .event_from(&["pool", "vm"], &tok, Duration::from_secs(2))
                .await
                .unwrap();
            let evs: Vec<_> = b
                .events
                .iter()
                .map(|e| (e.class.as_str(), e.obj_ref.as_str()))
                .collect();
            assert_eq!(evs, vec![("pool", pool_ref.as_str())], "{p:?}");
            // The class must be the object's, spelled as xapi's table name.
            let e = api
                .call("event.inject", vec![Value::str("vm"), Value::str(&vm)])
                .await
                .unwrap_err();
            assert!(e.is("HANDLE_INVALID"), "{e}");
        }
    });
}

#[test]
fn xapi_vm_start_on_changes_power_state_and_resident_on_with_an_event() {
    let (srv, _, _) = pool();
    let h2 = srv.record(&srv.pool_ref()).unwrap()["master"]
        .as_str()
        .unwrap()
        .to_string();
    let (db, _) = srv.add_vm("db01", 2 * GIB, None);
    rt().block_on(async {
        let api = client(&srv, Protocol::JsonRpc);
        let first = api.event_from(&["vm"], "", Duration::ZERO).await.unwrap();
        api.vm_start_on(&db, &h2, false).await.unwrap();
        let b = api
            .event_from(&["vm"], &first.token, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(b.events.len(), 1);
        let rec = xenft_xapi::VmRecord::from_value(b.events[0].snapshot.as_ref().unwrap()).unwrap();
        assert_eq!(
            (rec.power_state.as_str(), rec.resident_on.as_str()),
            ("Running", h2.as_str())
        );
        let vms = api.vm_get_all_records().await.unwrap();
        let template = vms
            .iter()
            .find(|(_, v)| v.name_label == DEFAULT_TEMPLATES[0])
            .map(|(r, _)| r.clone())
            .unwrap();
        let e = api.vm_start_on(&template, &h2, false).await.unwrap_err();
        assert!(e.is("VM_IS_TEMPLATE"), "{e}");
    });
}

#[test]
fn xapi_vdi_pool_migrate_copies_the_disk_to_a_new_vdi_repoints_the_vbd_and_checks_as_xapi() {
    let (srv, _, vm) = pool();
    let (lvm, _) = srv.add_sr("local", "lvm", SMAPIV1_NFS_FEATURES);
    let (target, _) = srv.add_sr("target", "nfs", SMAPIV1_NFS_FEATURES);
    let (no_mirror, _) = srv.add_sr("iso", "iso", &["VDI_CREATE"]);
    srv.add_disk_on(&vm, 0, 3 * GIB, &lvm);
    let vbd = srv.record(&vm).unwrap()["VBDs"].as_array().unwrap()[0]
        .as_str()
        .unwrap()
        .to_string();
    rt().block_on(async {
        for p in BOTH {
            let api = client(&srv, p);
            let migrate = |vdi: String, sr: String| {
                let api = &api;
                async move {
                    api.call(
                        "VDI.pool_migrate",
                        vec![
                            Value::str(&vdi),
                            Value::str(&sr),
                            Value::Struct(Default::default()),
                        ],
                    )
                    .await
                }
            };
            let cur = srv.disk_at(&vm, 0).unwrap();
            // xapi_vm_migrate.ml's feature check names the SR and what it lacks.
            let (code, params) = api_err(migrate(cur.clone(), no_mirror.clone()).await);
            assert_eq!(code, "SR_DOES_NOT_SUPPORT_MIGRATION", "{p:?}");
            assert_eq!(
                params,
                vec![no_mirror.clone(), "VDI_SNAPSHOT;VDI_MIRROR_IN".into()]
            );
            let (code, _) = api_err(migrate("OpaqueRef:nope".into(), target.clone()).await);
            assert_eq!(code, "HANDLE_INVALID");
            let first = api
                .event_from(&["vdi", "vbd"], "", Duration::ZERO)
                .await
                .unwrap();
            let dest = if srv.record(&cur).unwrap()["SR"].as_str() == Some(target.as_str()) {
                lvm.clone()
            } else {
                target.clone()
            };
            let new = migrate(cur.clone(), dest.clone()).await.unwrap();
            let new = new.as_str().unwrap().to_string();
            assert_ne!(new, cur, "a new VDI");
            let rec = srv.record(&new).unwrap();
            assert_eq!(rec["SR"].as_str(), Some(dest.as_str()));
            assert_eq!(rec["virtual_size"].as_i64(), Some(3 * GIB));
            assert!(srv.record(&cur).is_none(), "the old VDI is destroyed");
            assert_eq!(
                srv.record(&vbd).unwrap()["VDI"].as_str(),
                Some(new.as_str())
            );
            let b = api
                .event_from(&["vdi", "vbd"], &first.token, Duration::from_secs(2))
                .await
                .unwrap();
            let evs: Vec<_> = b
                .events
                .iter()
                .map(|e| (e.class.as_str(), e.obj_ref.as_str()))
                .collect();
            assert!(evs.contains(&("vdi", new.as_str())), "{evs:?}");
            assert!(evs.contains(&("vbd", vbd.as_str())), "{evs:?}");
            assert!(evs.contains(&("vdi", cur.as_str())), "the del: {evs:?}");
        }
        // A VDI no VM uses, and a paused VM's disk.
        let api = client(&srv, Protocol::XmlRpc);
        let (other, _) = srv.add_vm("other", GIB, None);
        let loose = srv.add_disk_on(&other, 0, GIB, &lvm);
        let rec = srv.record(&other).unwrap();
        srv.destroy(rec["VBDs"].as_array().unwrap()[0].as_str().unwrap());
        let args = |v: &str| {
            vec![
                Value::str(v),
                Value::str(&target),
                Value::Struct(Default::default()),
            ]
        };
        let (code, params) = api_err(api.call("VDI.pool_migrate", args(&loose)).await);
        assert_eq!(
            (code.as_str(), params),
            ("VDI_NEEDS_VM_FOR_MIGRATE", vec![loose.clone()])
        );
        srv.set_field(&vm, "power_state", "Paused");
        let cur = srv.disk_at(&vm, 0).unwrap();
        let (code, params) = api_err(api.call("VDI.pool_migrate", args(&cur)).await);
        assert_eq!(code, "VM_BAD_POWER_STATE");
        assert_eq!(params[2], "paused");
    });
}

#[test]
fn xapi_vdi_copy_and_vbd_create_destroy_check_as_xapi() {
    let (srv, _, vm) = pool();
    let nfs = srv.default_sr();
    let (iso, _) = srv.add_sr("iso", "iso", &[]);
    let vdi = srv.add_disk_on(&vm, 0, GIB, &nfs);
    let vbd = srv.record(&vm).unwrap()["VBDs"].as_array().unwrap()[0]
        .as_str()
        .unwrap()
        .to_string();
    rt().block_on(async {
        let api = client(&srv, Protocol::JsonRpc);
        let null = Value::str("OpaqueRef:NULL");
        let copy = |sr: &str| vec![Value::str(&vdi), Value::str(sr), null.clone(), null.clone()];
        let (code, params) = api_err(api.call("VDI.copy", copy(&iso)).await);
        assert_eq!(
            (code.as_str(), params),
            ("SR_OPERATION_NOT_SUPPORTED", vec![iso.clone()])
        );
        let new = api.call("VDI.copy", copy(&nfs)).await.unwrap();
        let new = new.as_str().unwrap().to_string();
        assert_eq!(
            srv.record(&new).unwrap()["virtual_size"].as_i64(),
            Some(GIB)
        );
        assert!(srv.record(&vdi).is_some(), "the source stays");
        // The VM runs: its VBD is attached.
        let (code, _) = api_err(api.call("VBD.destroy", vec![Value::str(&vbd)]).await);
        assert_eq!(code, "OPERATION_NOT_ALLOWED");
        let rec = |vdi: &str, dev: &str| {
            let mut m = std::collections::BTreeMap::new();
            for (k, v) in [
                ("VM", Value::str(&vm)),
                ("VDI", Value::str(vdi)),
                ("userdevice", Value::str(dev)),
                ("bootable", Value::Bool(false)),
                ("mode", Value::str("RW")),
                ("type", Value::str("Disk")),
                ("empty", Value::Bool(false)),
            ] {
                m.insert(k.to_string(), v);
            }
            vec![Value::Struct(m)]
        };
        let (code, params) = api_err(api.call("VBD.create", rec(&new, "0")).await);
        assert_eq!(
            (code.as_str(), params),
            ("DEVICE_ALREADY_EXISTS", vec!["0".into()])
        );
        let b = api.call("VBD.create", rec(&new, "1")).await.unwrap();
        assert_eq!(srv.disk_at(&vm, 1).as_deref(), Some(new.as_str()));
        srv.set_field(&vm, "power_state", "Halted");
        api.call("VBD.destroy", vec![b]).await.unwrap();
        assert_eq!(srv.disk_at(&vm, 1), None);
    });
}
