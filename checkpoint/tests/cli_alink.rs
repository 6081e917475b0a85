//! `xenft-checkpoint primary` / `secondary` as processes over a real two-path A-link on
//! 127.0.0.1: the secondary fails over by itself once the SIGKILLed primary's link has been
//! dead for the path timeout, from a checkpoint at least as recent as the last one the
//! primary released; the primary ends protection the same way when the secondary is killed;
//! after an agent-driven take-over, `protect` re-protects the resumed guest over the same
//! A-link toward the returning host's fresh secondary, which can take over in turn; and the
//! A-link / Xen argument errors are clear and never panic.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use xenft_control::checkpoint::Request;
use xenft_control::Checkpoint;

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn checkpoint_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xenft-checkpoint"));
    c.env_remove("RUST_BACKTRACE").stdin(Stdio::null());
    c
}

/// Free loopback addresses (bound, then released).
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// `--alink-path` arguments for one side: `mine[i]=theirs[i]`.
fn link_args(
    mine: &[SocketAddr],
    theirs: &[SocketAddr],
    host: &str,
    peer: &str,
    secret: &Path,
) -> Vec<String> {
    let mut v = Vec::new();
    for (m, t) in mine.iter().zip(theirs) {
        v.push("--alink-path".to_string());
        v.push(format!("{m}={t}"));
    }
    for (k, val) in [
        ("--host", host),
        ("--peer-host", peer),
        ("--secret-file", secret.to_str().unwrap()),
        ("--alink-path-timeout-ms", "1000"),
    ] {
        v.push(k.to_string());
        v.push(val.to_string());
    }
    v
}

fn commits(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("commit ")?.trim().parse().ok())
        .collect()
}

/// A `secondary` and a `primary` (synthetic guest, 20 ms epochs) over a two-path A-link on
/// 127.0.0.1 with a 1 s path timeout, once 5 checkpoints committed.
struct Pair {
    dir: tempfile::TempDir,
    primary: KillOnDrop,
    secondary: KillOnDrop,
}

impl Pair {
    /// `secondary_extra`: more `secondary` options (`{dir}` stands for the temp dir).
    fn start(secondary_extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"a pool secret of more than 16 bytes").unwrap();
        let log = dir.path().join("commits");
        let guest = env!("CARGO_BIN_EXE_xenft-synthetic-guest");
        let addrs = free_addrs(4);
        let (p_addrs, s_addrs) = (&addrs[..2], &addrs[2..]);
        let secondary = checkpoint_bin()
            .args(["secondary", "--guest-binary", guest, "--memory-mib", "16"])
            .args(["--run-ms", "300"])
            .args(link_args(s_addrs, p_addrs, "h2", "h1", &secret))
            .args(
                secondary_extra
                    .iter()
                    .map(|a| a.replace("{dir}", dir.path().to_str().unwrap())),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("secondary.err")).unwrap())
            .spawn()
            .unwrap();
        let secondary = KillOnDrop(secondary);
        let primary = checkpoint_bin()
            .args(["primary", "--guest-binary", guest, "--memory-mib", "16"])
            .args(["--epoch-ms", "20", "--seed", "7"])
            .args(["--commit-log", log.to_str().unwrap()])
            .args(link_args(p_addrs, s_addrs, "h1", "h2", &secret))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("primary.err")).unwrap())
            .spawn()
            .unwrap();
        let mut primary = KillOnDrop(primary);
        let deadline = Instant::now() + Duration::from_secs(30);
        while commits(&log).len() < 5 {
            assert!(
                Instant::now() < deadline,
                "no 5 commits over the A-link in 30 s; primary: {}",
                std::fs::read_to_string(dir.path().join("primary.err")).unwrap_or_default()
            );
            assert!(primary.0.try_wait().unwrap().is_none(), "primary exited");
            std::thread::sleep(Duration::from_millis(50));
        }
        Pair {
            dir,
            primary,
            secondary,
        }
    }

    fn released(&self) -> u64 {
        *commits(&self.dir.path().join("commits")).last().unwrap()
    }

    /// Waits (30 s at most) for the primary or the secondary to exit by itself; its JSON
    /// outcome line.
    fn outcome(&mut self, name: &str) -> Value {
        let dir = self.dir.path().to_path_buf();
        let side = if name == "primary" {
            &mut self.primary
        } else {
            &mut self.secondary
        };
        let log = || std::fs::read_to_string(dir.join(format!("{name}.err")));
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = side.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "the {name} did not finish within 30 s; its log: {}",
                log().unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        side.0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(
            status.success(),
            "the {name} failed: {}",
            log().unwrap_or_default()
        );
        serde_json::from_str(out.lines().last().expect("an outcome line")).unwrap()
    }
}

