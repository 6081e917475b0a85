//! Every input may be hostile: malformed arguments, path tricks in ids and URIs, a damaged
//! state file, an unknown method. Each gets the error object xapi parses, exit 1 (a panic
//! would exit 101), and nothing outside the SR's directory is touched. Needs no root.

mod common;

use std::path::Path;

use common::{install_plugins, run_raw};
use serde_json::json;

struct Host {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    prefix: Vec<String>,
    vol: std::path::PathBuf,
    dp: std::path::PathBuf,
}

fn host() -> Host {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let cfg = root.join("sr.json");
    std::fs::write(
        &cfg,
        json!({
            "host": "h1",
            "state_dir": root.join("state"),
            "run_dir": root.join("run"),
            "blkback": "/nonexistent/xenft-blkback",
        })
        .to_string(),
    )
    .unwrap();
    let (vol, dp) = install_plugins(&root.join("plugins"));
    Host {
        prefix: vec!["env".into(), format!("XENFT_SR_CONFIG={}", cfg.display())],
        _dir: dir,
        root,
        vol,
        dp,
    }
}

impl Host {
    fn call(&self, dir: &Path, method: &str, stdin: &[u8]) -> common::Outcome {
        run_raw(&self.prefix, &dir.join(method), stdin)
    }
}

fn config() -> serde_json::Value {
    json!({"hosts": "h1,h2", "alink": "10.0.0.1:7000=10.0.0.2:7000", "secret-file": "/etc/xenft/secret"})
}

