//! The availability console in a real browser (root, Debian `chromium`): headless Chromium in
//! the client namespace loads host1's console and finds vm1 protected; a host drill kills
//! host1; while host1 is down host2's console shows vm1 failed over to host2 and host1 down;
//! after the drill's repair it shows vm1 protected again on host2 and the agent's take-over
//! decision with its reason in the event log. Before the drill, the page's Unprotect and
//! Protect buttons are clicked through the DevTools protocol, answering the confirmation
//! dialog (dismissed: nothing happens; accepted: the VM becomes unprotected, then protected
//! again). Screenshots go to tests/artifacts/.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use xenft_tests::lab::{text, Lab};
use xenft_tests::netns::require_root;

/// Headless Chromium inside the lab's client namespace.
trait Browser {
    fn chromium(&self, args: &[&str]) -> Output;
    fn dom(&self, url: &str) -> String;
    fn screenshot(&self, url: &str, to: &Path);
}

impl Browser for Lab {
    /// Headless Chromium inside the client namespace, no background networking.
    fn chromium(&self, args: &[&str]) -> Output {
        let profile = self.dir.path().join("chromium-profile");
        Command::new("timeout")
            .args(["40", "ip", "netns", "exec", "xftlab-client", "chromium"])
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-dev-shm-usage",
                "--window-size=1400,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .output()
            .expect("run chromium")
    }

    fn dom(&self, url: &str) -> String {
        let o = self.chromium(&["--dump-dom", url]);
        assert!(
            o.status.success(),
            "chromium --dump-dom {url}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn screenshot(&self, url: &str, to: &Path) {
        let o = self.chromium(&[&format!("--screenshot={}", to.display()), url]);
        assert!(
            o.status.success() && to.is_file(),
            "screenshot of {url} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

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
            "exec 3<&0 4>&1 >/dev/null; exec timeout 120 ip netns exec xftlab-client chromium \
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

    fn wait(&mut self, id: u64) -> Value {
        loop {
            let m = self
                .from
                .recv_timeout(Duration::from_secs(20))
                .expect("no answer from chromium");
            if m["id"] == json!(id) {
                assert!(m.get("error").is_none(), "DevTools error: {m}");
                return m["result"].clone();
            }
        }
    }

    fn call(&mut self, in_page: bool, method: &str, params: Value) -> Value {
        let id = self.send(in_page, method, params);
        self.wait(id)
    }

    /// Evaluates `expr` in the page; its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            true,
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        r["result"]["value"].clone()
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
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(
                "(document.querySelector('tr[data-vm=\"vm1\"] .vm-state') || {}).textContent",
            );
            if v == json!(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "vm1 state is {v}, not {want:?}, after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
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

/// The rendered vm1 row (between its `<tr data-vm="vm1">` and `</tr>`).
fn vm_row(dom: &str) -> &str {
    let start = dom
        .find("<tr data-vm=\"vm1\">")
        .unwrap_or_else(|| panic!("no vm1 row in the page:\n{dom}"));
    let rest = &dom[start..];
    &rest[..rest.find("</tr>").unwrap_or(rest.len())]
}

#[test]
fn console_shows_vm1_protected_then_failed_over_after_a_host_drill() {
    if !require_root("console_shows_vm1_protected_then_failed_over_after_a_host_drill") {
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

    let before = lab.dom("http://10.200.0.1:8080/");
    let row = vm_row(&before);
    assert!(
        row.contains(">protected<"),
        "vm1 not shown protected: {row}"
    );
    assert!(row.contains("host1"), "{row}");
    assert!(
        before.contains("served by <b id=\"served\">host1</b>"),
        "{before}"
    );
    lab.screenshot(
        "http://10.200.0.1:8080/",
        &artifacts.join("console-protected.png"),
    );

    // Protect / unprotect from the page, through the confirmation dialog.
    {
        let mut page = Devtools::open(&lab, "http://10.200.0.1:8080/");
        page.wait_state("protected", Duration::from_secs(10));
        let q = page.click_and_confirm("button[data-action=unprotect]", false);
        assert!(q.contains("Unprotect vm1"), "{q}");
        std::thread::sleep(Duration::from_secs(2));
        page.wait_state("protected", Duration::from_secs(1));
        page.click_and_confirm("button[data-action=unprotect]", true);
        page.wait_state("unprotected", Duration::from_secs(10));
        let st = lab.run(&["status"]);
        let st = String::from_utf8_lossy(&st.stdout);
        assert!(st.contains("host1: Primary agent=- serving=true"), "{st}");
        assert!(st.contains("host2: Standby"), "{st}");
        lab.screenshot(
            "http://10.200.0.1:8080/",
            &artifacts.join("console-unprotected.png"),
        );
        let q = page.click_and_confirm("button[data-action=protect]", true);
        assert!(q.contains("Protect vm1"), "{q}");
        page.wait_state("protected", Duration::from_secs(60));
    }
    let st = lab.run(&["status"]);
    let st = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.contains("host1: Primary agent=protected serving=true"),
        "{st}"
    );
    assert!(st.contains("host2: Secondary agent=protected"), "{st}");

    // The drill keeps host1 down for 20 s before repairing it: look during the outage.
    let drill = lab.spawn(&["drill", "fault=host", "--hold-ms", "20000"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let st = lab.run(&["status"]);
        if String::from_utf8_lossy(&st.stdout).contains("host1: DOWN") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "host1 never went down"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    // host1 is gone; its console with it. host2's console shows the outage.
    let during = lab.dom("http://10.200.0.2:8080/");
    let row = vm_row(&during);
    assert!(row.contains("running unprotected (failed over)"), "{row}");
    assert!(row.contains("host2"), "{row}");
    assert!(
        during.contains("<td>host1</td><td class=\"down\">DOWN</td>"),
        "host1 not shown down"
    );
    assert!(
        during.contains("agent peer_silent: fail_over"),
        "the agent's take-over decision is missing"
    );
    lab.screenshot(
        "http://10.200.0.2:8080/",
        &artifacts.join("console-during-host-drill.png"),
    );

    let drill = drill.wait_with_output().expect("drill");
    assert!(drill.status.success(), "host drill: {}", text(&drill));
    let after = lab.dom("http://10.200.0.2:8080/");
    let row = vm_row(&after);
    assert!(row.contains(">protected<"), "{row}");
    assert!(row.contains("host2"), "{row}");
    assert!(
        after.contains("drill fault=host: PASS"),
        "drill verdict event missing"
    );
    lab.screenshot(
        "http://10.200.0.2:8080/",
        &artifacts.join("console-after-host-drill.png"),
    );
}
