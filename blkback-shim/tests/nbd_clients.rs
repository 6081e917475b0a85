//! The NBD front against real clients: qemu-io, qemu-img (convert, compare, bench), nbdinfo,
//! nbdcopy. Each test runs its own in-process server on a unique Unix socket.

mod common;

use common::{pseudo_random, run, run_ok, LocalServer};

#[test]
fn qemu_io_writes_patterns_with_fua_flush_trim_and_zero() {
    let s = LocalServer::start(64 << 20);
    let uri = s.uri();
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -f -P 0xcd 1M 64k",
            "-c",
            "write -P 0xee 3M 1M",
            "-c",
            "flush",
            "-c",
            "discard 3M 512k",
            "-c",
            "write -z 4M 128k",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 1M 64k",
            "-c",
            "read -P 0 3M 512k",
            "-c",
            "read -P 0xee 3584k 512k",
            &uri,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let disk = std::fs::read(&s.disk).unwrap();
    assert!(disk[..1 << 20].iter().all(|&b| b == 0xab));
    assert!(disk[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0xcd));
    assert!(disk[3 << 20..(3 << 20) + (512 << 10)]
        .iter()
        .all(|&b| b == 0));
    assert!(disk[(3 << 20) + (512 << 10)..4 << 20]
        .iter()
        .all(|&b| b == 0xee));
}

#[test]
fn qemu_io_detects_wrong_pattern() {
    // The verification above must be able to fail.
    let s = LocalServer::start(1 << 20);
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x11 0 4k", &s.uri()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Pattern verification failed"), "{text}");
}

#[test]
fn qemu_img_convert_then_compare_is_identical_and_detects_a_change() {
    let s = LocalServer::start(32 << 20);
    let src = s.dir.path().join("src.img");
    let mut data = vec![0u8; 32 << 20];
    data[5 << 20..9 << 20].copy_from_slice(&pseudo_random(4 << 20, 7));
    data[20 << 20..(20 << 20) + 4096].fill(0x42);
    std::fs::write(&src, &data).unwrap();
    let uri = s.uri();
    let src_s = src.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    );
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert_eq!(std::fs::read(&s.disk).unwrap(), data);
    data[6 << 20] ^= 1;
    std::fs::write(&src, &data).unwrap();
    let o = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert_eq!(o.status.code(), Some(1), "compare must see the difference");
}

#[test]
fn qemu_img_bench_writes_and_reads_at_queue_depth_16() {
    let s = LocalServer::start(64 << 20);
    let uri = s.uri();
    run_ok(
        "qemu-img",
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-d",
            "16",
            "-s",
            "4k",
            "-c",
            "2000",
            "--pattern",
            "119",
            "-n",
            &uri,
        ],
    );
    run_ok(
        "qemu-img",
        &[
            "bench", "-f", "raw", "-d", "16", "-s", "64k", "-c", "500", &uri,
        ],
    );
    let disk = std::fs::read(&s.disk).unwrap();
    assert!(disk[..2000 * 4096].iter().all(|&b| b == 0x77));
}

#[test]
fn nbdinfo_reports_size_and_capabilities() {
    let s = LocalServer::start(48 << 20);
    let out = run_ok("nbdinfo", &["--json", &s.uri()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 48 << 20);
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[cap], true, "{cap}: {out}");
    }
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(v["protocol"], "newstyle-fixed");
}

#[test]
fn nbdinfo_lists_the_export() {
    let s = LocalServer::start(1 << 20);
    let out = run_ok("nbdinfo", &["--list", "--json", &s.uri()]);
    assert!(out.contains("\"xenft\""), "{out}");
}

#[test]
fn nbdcopy_roundtrips_data_with_multiple_connections() {
    let s = LocalServer::start(16 << 20);
    let src = s.dir.path().join("src.img");
    let back = s.dir.path().join("back.img");
    let data = pseudo_random(16 << 20, 3);
    std::fs::write(&src, &data).unwrap();
    let uri = s.uri();
    run_ok("nbdcopy", &["--connections=4", src.to_str().unwrap(), &uri]);
    run_ok("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&back).unwrap(), data);
    assert_eq!(std::fs::read(&s.disk).unwrap(), data);
}

#[test]
fn concurrent_clients_on_disjoint_regions_all_land() {
    let s = LocalServer::start(16 << 20);
    let uri = s.uri();
    let handles: Vec<_> = (0..4u8)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let cmd = format!("write -P {} {}M 2M", 0x10 + i, u32::from(i) * 4);
                run_ok("qemu-io", &["-f", "raw", "-c", &cmd, &uri]);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let disk = std::fs::read(&s.disk).unwrap();
    for i in 0..4usize {
        let r = &disk[i * (4 << 20)..i * (4 << 20) + (2 << 20)];
        assert!(r.iter().all(|&b| usize::from(b) == 0x10 + i), "client {i}");
    }
}

#[test]
fn tcp_listener_serves_qemu_io_and_nbdinfo_on_loopback() {
    use std::sync::Arc;
    use xenft_blkback::nbd::server::{ExportConfig, NbdServer};
    use xenft_blkback::store::{FileStore, Store};
    use xenft_blkback::volume::Volume;

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let store: Arc<dyn Store> = Arc::new(FileStore::open(&disk, Some(8 << 20)).unwrap());
    let rt = common::Rt::new();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = NbdServer::new(Volume::local(store), ExportConfig::default());
    rt.handle()
        .spawn(async move { server.serve_tcp(listener).await });
    let uri = format!("nbd://127.0.0.1:{port}/xenft");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 1M 1M",
            "-c",
            "flush",
            &uri,
        ],
    );
    run_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x3c 1M 1M", &uri]);
    let size = run_ok("nbdinfo", &["--size", &uri]);
    assert_eq!(size.trim(), (8u64 << 20).to_string());
    let d = std::fs::read(&disk).unwrap();
    assert!(d[1 << 20..2 << 20].iter().all(|&b| b == 0x3c));
}
