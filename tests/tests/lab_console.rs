//! The availability console of the production agents, in a real browser (root, Debian
//! `chromium`). The local pool's agents serve it (their `console` section); headless Chromium
//! runs in the quorum namespace, which routes the management network, as an administrator's
//! station would, and is driven over the DevTools protocol:
//! - host1's console answers 401 with the login page; a wrong xapi password is refused with
//!   the reason; the pool's xapi credentials (checked by the pool's xapi) log in;
//! - the page shows vm1 protected at level 3 on host1 with its RPO, both hosts up, the A-links
//!   as each agent hears them and the agents' decisions with their reasons;
//! - Unprotect and Protect through the confirmation dialog (dismissed: nothing happens;
//!   accepted: the registry is changed through XenAPI and the agents follow);
//! - a host drill kills host1 while the page, opened on host1's console, stays open: it goes
//!   on live from host2's console and shows host1 down, vm1 failed over to host2 and the
//!   agent's take-over decision with its reason; after the repair vm1 is protected again.
//!
//! Screenshots go to tests/artifacts/.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use xenft_tests::lab::{text, Lab};
use xenft_tests::netns::require_root;

/// Where the browser runs: the quorum namespace routes the management network.
const BROWSER_NS: &str = "xftlab-quorum";
const HOST1: &str = "http://10.202.1.1:8080/";
const HOST2: &str = "http://10.202.2.2:8080/";

const CHROMIUM_FLAGS: &str = "--headless --no-sandbox --disable-gpu \
    --disable-background-networking --disable-component-update --disable-sync \
    --disable-default-apps --disable-extensions --no-first-run --no-default-browser-check \
    --disable-dev-shm-usage --window-size=1400,900";

/// Headless Chromium in the client namespace, driven over the DevTools protocol on a pipe
/// (`--remote-debugging-pipe`: commands on fd 3, answers and events on fd 4, NUL-separated
/// JSON).
struct Devtools {
    child: Child,
    to: Option<ChildStdin>,
    from: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
}