#[test]
fn secondary_fails_over_over_the_alink_when_the_primary_is_killed() {
    let mut pair = Pair::start(&[]);
    pair.primary.0.kill().unwrap();
    pair.primary.0.wait().unwrap();
    let released = pair.released();
    let v = pair.outcome("secondary");
    let epoch = v["failover_epoch"].as_u64().unwrap();
    assert!(
        epoch >= released,
        "resumed from checkpoint {epoch}, but the primary released output of {released}"
    );
    assert!(v["applied_epochs"].as_u64().unwrap() >= 5, "{v}");
    assert_eq!(v["rejected_epochs"], 0, "{v}");
    assert!(
        v["guest_counter_after_run"].as_u64().unwrap() > 0,
        "the resumed guest ran: {v}"
    );
}

#[test]
fn primary_ends_protection_when_the_secondary_is_killed() {
    let mut pair = Pair::start(&[]);
    pair.secondary.0.kill().unwrap();
    pair.secondary.0.wait().unwrap();
    let v = pair.outcome("primary");
    assert_eq!(v["secondary_lost"], true, "{v}");
    assert!(v["committed_epoch"].as_u64().unwrap() >= 5, "{v}");
}

fn run(args: &[&str]) -> Output {
    checkpoint_bin()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// Fails with a non-zero exit, without a panic, and says `expect` on stderr.
fn refused(args: &[&str], expect: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(
        err.contains(expect),
        "{args:?}: expected {expect:?} in: {err}"
    );
}

#[test]
fn alink_path_without_host_names_the_missing_options() {
    for role in ["primary", "secondary"] {
        refused(
            &[role, "--alink-path", "127.0.0.1:7400=127.0.0.1:7401"],
            "--host",
        );
        refused(
            &[
                role,
                "--alink-path",
                "127.0.0.1:7400=127.0.0.1:7401",
                "--host",
                "h1",
            ],
            "--peer-host",
        );
    }
}

#[test]
fn malformed_alink_path_is_refused() {
    for bad in ["127.0.0.1:7400", "127.0.0.1=127.0.0.1:7401", "x:1=y:2"] {
        refused(
            &[
                "primary",
                "--alink-path",
                bad,
                "--host",
                "h1",
                "--peer-host",
                "h2",
                "--secret-file",
                "/dev/null",
            ],
            "--alink-path",
        );
    }
}

#[test]
fn a_socket_and_an_alink_together_are_refused() {
    let link = [
        "--alink-path",
        "127.0.0.1:7400=127.0.0.1:7401",
        "--host",
        "h1",
        "--peer-host",
        "h2",
        "--secret-file",
        "/dev/null",
    ];
    let mut p = vec!["primary", "--connect", "/tmp/none.sock"];
    p.extend_from_slice(&link);
    refused(&p, "cannot be used with");
    let mut s = vec!["secondary", "--listen", "/tmp/none.sock"];
    s.extend_from_slice(&link);
    refused(&s, "cannot be used with");
    // Neither is refused too.
    refused(&["primary"], "--connect");
}

#[test]
fn a_short_secret_is_refused_before_any_link_starts() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"short").unwrap();
    refused(
        &[
            "secondary",
            "--alink-path",
            "127.0.0.1:7400=127.0.0.1:7401",
            "--host",
            "h2",
            "--peer-host",
            "h1",
            "--secret-file",
            secret.to_str().unwrap(),
        ],
        "at least 16",
    );
}

#[test]
fn xen_domid_on_a_host_without_xen_is_a_clear_error() {
    if Path::new("/proc/xen/privcmd").exists() {
        eprintln!("skipped: this host runs Xen");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"a pool secret of more than 16 bytes").unwrap();
    let link = [
        "--alink-path",
        "127.0.0.1:7400=127.0.0.1:7401",
        "--host",
        "h1",
        "--peer-host",
        "h2",
        "--secret-file",
        secret.to_str().unwrap(),
    ];
    for role in ["primary", "secondary"] {
        let mut a = vec![role, "--xen-domid", "7"];
        a.extend_from_slice(&link);
        refused(&a, "this host has no Xen");
    }
    // Synthetic-guest options do not go with a Xen domain.
    refused(
        &[
            "secondary",
            "--xen-domid",
            "7",
            "--memory-mib",
            "16",
            "--listen",
            "/tmp/none.sock",
        ],
        "cannot be used with",
    );
}