#[test]
fn malformed_arguments_get_the_error_object_xapi_parses() {
    let h = host();
    let cases: &[(&str, &[u8], &str)] = &[
        ("SR.stat", b"not json", "XENFT_SR_BAD_ARGUMENTS"),
        ("SR.stat", b"[1,2]", "XENFT_SR_BAD_ARGUMENTS"),
        ("SR.stat", br#"{"dbg":"x"}"#, "XENFT_SR_BAD_ARGUMENTS"),
        ("SR.stat", br#"{"dbg":"x","sr":7}"#, "XENFT_SR_BAD_ARGUMENTS"),
        ("SR.stat", br#"{"dbg":"x","sr":"../../etc"}"#, "XENFT_SR_BAD_ARGUMENTS"),
        ("SR.stat", br#"{"dbg":"x","sr":"no-such-sr"}"#, "Sr_not_attached"),
        ("SR.create", br#"{"dbg":"x","uuid":"u1","name":"n","description":"d","configuration":{"hosts":"h1"}}"#, "XENFT_SR_BAD_ARGUMENTS"),
        ("SR.create", br#"{"dbg":"x","uuid":"u1","name":"n","description":"d","configuration":{"hosts":"h1,h2","alink":"10.0.0.1:65500=10.0.0.2:7000","secret-file":"/s"}}"#, "XENFT_SR_BAD_ARGUMENTS"),
        ("SR.create", br#"{"dbg":"x","uuid":"u1","name":"n","description":"d","configuration":{"hosts":"h1,h2 --evil","alink":"10.0.0.1:7000=10.0.0.2:7000","secret-file":"/s"}}"#, "XENFT_SR_BAD_ARGUMENTS"),
        ("SR.create", br#"{"dbg":"x","uuid":"u1","name":"n","description":"d","configuration":{"hosts":"h3,h2","alink":"10.0.0.1:7000=10.0.0.2:7000","secret-file":"/s"}}"#, "XENFT_SR_FAILED"),
        ("SR.attach", br#"{"dbg":"x","configuration":{"hosts":"h1,h2","alink":"10.0.0.1:7000=10.0.0.2:7000","secret-file":"/s"}}"#, "XENFT_SR_BAD_ARGUMENTS"),
        ("Plugin.nosuch", br#"{"dbg":"x"}"#, "Unimplemented"),
    ];
    for (method, stdin, want) in cases {
        let dir = if method.starts_with("Plugin.nosuch") {
            // Not installed: run the binary under that name.
            let p = h.root.join("plugins/Plugin.nosuch");
            std::os::unix::fs::symlink(common::BIN, &p).unwrap();
            p
        } else {
            h.vol.join(method)
        };
        let (code, params) = run_raw(&h.prefix, &dir, stdin).error(method);
        assert_eq!(
            &code,
            want,
            "{method} {}: {params:?}",
            String::from_utf8_lossy(stdin)
        );
        assert!(
            !params.is_empty() && !params[0].is_empty(),
            "a reason is given"
        );
    }
    assert!(!h.root.join("etc").exists());
}

#[test]
fn volumes_and_uris_are_checked_and_snapshots_refused() {
    let h = host();
    let cfg = h
        .call(&h.vol, "SR.create", json!({"dbg": "t", "uuid": "sr-1", "configuration": config(), "name": "n", "description": "d"}).to_string().as_bytes())
        .reply("SR.create");
    assert_eq!(cfg["uuid"], "sr-1");
    let sr = h
        .call(
            &h.vol,
            "SR.attach",
            json!({"dbg": "t", "configuration": cfg})
                .to_string()
                .as_bytes(),
        )
        .reply("SR.attach");
    assert_eq!(sr, "sr-1");
    let v = h
        .call(&h.vol, "Volume.create", json!({"dbg": "t", "sr": "sr-1", "name": "d0", "description": "", "size": 1_000_000, "sharable": false}).to_string().as_bytes())
        .reply("Volume.create");
    assert_eq!(v["virtual_size"], 1_003_520, "rounded up to 4 KiB");
    let key = v["key"].as_str().unwrap().to_string();
    assert!(h.root.join(format!("state/sr-1/{key}.img")).exists());
    for m in ["Volume.snapshot", "Volume.clone"] {
        let p = h.root.join(format!("plugins/{m}"));
        std::os::unix::fs::symlink(common::BIN, &p).unwrap();
        let (code, params) = run_raw(
            &h.prefix,
            &p,
            json!({"dbg": "t", "sr": "sr-1", "key": key})
                .to_string()
                .as_bytes(),
        )
        .error(m);
        assert_eq!(code, "Unimplemented");
        assert!(params[0].contains("snapshots or clones"), "{params:?}");
    }
    let bad = [
        (
            json!({"dbg": "t", "sr": "sr-1", "key": "../sr.json"}),
            "XENFT_SR_BAD_ARGUMENTS",
        ),
        (
            json!({"dbg": "t", "sr": "sr-1", "key": "nope"}),
            "Volume_does_not_exist",
        ),
    ];
    for (args, want) in bad {
        let (code, _) = h
            .call(&h.vol, "Volume.stat", args.to_string().as_bytes())
            .error("Volume.stat");
        assert_eq!(code, want);
    }
    for uri in [
        "nbd://x",
        "xenft://sr-1",
        "xenft://sr-1/../../x",
        "xenft://sr-1/nope",
    ] {
        let (code, _) = h
            .call(
                &h.dp,
                "Datapath.attach",
                json!({"dbg": "t", "uri": uri, "domain": "1"})
                    .to_string()
                    .as_bytes(),
            )
            .error(uri);
        assert!(
            code == "XENFT_SR_BAD_ARGUMENTS" || code == "Volume_does_not_exist",
            "{uri}: {code}"
        );
    }
    let resize = json!({"dbg": "t", "sr": "sr-1", "key": key, "new_size": 4096});
    let (code, _) = h
        .call(&h.vol, "Volume.resize", resize.to_string().as_bytes())
        .error("shrink");
    assert_eq!(code, "Unimplemented");
    // A damaged state file is reported, not trusted.
    std::fs::write(
        h.root.join("state/sr-1/sr.json"),
        b"{\"uuid\": \"sr-1\", \"volumes\": 3",
    )
    .unwrap();
    let (code, params) = h
        .call(&h.vol, "SR.ls", br#"{"dbg":"t","sr":"sr-1"}"#)
        .error("SR.ls");
    assert_eq!(code, "XENFT_SR_FAILED");
    assert!(params[0].contains("damaged"), "{params:?}");
}