impl Devtools {
    fn open(lab: &Lab, url: &str) -> Self {
        let profile = lab.dir.path().join("devtools-profile");
        let script = format!(
            "exec 3<&0 4>&1 >/dev/null; exec timeout 600 ip netns exec {BROWSER_NS} chromium \
             {CHROMIUM_FLAGS} --remote-debugging-pipe --user-data-dir=\"$1\" \"$2\""
        );
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(script)
            .arg("bash")
            .arg(&profile)
            .arg(url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let out = child.stdout.take().expect("chromium fd 4");
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            while r.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                buf.clear();
            }
        });
        let to = child.stdin.take();
        let mut d = Self {
            child,
            to,
            from,
            next_id: 1,
            session: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let target = loop {
            let t = d.call(false, "Target.getTargets", json!({}));
            let page = t["targetInfos"]
                .as_array()
                .and_then(|a| a.iter().find(|i| i["type"] == "page"))
                .and_then(|i| i["targetId"].as_str())
                .map(str::to_owned);
            if let Some(p) = page {
                break p;
            }
            assert!(Instant::now() < deadline, "chromium opened no page");
            std::thread::sleep(Duration::from_millis(200));
        };
        let a = d.call(
            false,
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        d.session = a["sessionId"].as_str().expect("session id").to_owned();
        d.call(true, "Page.enable", json!({}));
        d
    }

    fn send(&mut self, in_page: bool, method: &str, params: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method});
        msg["params"] = params;
        if in_page {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        let to = self.to.as_mut().expect("chromium pipe");
        to.write_all(&bytes).expect("write to chromium");
        to.flush().expect("flush to chromium");
        id
    }

    /// The answer to command `id`, or its error.
    fn wait(&mut self, id: u64) -> Result<Value, Value> {
        loop {
            let m = self
                .from
                .recv_timeout(Duration::from_secs(20))
                .map_err(|e| json!(format!("no answer from chromium: {e}")))?;
            if m["id"] == json!(id) {
                return match m.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(m["result"].clone()),
                };
            }
        }
    }

    fn call(&mut self, in_page: bool, method: &str, params: Value) -> Value {
        let id = self.send(in_page, method, params);
        self.wait(id)
            .unwrap_or_else(|e| panic!("DevTools error on {method}: {e}"))
    }

    /// Evaluates `expr` in the page; its value (null while the page navigates).
    fn eval(&mut self, expr: &str) -> Value {
        let id = self.send(
            true,
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        self.wait(id)
            .map(|r| r["result"]["value"].clone())
            .unwrap_or(Value::Null)
    }

    /// Waits until `expr` evaluates to `want`; panics with `what` and the last value.
    fn wait_for(&mut self, expr: &str, want: &Value, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expr);
            if v == *want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {expr} is {v}, not {want}, after {timeout:?}\npage: {}",
                self.eval("document.body ? document.body.innerText : ''")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A cell's text, `selector` inside the row of VM `vm` or host `host`.
    fn text(&mut self, selector: &str) -> String {
        let q = serde_json::to_string(selector).expect("selector");
        self.eval(&format!(
            "(document.querySelector({q}) || {{}}).textContent || ''"
        ))
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// The page as a PNG in `to`.
    fn screenshot(&mut self, to: &Path) {
        let r = self.call(true, "Page.captureScreenshot", json!({"format": "png"}));
        let png = base64(r["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(to, png).expect("write the screenshot");
    }

    /// Clicks the element matching `selector` and answers the confirmation dialog it opens
    /// (`accept` or dismiss); returns the dialog's question.
    fn click_and_confirm(&mut self, selector: &str, accept: bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        let q = serde_json::to_string(selector).expect("selector");
        while self.eval(&format!("!!document.querySelector({q})")) != json!(true) {
            assert!(Instant::now() < deadline, "no {selector} on the page");
            std::thread::sleep(Duration::from_millis(200));
        }
        let id = self.send(
            true,
            "Runtime.evaluate",
            json!({"expression": format!("document.querySelector({q}).click()")}),
        );
        let mut question = None;
        loop {
            let m = self
                .from
                .recv_timeout(Duration::from_secs(20))
                .expect("no answer from chromium");
            if m["method"] == "Page.javascriptDialogOpening" {
                question = m["params"]["message"].as_str().map(str::to_owned);
                self.send(
                    true,
                    "Page.handleJavaScriptDialog",
                    json!({ "accept": accept }),
                );
            } else if m["id"] == json!(id) {
                break;
            }
        }
        question.unwrap_or_else(|| panic!("clicking {selector} opened no confirmation"))
    }

    /// Waits until the vm1 state cell reads `want`.
    fn wait_state(&mut self, want: &str, timeout: Duration) {
        self.wait_for(
            "(document.querySelector('tr[data-vm=\"vm1\"] .vm-state') || {}).textContent",
            &json!(want),
            timeout,
            "vm1's state",
        );
    }
}

impl Drop for Devtools {
    fn drop(&mut self) {
        // Closing the pipe makes Chromium exit; `timeout` bounds it anyway.
        drop(self.to.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (a DevTools screenshot) decoded.
fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).unwrap_or(0));
        }
    }
    out
}

/// The lab's `status` output.
fn status(lab: &Lab) -> String {
    String::from_utf8_lossy(&lab.run(&["status"]).stdout).into_owned()
}

/// Fills the xapi login form and submits it.
fn xapi_login(page: &mut Devtools, user: &str, password: &str) {
    let (u, p) = (
        serde_json::to_string(user).expect("user"),
        serde_json::to_string(password).expect("password"),
    );
    page.wait_for(
        "!!document.querySelector('#xapi-login')",
        &json!(true),
        Duration::from_secs(15),
        "the login form",
    );
    page.eval(&format!(
        "const f = document.querySelector('#xapi-login'); f.user.value = {u}; \
         f.password.value = {p}; f.submit(); true"
    ));
}

#[test]
fn console_logs_in_through_xapi_and_stays_live_while_the_host_serving_it_dies() {
    if !require_root("console_logs_in_through_xapi_and_stays_live_while_the_host_serving_it_dies") {
        return;
    }
    // Root asked for the console test: without a browser it cannot run, which is a failure.
    assert!(
        Command::new("chromium").arg("--version").output().is_ok(),
        "the console test needs the Debian package chromium, which is not installed \
         (scripts/test installs it)"
    );
    let lab = Lab::new();
    let up = lab.run(&["up"]);
    assert!(up.status.success(), "lab up: {}", text(&up));
    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");

    let mut page = Devtools::open(&lab, HOST1);
    // Not logged in: the login page; a wrong password is refused with the reason.
    page.wait_for(
        "document.title",
        &json!("xenft console — log in"),
        Duration::from_secs(15),
        "the login page",
    );
    xapi_login(&mut page, "root", "not-the-password");
    page.wait_for(
        "(document.querySelector('#message') || {}).textContent",
        &json!("login refused: xapi refused the user or password"),
        Duration::from_secs(15),
        "a wrong password",
    );
    assert!(page.eval("document.querySelector('#vms')").is_null());
    // The pool's xapi credentials: the console.
    xapi_login(&mut page, "root", "xenroot");
    page.wait_state("protected", Duration::from_secs(20));
    assert_eq!(page.text("#served"), "host1");
    assert_eq!(page.text("tr[data-vm=\"vm1\"] .vm-host"), "host1");
    assert_eq!(page.text("tr[data-vm=\"vm1\"] td:nth-child(2)"), "3");
    assert_eq!(
        page.text("tr[data-vm=\"vm1\"] .vm-rpo"),
        "0 B: mirrored synchronously"
    );
    for h in ["host1", "host2"] {
        assert_eq!(
            page.text(&format!("tr[data-host=\"{h}\"] .host-state")),
            "up"
        );
    }
    let alinks: String = page.text("#alinks tbody").split_whitespace().collect();
    assert!(
        alinks.contains("host1host2alink0up") && alinks.contains("host2host1alink1up"),
        "{alinks}"
    );
    let events = page.text("#events tbody");
    assert!(events.contains("protection: protected (vm1)"), "{events}");
    assert!(events.contains("both copies identical"), "{events}");
    page.screenshot(&artifacts.join("console-protected.png"));

    // Protect / unprotect from the page, through the confirmation dialog.
    let q = page.click_and_confirm("button[data-action=unprotect]", false);
    assert!(q.contains("Unprotect vm1"), "{q}");
    std::thread::sleep(Duration::from_secs(2));
    page.wait_state("protected", Duration::from_secs(1));
    page.click_and_confirm("button[data-action=unprotect]", true);
    page.wait_state("unprotected", Duration::from_secs(20));
    let st = status(&lab);
    assert!(st.contains("host1: Primary agent=- serving=true"), "{st}");
    assert!(st.contains("host2: Standby"), "{st}");
    page.screenshot(&artifacts.join("console-unprotected.png"));
    let q = page.click_and_confirm("button[data-action=protect]", true);
    assert!(
        q.contains("Protect vm1 at level 3 with its copy on host2"),
        "{q}"
    );
    page.wait_state("protected", Duration::from_secs(90));
    let st = status(&lab);
    assert!(
        st.contains("host1: Primary agent=protected serving=true"),
        "{st}"
    );
    assert!(st.contains("host2: Secondary agent=protected"), "{st}");

    // The drill keeps host1 down for 20 s before repairing it. The page stays open on host1's
    // console: it must go on, live, from host2's.
    let drill = lab.spawn(&["drill", "fault=host", "--hold-ms", "20000"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status(&lab).contains("host1: DOWN") {
        assert!(Instant::now() < deadline, "host1 never went down");
        std::thread::sleep(Duration::from_millis(200));
    }
    page.wait_for(
        "document.querySelector('#conn').textContent",
        &json!(format!("live from {HOST2}")),
        Duration::from_secs(10),
        "the page failing over to host2's console",
    );
    page.wait_state("running unprotected (failed over)", Duration::from_secs(15));
    assert_eq!(page.text("tr[data-vm=\"vm1\"] .vm-host"), "host2");
    assert_eq!(page.text("tr[data-host=\"host1\"] .host-state"), "DOWN");
    assert_eq!(page.text("#served"), "host2");
    let events = page.text("#events tbody");
    assert!(
        events.contains("peer_silent: fail_over (vm1)"),
        "the agent's take-over decision is missing: {events}"
    );
    assert!(
        events.contains("silent"),
        "the take-over's reason is missing: {events}"
    );
    page.screenshot(&artifacts.join("console-during-host-drill.png"));

    let drill = drill.wait_with_output().expect("drill");
    assert!(drill.status.success(), "host drill: {}", text(&drill));
    page.wait_state("protected", Duration::from_secs(60));
    assert_eq!(page.text("tr[data-vm=\"vm1\"] .vm-host"), "host2");
    for h in ["host1", "host2"] {
        assert_eq!(
            page.text(&format!("tr[data-host=\"{h}\"] .host-state")),
            "up"
        );
    }
    page.screenshot(&artifacts.join("console-after-host-drill.png"));
}
