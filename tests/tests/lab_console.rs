//! The availability console in a real browser (root, Debian `chromium`): headless Chromium in
//! the client namespace loads host1's console and finds vm1 protected; a host drill kills
//! host1; while host1 is down host2's console shows vm1 failed over to host2 and host1 down;
//! after the drill's repair it shows vm1 protected again on host2 and the agent's take-over
//! decision with its reason in the event log. Screenshots go to tests/artifacts/.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    if Command::new("chromium").arg("--version").output().is_err() {
        eprintln!("SKIP console test: Debian package chromium is not installed (scripts/test installs it)");
        return;
    }
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