/// One request on the engine's control socket; the outcome as JSON (`"ok"`, the reply's
/// fields or the refusal's `"error"`).
fn control(path: &Path, req: &Request) -> Value {
    xenft_tests::components::outcome_json::<Checkpoint>(path, req).expect("the engine answers")
}

#[test]
fn with_control_the_agent_decides_the_takeover_over_the_alink() {
    let mut pair = Pair::start(&["--control", "{dir}/ctl"]);
    let ctl = pair.dir.path().join("ctl");
    assert_eq!(control(&ctl, &Request::Status)["state"], "receiving");
    pair.primary.0.kill().unwrap();
    pair.primary.0.wait().unwrap();
    let released = pair.released();
    // The link is dead well past the path timeout: nothing happens by itself.
    std::thread::sleep(Duration::from_secs(3));
    assert!(pair.secondary.0.try_wait().unwrap().is_none());
    let st = control(&ctl, &Request::Status);
    assert_eq!(st["state"], "receiving", "{st}");
    let stop = control(&ctl, &Request::Stop);
    let committed = stop["committed_epoch"].as_u64().unwrap();
    assert!(committed >= released, "{stop} < released {released}");
    let f = control(&ctl, &Request::Failover);
    assert_eq!(f["ok"], true, "{f}");
    assert_eq!(f["epoch"].as_u64(), Some(committed), "{f}");
    let st = control(&ctl, &Request::Status);
    assert_eq!(st["state"], "running", "{st}");
    assert!(st["guest_pid"].as_u64().is_some(), "{st}");
}

