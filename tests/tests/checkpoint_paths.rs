//! Level-3 checkpointing between two hosts (network namespaces) over a two-path A-link, with
//! the path carrying the stream cut mid-run. Privileged: needs root (skips otherwise).

use std::sync::Arc;
use std::time::Duration;

use xenft_alink::Link;
use xenft_checkpoint::domain::{Domain, DomainError, VcpuContext};
use xenft_checkpoint::engine::commit::RecordingSink;
use xenft_checkpoint::engine::primary::{start_protection, EpochPolicy, Phase, PrimaryConfig};
use xenft_checkpoint::engine::secondary::{start_secondary, SecondaryConfig};
use xenft_checkpoint::testing::MemoryDomain;
use xenft_checkpoint::workload::{Pattern, WorkloadSpec, WorkloadState};
use xenft_tests::alink_hosts::two_hosts;
use xenft_tests::netns::require_root;

const PORT: u16 = 7030;
const PAGES: usize = 2048;
const CHECKPOINTS: u64 = 200;

/// A domain made of memory whose "guest" runs the synthetic workload while resumed: each
/// resume performs a burst of the workload's writes, and its state is the vCPU context.
struct ScriptedGuest {
    mem: MemoryDomain,
    state: WorkloadState,
}

impl Domain for ScriptedGuest {
    fn memory_pages(&self) -> u64 {
        self.mem.memory_pages()
    }
    fn pause(&mut self) -> Result<(), DomainError> {
        self.mem.pause()
    }
    fn resume(&mut self) -> Result<(), DomainError> {
        let mut data = Vec::new();
        for _ in 0..40 {
            let off = self.state.next_op(PAGES as u64, &mut data);
            let off = usize::try_from(off).map_err(|_| DomainError::WrongState("offset"))?;
            self.mem.poke(off, &data);
        }
        self.mem.resume()
    }
    fn enable_dirty_log(&mut self) -> Result<(), DomainError> {
        self.mem.enable_dirty_log()
    }
    fn read_and_clear_dirty(&mut self) -> Result<Vec<u64>, DomainError> {
        self.mem.read_and_clear_dirty()
    }
    fn read_pages(&mut self, pfns: &[u64], out: &mut [u8]) -> Result<(), DomainError> {
        self.mem.read_pages(pfns, out)
    }
    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), DomainError> {
        self.mem.write_pages(pfns, data)
    }
    fn vcpu_context(&mut self) -> Result<VcpuContext, DomainError> {
        Ok(VcpuContext(self.state.encode()))
    }
    fn set_vcpu_context(&mut self, ctx: &VcpuContext) -> Result<(), DomainError> {
        self.mem.set_vcpu_context(ctx)
    }
    fn start_from_replica(&mut self) -> Result<(), DomainError> {
        self.mem.start_from_replica()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn checkpoints_survive_cutting_the_active_alink_path() {
    if !require_root("checkpoints_survive_cutting_the_active_alink_path") {
        return;
    }
    let hosts = two_hosts(93, "ck", PORT).unwrap();
    let (h1, h2, c1, c2) = (hosts.h1, hosts.h2, hosts.c1, hosts.c2);
    let cables = hosts.devs;

    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let secondary = h2
        .spawn(move || {
            let rt = runtime();
            let link = rt.block_on(Link::start(c2)).unwrap();
            let ep = xenft_checkpoint::alink::endpoint(&link, rt.handle().clone()).unwrap();
            let sec = start_secondary(
                MemoryDomain::new(PAGES),
                ep,
                SecondaryConfig {
                    verify_memory_digest: true,
                },
            )
            .unwrap();
            let _ = done_rx.recv_timeout(Duration::from_secs(50));
            let status = sec.status();
            let (replica, epoch) = sec.failover().unwrap();
            (status, epoch, replica.vcpu)
        })
        .unwrap();

    let h2_name = h2.name().to_string();
    let primary = h1
        .spawn(move || {
            let rt = runtime();
            let link = rt.block_on(Link::start(c1)).unwrap();
            assert!(rt.block_on(link.wait_all_paths(Duration::from_secs(10))));
            let guest = ScriptedGuest {
                mem: MemoryDomain::new(PAGES),
                state: WorkloadState::new(
                    WorkloadSpec {
                        pattern: Pattern::Random,
                        write_len: 256,
                        rate_bytes_per_s: 0,
                    },
                    17,
                )
                .unwrap(),
            };
            let ep = xenft_checkpoint::alink::endpoint(&link, rt.handle().clone()).unwrap();
            let sink = Arc::new(RecordingSink::new());
            let p = start_protection(
                guest,
                ep,
                sink.clone(),
                PrimaryConfig {
                    epoch: EpochPolicy::Fixed(Duration::from_millis(5)),
                    verify_memory_digest: true,
                    max_checkpoints: Some(CHECKPOINTS),
                    ..PrimaryConfig::default()
                },
            )
            .unwrap();
            // Cut the cable that carries the stream halfway through.
            while p.status().checkpoints < CHECKPOINTS / 2 {
                std::thread::sleep(Duration::from_millis(2));
            }
            let active = link.status().active_path.unwrap_or(0);
            let dev = cables[active].as_str();
            xenft_tests::netns::run("ip", &["-n", &h2_name, "link", "set", dev, "down"]).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(40);
            while !p.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let st = p.status();
            let guest = p.stop().unwrap();
            let _ = done_tx.send(());
            (st, sink.committed(), guest.state)
        })
        .unwrap();

    let (st, committed, last_state) = primary.join().unwrap();
    let (sec_status, failover_epoch, vcpu) = secondary.join().unwrap();
    assert_eq!(st.phase, Phase::Stopped, "{st:?}");
    assert_eq!(committed.len() as u64, CHECKPOINTS, "{st:?}");
    assert_eq!(sec_status.digest_checks, CHECKPOINTS, "{sec_status:?}");
    assert_eq!(sec_status.digest_mismatches, 0, "{sec_status:?}");
    assert_eq!(
        sec_status.rejected_epochs, 0,
        "a path cut must not damage the stream"
    );
    assert_eq!(Some(&failover_epoch), committed.last());
    // The replica resumes with the workload state of the last checkpoint: the guest ran
    // exactly one more burst after it.
    let at = WorkloadState::decode(&vcpu.0).unwrap();
    assert_eq!(at.counter + 40, last_state.counter);
}
