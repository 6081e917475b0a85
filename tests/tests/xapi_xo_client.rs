//! Xen Orchestra's XenAPI client (npm package `xen-api`) against the XenAPI test server: it
//! connects, fetches every object, follows `event.from` and sees a change made on the server
//! side, over JSON-RPC and XML-RPC; and it finds the master through `HOST_IS_SLAVE`.
//!
//! Needs Node.js and npm (scripts/deps/xapi.apt lists them for scripts/test): the test fails,
//! naming what is missing, when they are not there. The package is installed once into a cache
//! under the target directory. Every wait is bounded.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use xenft_tests::xapi_server::{FakeXapi, FakeXapiConfig};

/// The Xen Orchestra client version these tests are pinned to.
const XEN_API_VERSION: &str = "4.7.7";
const GIB: i64 = 1 << 30;
/// Longest wait for one step of the Node script.
const STEP: Duration = Duration::from_secs(60);

fn run_with_deadline(mut cmd: Command, limit: Duration, what: &str) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: still running after {limit:?}, killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

fn require(tool: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "`{tool}` not found: the Xen Orchestra client tests need Node.js and npm \
         (Debian packages nodejs and npm; scripts/test installs them from scripts/deps/xapi.apt)"
    );
}

/// `<target>/tmp/xo-xen-api-VERSION`, with the package installed (once; concurrent test
/// processes install into their own directory and the first rename wins).
fn xen_api_module() -> PathBuf {
    require("node");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("xo-xen-api-{XEN_API_VERSION}"));
    let module = dir.join("node_modules/xen-api/index.mjs");
    if module.is_file() {
        return module;
    }
    require("npm");
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let mut cmd = Command::new("npm");
    cmd.args(["install", "--no-audit", "--no-fund", "--prefix"])
        .arg(&tmp)
        .arg(format!("xen-api@{XEN_API_VERSION}"))
        .env("npm_config_update_notifier", "false");
    let out = run_with_deadline(cmd, Duration::from_secs(300), "npm install xen-api");
    assert!(
        out.status.success(),
        "npm install xen-api@{XEN_API_VERSION} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(
        module.is_file(),
        "{} missing after npm install",
        module.display()
    );
    module
}

/// Connects, waits for the objects, reports them (`ready`), then waits for web01's
/// `other_config["xo-test"]` to become "changed" through the event loop (`update`).
const SCRIPT: &str = r#"
const [modPath, url, user, password, transport] = process.argv.slice(2);
const out = o => process.stdout.write(JSON.stringify(o) + "\n");
const timer = setTimeout(() => { out({ phase: "timeout" }); process.exit(3); }, 90000);
const { createClient } = await import(new URL("file://" + modPath).href);
const xapi = createClient({ url, allowUnauthorized: true, auth: { user, password }, transport });
await xapi.connect();
await xapi.objectsFetched;
const vms = Object.values(xapi.objects.all).filter(o => o.$type === "VM");
const web = vms.find(v => v.name_label === "web01");
out({
  phase: "ready",
  url: xapi._url.hostname + ":" + xapi._url.port,
  pool_master: xapi.pool.master,
  hosts: Object.values(xapi.objects.all).filter(o => o.$type === "host").map(h => h.name_label).sort(),
  guests: vms.filter(v => !v.is_control_domain && !v.is_a_template).map(v => v.name_label),
  control_domains: vms.filter(v => v.is_control_domain).map(v => v.$resident_on.name_label).sort(),
  templates: vms.filter(v => v.is_a_template).length,
});
const seen = await new Promise(resolve => {
  const check = () => {
    const o = xapi.getObjectByRef(web.$ref, undefined);
    if (o !== undefined && o.other_config["xo-test"] === "changed") resolve(o);
  };
  xapi.objects.on("update", check);
  check();
});
out({ phase: "update", ref: seen.$ref, other_config: seen.other_config });
clearTimeout(timer);
await xapi.disconnect();
process.exit(0);
"#;

/// The running Node script and its output lines.
struct Script {
    child: Child,
    lines: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Script {
    fn start(url: &str, srv: &FakeXapi, transport: &str) -> Script {
        let module = xen_api_module();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xo-client.mjs");
        std::fs::write(&path, SCRIPT).unwrap();
        let mut child = Command::new("node")
            .arg(&path)
            .arg(&module)
            .args([url, srv.user(), srv.password(), transport])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Script {
            child,
            lines,
            _dir: dir,
        }
    }

    /// The next JSON line whose `phase` is `phase`, within [`STEP`].
    fn expect(&mut self, phase: &str) -> serde_json::Value {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(l) => l,
                Err(e) => panic!("Xen Orchestra's client: no {phase:?} line ({e:?})"),
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            assert_ne!(v["phase"], "timeout", "the Node script timed out");
            if v["phase"] == phase {
                return v;
            }
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pool(cfg: FakeXapiConfig) -> (FakeXapi, String) {
    let srv = FakeXapi::start(cfg).unwrap();
    let (h1, _) = srv.add_host("host1", "10.0.0.1", 16 * GIB);
    srv.add_host("host2", "10.0.0.2", 16 * GIB);
    let (vm, _) = srv.add_vm("web01", 4 * GIB, Some(&h1));
    (srv, vm)
}

fn connects_fetches_and_follows_events(transport: &str) {
    let (srv, vm) = pool(FakeXapiConfig::default());
    let mut script = Script::start(&srv.url(), &srv, transport);
    let ready = script.expect("ready");
    assert_eq!(ready["hosts"], serde_json::json!(["host1", "host2"]));
    assert_eq!(ready["guests"], serde_json::json!(["web01"]));
    assert_eq!(
        ready["control_domains"],
        serde_json::json!(["host1", "host2"]),
        "one dom0 per host, resident on it"
    );
    assert_eq!(ready["templates"], 2);
    srv.set_map_key(&vm, "other_config", "xo-test", Some("changed"));
    let update = script.expect("update");
    assert_eq!(update["ref"], vm.as_str());
    assert_eq!(update["other_config"]["xo-test"], "changed");
    assert!(
        srv.calls("event.inject") >= 1 && srv.calls("event.from") >= 1,
        "XO's event loop: event.inject for a token, then event.from"
    );
    assert!(srv.calls("system.listMethods") >= 1);
}

#[test]
fn xo_client_connects_fetches_objects_and_follows_events_over_json_rpc() {
    connects_fetches_and_follows_events("json-rpc");
}

#[test]
fn xo_client_connects_fetches_objects_and_follows_events_over_xml_rpc() {
    connects_fetches_and_follows_events("xml-rpc");
}

#[test]
fn xo_client_follows_host_is_slave_to_the_master() {
    // XO keeps the port and swaps the host name for HOST_IS_SLAVE's address, so the pool
    // member listens on another loopback address with the master's port.
    let (master, vm) = pool(FakeXapiConfig::default());
    let port = master.addr().port();
    let member = FakeXapi::start(FakeXapiConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 2], port)),
        slave_of: Some("127.0.0.1".into()),
        ..Default::default()
    })
    .unwrap();
    let mut script = Script::start(&format!("http://127.0.0.2:{port}"), &master, "json-rpc");
    let ready = script.expect("ready");
    assert_eq!(ready["url"], format!("127.0.0.1:{port}"));
    assert_eq!(member.calls("session.login_with_password"), 1);
    assert_eq!(master.calls("session.login_with_password"), 1);
    master.set_map_key(&vm, "other_config", "xo-test", Some("changed"));
    script.expect("update");
}