/// A `xenft-checkpoint secondary --control` over the A-link (`--protect-epoch-ms 20`).
fn control_secondary(
    dir: &Path,
    name: &str,
    mine: &[SocketAddr],
    theirs: &[SocketAddr],
    hosts: (&str, &str),
) -> (KillOnDrop, std::path::PathBuf) {
    let ctl = dir.join(format!("{name}.ctl"));
    let c = checkpoint_bin()
        .args(["secondary", "--guest-binary"])
        .arg(env!("CARGO_BIN_EXE_xenft-synthetic-guest"))
        .args([
            "--memory-mib",
            "16",
            "--protect-epoch-ms",
            "20",
            "--control",
        ])
        .arg(&ctl)
        .args(link_args(
            mine,
            theirs,
            hosts.0,
            hosts.1,
            &dir.join("secret"),
        ))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap();
    let c = KillOnDrop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ctl.exists() {
        assert!(Instant::now() < deadline, "{name} has no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    (c, ctl)
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn committed_on(ctl: &Path) -> u64 {
    control(ctl, &Request::Status)["committed_epoch"]
        .as_u64()
        .unwrap_or(0)
}

/// `stop` + `failover` on `ctl`: (resumed epoch, guest counter in that checkpoint).
fn take_over(ctl: &Path) -> (u64, u64) {
    assert_eq!(control(ctl, &Request::Stop)["ok"], true);
    let f = control(ctl, &Request::Failover);
    assert_eq!(f["ok"], true, "{f}");
    let st = control(ctl, &Request::Status);
    assert_eq!(st["state"], "running", "{st}");
    (
        f["epoch"].as_u64().unwrap(),
        f["guest_counter"]
            .as_u64()
            .expect("a synthetic guest's counter"),
    )
}

/// `protect` (plain: over the engine's own A-link) until accepted; the accepting reply.
fn protect_over_alink(ctl: &Path) -> Value {
    let mut last = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        last = control(ctl, &Request::Protect { peer: None });
        if last["ok"] == true {
            return last;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("protect over the A-link never accepted: {last}");
}

#[test]
fn after_a_takeover_the_guest_is_protected_again_over_the_same_alink_and_survives_a_second_takeover(
) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("secret"), b"a pool secret of more than 16 bytes").unwrap();
    let addrs = free_addrs(4);
    let (a_addrs, b_addrs) = (&addrs[..2], &addrs[2..]);
    let guest = env!("CARGO_BIN_EXE_xenft-synthetic-guest");

    // Host A protects its guest toward host B (agent-driven secondary).
    let (mut b, b_ctl) = control_secondary(d, "b", b_addrs, a_addrs, ("h2", "h1"));
    let mut a = KillOnDrop(
        checkpoint_bin()
            .args(["primary", "--guest-binary", guest, "--memory-mib", "16"])
            .args(["--epoch-ms", "20", "--seed", "7"])
            .args(link_args(a_addrs, b_addrs, "h1", "h2", &d.join("secret")))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("a.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("B's first checkpoints", 30, || committed_on(&b_ctl) >= 3);

    // A dies; B takes over.
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let (_, b_resumed) = take_over(&b_ctl);
    let pid = control(&b_ctl, &Request::Status)["guest_pid"]
        .as_u64()
        .unwrap();
    // Nobody to protect toward yet: refused, the guest runs on.
    let r = control(&b_ctl, &Request::Protect { peer: None });
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("no live path"), "{r}");
    assert_eq!(control(&b_ctl, &Request::Status)["state"], "running");

    // A returns with a fresh secondary; B protects toward it; that secondary dies: B notices
    // (the path timeout) and keeps its guest running.
    let (a1, a1_ctl) = control_secondary(d, "a1", a_addrs, b_addrs, ("h1", "h2"));
    protect_over_alink(&b_ctl);
    wait_for("A1's committed checkpoints", 30, || {
        committed_on(&a1_ctl) > 1
    });
    drop(a1);
    wait_for("B to notice the lost secondary", 15, || {
        let st = control(&b_ctl, &Request::Status);
        st["state"] == "running" && !st["last_error"].is_null()
    });
    assert_eq!(
        control(&b_ctl, &Request::Status)["guest_pid"].as_u64(),
        Some(pid),
        "same guest"
    );

    // Again with a fresh secondary: protected.
    let (a2, a2_ctl) = control_secondary(d, "a2", a_addrs, b_addrs, ("h1", "h2"));
    let p = protect_over_alink(&b_ctl);
    assert_eq!(p["peer"], "alink:h1", "{p}");
    assert_eq!(
        control(
            &b_ctl,
            &Request::Protect {
                peer: Some("alink".into())
            }
        )["already"],
        true
    );
    wait_for("A2's committed checkpoints", 30, || {
        committed_on(&a2_ctl) > 3
    });
    let st = control(&b_ctl, &Request::Status);
    assert_eq!(st["state"], "protecting", "{st}");
    assert_eq!(st["primary"]["phase"], "protected", "{st}");
    assert_eq!(st["guest_pid"].as_u64(), Some(pid), "{st}");

    // `unprotect` ends it (the guest runs on); the same secondary process is not reused.
    let u = control(&b_ctl, &Request::Unprotect);
    assert_eq!(u["ok"], true, "{u}");
    let st = control(&b_ctl, &Request::Status);
    assert_eq!(st["state"], "running", "{st}");
    assert!(st["last_error"].is_null(), "{st}");
    let again = control(&b_ctl, &Request::Protect { peer: None });
    assert_eq!(again["ok"], false, "{again}");
    assert!(
        again["error"].as_str().unwrap().contains("fresh"),
        "{again}"
    );
    drop(a2);

    // A fresh secondary again: protected, and A's replica keeps committing.
    let (_a3, a3_ctl) = control_secondary(d, "a3", a_addrs, b_addrs, ("h1", "h2"));
    protect_over_alink(&b_ctl);
    wait_for("A3's committed checkpoints", 30, || {
        committed_on(&a3_ctl) > 3
    });
    wait_for("B protected", 10, || {
        control(&b_ctl, &Request::Status)["primary"]["phase"] == "protected"
    });
    let st = control(&b_ctl, &Request::Status);
    let (taken, counter) = (
        st["primary"]["epoch"].as_u64().unwrap(),
        st["primary"]["guest_counter"].as_u64().unwrap(),
    );
    assert!(counter >= b_resumed, "{st}");
    // A3 holds a checkpoint later than the one whose counter B reported.
    wait_for("A3 past B's reported checkpoint", 20, || {
        committed_on(&a3_ctl) >= taken + 5
    });

    // B dies; A3 takes over: the guest continues from a checkpoint, its counter never back.
    b.0.kill().unwrap();
    b.0.wait().unwrap();
    let (epoch, a_resumed) = take_over(&a3_ctl);
    assert!(epoch >= taken + 5, "resumed from {epoch}, B took {taken}");
    assert!(
        a_resumed >= counter && a_resumed > b_resumed,
        "the guest went back: A resumed at {a_resumed}, B had {counter} (resumed at {b_resumed})"
    );
    let st = control(&a3_ctl, &Request::Status);
    assert!(st["guest_pid"].as_u64().is_some(), "{st}");
}
