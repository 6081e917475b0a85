//! Level-3 take-over through the agent's real drivers (root: the synthetic guest uses
//! userfaultfd): the checkpoint engine's secondary (`xenft-checkpoint secondary --control`)
//! holds checkpoint N of a synthetic guest; the blkback secondary (epoch mode) holds the disk
//! writes of epochs N and N + 1, none committed (the primary died before `commit N`). The
//! agent's `Seams::start(ResumeCheckpoint)` must freeze the memory replica at N, make the disk
//! hold exactly the writes of epochs <= N, serve it as primary, and resume the guest from N.

mod agent_shims;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agent_shims::{bins, nbd_unix_uri, outcome_json, qemu_io, wait_until};
use xenft_agent::core::StartMode;
use xenft_agent::drivers::{
    real_seams, AfterResume, BlkbackFile, CheckpointFile, DomainFile, VmDriversFile,
};
use xenft_agent::ids::VmId;
use xenft_control::{blkback, checkpoint, Blkback, Checkpoint, Component};
use xenft_tests::netns::require_root;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> Kill {
    let log = std::fs::File::create(log).unwrap();
    Kill(
        Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn wait_for(what: &str, f: impl FnMut() -> bool) {
    assert!(
        wait_until(Duration::from_secs(20), f),
        "timed out waiting for {what}"
    );
}

/// One request on a component's control socket; the outcome as JSON.
fn ctl<C: Component>(p: &Path, req: &C::Request) -> serde_json::Value {
    outcome_json::<C>(p, req).unwrap_or_else(|| panic!("no reply to {req:?} on {}", p.display()))
}

#[test]
fn a_level3_take_over_resumes_memory_and_disk_at_the_same_checkpoint() {
    if !require_root("a_level3_take_over_resumes_memory_and_disk_at_the_same_checkpoint") {
        return;
    }
    let bins = bins();
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    let s = |x: &Path| x.display().to_string();

    // The memory replica: a synthetic guest protected for 5 checkpoints, then the primary ends.
    let _ck_sec = spawn(
        &bins.checkpoint,
        &[
            "secondary",
            "--memory-mib",
            "16",
            "--listen",
            &s(&p("ck.sock")),
            "--control",
            &s(&p("ck.ctl")),
        ],
        &p("ck-sec.log"),
    );
    wait_for("the engine's sockets", || {
        p("ck.sock").exists() && p("ck.ctl").exists()
    });
    let mut ck_pri = spawn(
        &bins.checkpoint,
        &[
            "primary",
            "--memory-mib",
            "16",
            "--connect",
            &s(&p("ck.sock")),
            "--epoch-ms",
            "20",
            "--checkpoints",
            "5",
        ],
        &p("ck-pri.log"),
    );
    wait_for("the engine's primary to finish", || {
        matches!(ck_pri.0.try_wait(), Ok(Some(_)))
    });
    // The replica has read the whole stream (the primary's last commit included) once it saw
    // the stream end: only then is its committed checkpoint final.
    wait_for("the replica to see the primary's stream end", || {
        ctl::<Checkpoint>(&p("ck.ctl"), &checkpoint::Request::Status)["primary_gone"] == true
    });
    let st = ctl::<Checkpoint>(&p("ck.ctl"), &checkpoint::Request::Status);
    assert_eq!(st["state"], "receiving", "{st}");
    let n = st["committed_epoch"]
        .as_u64()
        .expect("a committed checkpoint");

    // The disk: epoch N and N + 1 written on the primary, held uncommitted on the secondary.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let blk = &bins.blkback;
    let _blk_sec = spawn(
        blk,
        &[
            "--role",
            "secondary",
            "--disk",
            &s(&p("sec.img")),
            "--size",
            "16M",
            "--listen",
            &addr,
            "--nbd-unix",
            &s(&p("sec-nbd.sock")),
            "--control",
            &s(&p("sec.ctl")),
        ],
        &p("blk-sec.log"),
    );
    wait_for("the secondary's control socket", || p("sec.ctl").exists());
    let blk_pri = spawn(
        blk,
        &[
            "--role",
            "primary",
            "--disk",
            &s(&p("pri.img")),
            "--size",
            "16M",
            "--peer",
            &addr,
            "--nbd-unix",
            &s(&p("pri-nbd.sock")),
            "--control",
            &s(&p("pri.ctl")),
        ],
        &p("blk-pri.log"),
    );
    wait_for("the mirror in sync", || {
        p("pri.ctl").exists()
            && ctl::<Blkback>(&p("pri.ctl"), &blkback::Request::Status)["primary"]["peer"]
                == "in_sync"
    });
    assert_eq!(
        ctl::<Blkback>(&p("sec.ctl"), &blkback::Request::EpochMode { on: true })["ok"],
        true
    );
    ctl::<Blkback>(&p("pri.ctl"), &blkback::Request::SetEpoch { epoch: n });
    let pri_nbd = nbd_unix_uri(&p("pri-nbd.sock"));
    let (ok, out) = qemu_io(&pri_nbd, false, &["write -P 0x0a 0 1M", "flush"]);
    assert!(ok, "{out}");
    ctl::<Blkback>(&p("pri.ctl"), &blkback::Request::SetEpoch { epoch: n + 1 });
    let (ok, out) = qemu_io(&pri_nbd, false, &["write -P 0x0b 2M 1M", "flush"]);
    assert!(ok, "{out}");
    wait_for("both epochs held on the secondary", || {
        ctl::<Blkback>(&p("sec.ctl"), &blkback::Request::Status)["secondary"]["held_epochs"]
            == serde_json::json!([n, n + 1])
    });
    drop(blk_pri); // SIGKILL: the primary dies before committing epoch N

    // Act: the agent's take-over with the real drivers.
    let vm = VmId::new("vm1").unwrap();
    let seams = real_seams(
        &BTreeMap::from([(
            vm.clone(),
            VmDriversFile {
                domain: Some(DomainFile {
                    command: vec!["true".into()],
                    after_resume: Some(AfterResume::Start),
                }),
                blkback: Some(BlkbackFile {
                    control: p("sec.ctl"),
                    request_timeout_ms: 5000,
                    sync_timeout_ms: 5000,
                }),
                netback: None,
                checkpoint: Some(CheckpointFile {
                    control: p("ck.ctl"),
                    request_timeout_ms: 10_000,
                    peer_listen: None,
                    protect_timeout_ms: 120_000,
                }),
            },
        )]),
        None,
    );
    seams.start(&vm, StartMode::ResumeCheckpoint).unwrap();

    // Assert: memory resumed at N, disk holds epoch N and not N + 1, served as primary.
    let st = ctl::<Checkpoint>(&p("ck.ctl"), &checkpoint::Request::Status);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["committed_epoch"], n, "{st}");
    let b = ctl::<Blkback>(&p("sec.ctl"), &blkback::Request::Status);
    assert_eq!(b["role"], "primary", "{b}");
    let (ok, out) = qemu_io(
        &nbd_unix_uri(&p("sec-nbd.sock")),
        false,
        &["read -P 0x0a 0 1M", "read -P 0 2M 1M"],
    );
    assert!(
        ok && !out.contains("Pattern verification failed")
            && out.matches("read 1048576/1048576").count() == 2,
        "the disk does not match checkpoint {n}:\n{out}"
    );
}
