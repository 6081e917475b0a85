//! The packages' contents and their post-install step, without building them (that takes a
//! release build: `scripts/package`). What the packages hold is read from the workspace's
//! metadata (`cargo metadata`: `[package.metadata.deb]` and `[package.metadata.generate-rpm]`
//! of xenft-agent); the post-install step (packaging/scripts/postinst.sh) is run into a
//! scratch root, as on an xapi host and on an xl host, twice.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn metadata() -> serde_json::Value {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(repo().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn both_packages_hold_every_product_binary_and_the_same_files() {
    let m = metadata();
    let packages = m["packages"].as_array().unwrap();
    let agent = packages
        .iter()
        .find(|p| p["name"] == "xenft-agent")
        .unwrap();
    let agent_dir = Path::new(agent["manifest_path"].as_str().unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    // The workspace's binaries, but the lab's and the tests' own.
    let bins: BTreeSet<String> = packages
        .iter()
        .filter(|p| !["xenft-lab", "xenft-tests"].contains(&p["name"].as_str().unwrap()))
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    let deb: Vec<(String, String)> = agent["metadata"]["deb"]["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a[0].as_str().unwrap().to_string(),
                a[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let rpm: Vec<(String, String)> = agent["metadata"]["generate-rpm"]["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["source"].as_str().unwrap().to_string(),
                a["dest"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for b in &bins {
        let src = format!("target/release/{b}");
        assert!(deb.iter().any(|(s, _)| *s == src), "the .deb lacks {b}");
        assert!(rpm.iter().any(|(s, _)| *s == src), "the .rpm lacks {b}");
    }
    // Same sources, same destinations (the .deb names a directory where the .rpm names the
    // file).
    assert_eq!(deb.len(), rpm.len());
    for ((ds, dd), (rs, rd)) in deb.iter().zip(&rpm) {
        assert_eq!(ds, rs);
        let dd = format!("/{dd}");
        assert!(
            *rd == dd || rd.starts_with(&dd) || dd.ends_with('/') && rd.starts_with(&dd),
            "{ds}: .deb {dd} vs .rpm {rd}"
        );
    }
    // Every file that is not a build output or generated exists in the repository.
    for (src, _) in &deb {
        if src.starts_with("target/") || src.contains("/generated/") {
            continue;
        }
        assert!(agent_dir.join(src).exists(), "{src} is missing");
    }
    // The xapi plugin is where xapi looks for plugins, named as the CLI calls it.
    assert!(rpm
        .iter()
        .any(|(s, d)| s.ends_with("xenft-xapi-plugin") && d == "/etc/xapi.d/plugins/xenft"));
}

fn postinst(root: &Path) -> String {
    let out = Command::new("sh")
        .arg(repo().join("packaging/scripts/postinst.sh"))
        .env("XENFT_ROOT", root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_post_install_step_creates_what_the_agent_needs_and_never_overwrites() {
    // An xl host: directories, no configuration guessed.
    let xl = tempfile::tempdir().unwrap();
    let said = postinst(xl.path());
    for d in [
        "etc/xenft",
        "var/lib/xenft",
        "var/lib/xenft/disks",
        "run/xenft",
    ] {
        assert_eq!(mode(&xl.path().join(d)), 0o700, "{d}");
    }
    assert!(!xl.path().join("etc/xenft/agent.json").exists());
    assert!(said.contains("no xapi on this host"), "{said}");

    // An xapi host (xapi's local socket exists): the agent's config and dom0's credentials.
    let x = tempfile::tempdir().unwrap();
    let share = x.path().join("usr/share/xenft");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::copy(
        repo().join("packaging/etc/agent-xapi.json"),
        share.join("agent-xapi.json"),
    )
    .unwrap();
    std::fs::create_dir_all(x.path().join("var/lib/xcp")).unwrap();
    let _xapi = std::os::unix::net::UnixListener::bind(x.path().join("var/lib/xcp/xapi")).unwrap();
    let ss = x.path().join("usr/libexec/xapi-storage-script");
    std::fs::create_dir_all(ss.join("volume")).unwrap();
    postinst(x.path());
    // The xenft SR's scripts, where xapi-storage-script looks, each named after its method.
    for m in [
        "volume/org.xen.xapi.storage.xenft/SR.attach",
        "volume/org.xen.xapi.storage.xenft/Volume.create",
        "datapath/xenft/Datapath.activate",
        "datapath/xenft/Plugin.Query",
    ] {
        let target = std::fs::read_link(ss.join(m)).unwrap_or_else(|e| panic!("{m}: {e}"));
        assert_eq!(target, Path::new("/usr/libexec/xenft/xenft-sr"), "{m}");
    }
    assert!(
        !ss.join("volume/org.xen.xapi.storage.xenft/Volume.snapshot")
            .exists(),
        "snapshots are not offered"
    );
    let creds = x.path().join("etc/xenft/xapi-credentials");
    assert_eq!(std::fs::read_to_string(&creds).unwrap(), "root\n\n");
    assert_eq!(mode(&creds), 0o600);
    let cfg = x.path().join("etc/xenft/agent.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(!text.contains("@HOSTNAME@"), "{text}");
    assert_eq!(mode(&cfg), 0o600);
    // The agent accepts it as it stands (host-local facts only).
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["xapi"]["url"], "unix:/var/lib/xcp/xapi");
    assert!(v.get("peers").is_none() && v.get("vms").is_none());

    // The administrator edits both; an upgrade runs the step again: nothing is overwritten.
    std::fs::write(&cfg, "{\"edited\": true}").unwrap();
    std::fs::write(&creds, "admin\nsecret\n").unwrap();
    postinst(x.path());
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "{\"edited\": true}");
    assert_eq!(std::fs::read_to_string(&creds).unwrap(), "admin\nsecret\n");
}
