//! Round trips, damage and refusals of the wire format: frames, encoder, assembler, apply.

// Small test sizes fit every integer type.
#![allow(clippy::cast_possible_truncation)]

use bytes::Bytes;

use super::*;
use crate::domain::{Domain, VcpuContext};
use crate::testing::MemoryDomain;
use crate::workload::PAGE_SIZE;
use proptest::prelude::*;

fn epoch_of(src: &mut MemoryDomain, epoch: u64, pfns: Vec<u64>) -> StagedEpoch {
    let mut data = vec![0u8; pfns.len() * PAGE_SIZE];
    src.read_pages(&pfns, &mut data).unwrap();
    StagedEpoch {
        epoch,
        vcpu: Some(VcpuContext(vec![epoch as u8; 16])),
        pfns,
        data,
        memory_digest: None,
    }
}

fn assemble(pages: u64, frames: &[Bytes]) -> Result<CompleteEpoch, WireError> {
    let mut a = EpochAssembler::new(pages);
    for f in frames {
        if let Fed::Complete(c) = a.feed(f)? {
            return Ok(c);
        }
    }
    Err(WireError::Unexpected("no end"))
}

proptest! {
    #[test]
    fn frames_round_trip(epoch in any::<u64>(), pages in any::<u64>(), ctx in proptest::collection::vec(any::<u8>(), 0..64),
                         pfn in any::<u64>(), count in 1u32..=MAX_RUN_PAGES, digest in proptest::option::of(any::<u64>())) {
        let raw = Bytes::from(vec![7u8; count as usize * PAGE_SIZE]);
        for f in [
            Frame::Begin { epoch, memory_pages: pages, page_count: pages / 2, checkpoint: epoch % 2 == 0 },
            Frame::Vcpu(VcpuContext(ctx.clone())),
            Frame::Pages(vec![
                PageRun { first_pfn: pfn, count, encoding: Encoding::Zero, bytes: Bytes::new() },
                PageRun { first_pfn: pfn, count, encoding: Encoding::Raw, bytes: raw.clone() },
                PageRun { first_pfn: pfn, count, encoding: Encoding::XorLz4, bytes: Bytes::from_static(b"xyz") },
            ]),
            Frame::End { epoch, checksum: pages, memory_digest: digest },
            Frame::Ack { epoch },
            Frame::Nack { expected: epoch, reason: NackReason::Truncated },
        ] {
            prop_assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Frame::decode(&bytes);
        let mut a = EpochAssembler::new(64);
        let _ = a.feed(&bytes);
    }

    #[test]
    fn encoded_epochs_rebuild_the_primary_memory(
        writes in proptest::collection::vec((0usize..32 * PAGE_SIZE - 64, proptest::collection::vec(any::<u8>(), 1..64)), 1..40),
        zero_pages in proptest::collection::vec(0u64..32, 0..4),
    ) {
        let mut primary = MemoryDomain::new(32);
        let mut replica = MemoryDomain::new(32);
        let mut enc = EpochEncoder::new(32).unwrap();
        // Epoch 1 writes, epoch 2 rewrites half of them (XOR deltas) and zeroes pages.
        for (epoch, part) in [(1u64, &writes[..]), (2, &writes[writes.len() / 2..])] {
            for (off, data) in part {
                let d: Vec<u8> = data.iter().map(|b| b.wrapping_add(epoch as u8)).collect();
                primary.poke(*off, &d);
            }
            if epoch == 2 {
                for &p in &zero_pages {
                    primary.poke(p as usize * PAGE_SIZE, &[0u8; PAGE_SIZE]);
                }
            }
            let pfns = primary.read_and_clear_dirty().unwrap();
            let staged = epoch_of(&mut primary, epoch, pfns);
            let e = enc.encode(&staged).unwrap();
            let complete = assemble(32, &e.frames).unwrap();
            apply_epoch(&complete, &mut replica).unwrap();
            prop_assert_eq!(complete.vcpu, staged.vcpu);
        }
        prop_assert!(primary.memory == replica.memory);
    }

    #[test]
    fn any_damaged_byte_or_cut_refuses_the_whole_epoch(frame_pick in any::<prop::sample::Index>(), byte in any::<prop::sample::Index>(), cut in any::<bool>()) {
        let mut primary = MemoryDomain::new(16);
        for p in 0..16 {
            primary.poke(p * PAGE_SIZE + p, &[p as u8 + 1; 100]);
        }
        let pfns = primary.read_and_clear_dirty().unwrap();
        let e = EpochEncoder::new(16).unwrap().encode(&epoch_of(&mut primary, 1, pfns)).unwrap();
        let mut frames = e.frames.clone();
        let fi = frame_pick.index(frames.len());
        let mut f = frames[fi].to_vec();
        if cut {
            f.truncate(byte.index(f.len()));
        } else {
            let bi = byte.index(f.len());
            f[bi] ^= 0x5a;
        }
        frames[fi] = Bytes::from(f);
        let mut replica = MemoryDomain::new(16);
        let before = replica.memory.clone();
        match assemble(16, &frames) {
            Err(_) => {}
            Ok(c) => {
                // Only a change that keeps the frame valid and the checksum equal could get
                // here; XXH3 makes that practically impossible.
                prop_assert!(false, "damaged epoch accepted: {:?}", c.epoch);
            }
        }
        prop_assert!(replica.memory == before);
        let _ = &mut replica;
    }
}

#[test]
fn pages_beyond_the_replica_are_refused() {
    let mut a = EpochAssembler::new(8);
    let begin = Frame::Begin {
        epoch: 1,
        memory_pages: 8,
        page_count: 1,
        checkpoint: false,
    };
    a.feed(&begin.encode()).unwrap();
    let pages = Frame::Pages(vec![PageRun {
        first_pfn: 8,
        count: 1,
        encoding: Encoding::Zero,
        bytes: Bytes::new(),
    }]);
    assert!(matches!(
        a.feed(&pages.encode()),
        Err(WireError::PfnOutOfRange { first_pfn: 8, .. })
    ));
    assert_eq!(a.staging(), None);
    // A run whose end overflows u64 is refused too.
    a.feed(&begin.encode()).unwrap();
    let wrap = Frame::Pages(vec![PageRun {
        first_pfn: u64::MAX,
        count: 2,
        encoding: Encoding::Zero,
        bytes: Bytes::new(),
    }]);
    assert!(matches!(
        a.feed(&wrap.encode()),
        Err(WireError::PfnOutOfRange { .. })
    ));
}

#[test]
fn an_epoch_cut_short_by_the_next_one_is_reported_truncated() {
    let mut src = MemoryDomain::new(4);
    src.poke(0, &[1; 10]);
    let pfns = src.read_and_clear_dirty().unwrap();
    let mut enc = EpochEncoder::new(4).unwrap();
    let e1 = enc.encode(&epoch_of(&mut src, 1, pfns.clone())).unwrap();
    let e2 = enc.encode(&epoch_of(&mut src, 2, pfns)).unwrap();
    let mut a = EpochAssembler::new(4);
    for f in &e1.frames[..e1.frames.len() - 1] {
        a.feed(f).unwrap();
    }
    assert_eq!(
        a.feed(&e2.frames[0]).unwrap_err(),
        WireError::EpochTruncated { epoch: 1 }
    );
    let mut last = None;
    for f in &e2.frames[1..] {
        last = Some(a.feed(f).unwrap());
    }
    assert!(matches!(
        last,
        Some(Fed::Complete(CompleteEpoch { epoch: 2, .. }))
    ));
}

#[test]
fn a_delta_that_does_not_decompress_leaves_the_replica_untouched() {
    let mut replica = MemoryDomain::new(4);
    replica.poke(0, &[9; PAGE_SIZE]);
    let before = replica.memory.clone();
    let ep = CompleteEpoch {
        epoch: 1,
        vcpu: None,
        runs: vec![
            PageRun {
                first_pfn: 0,
                count: 1,
                encoding: Encoding::Zero,
                bytes: Bytes::new(),
            },
            PageRun {
                first_pfn: 1,
                count: 1,
                encoding: Encoding::XorLz4,
                bytes: Bytes::from_static(&[0xff, 1, 2]),
            },
        ],
        page_count: 2,
        memory_digest: None,
    };
    assert!(matches!(
        apply_epoch(&ep, &mut replica),
        Err(ApplyError::Wire(WireError::Decompress { first_pfn: 1 }))
    ));
    assert!(
        replica.memory == before,
        "page 0 must not be zeroed by a refused epoch"
    );
}

#[test]
fn incompressible_pages_go_raw_and_repeated_pages_shrink() {
    let mut src = MemoryDomain::new(2);
    let noise: Vec<u8> = (0..PAGE_SIZE).map(|_| rand::random::<u8>()).collect();
    src.poke(0, &noise);
    let mut enc = EpochEncoder::new(2).unwrap();
    let pfns = src.read_and_clear_dirty().unwrap();
    let first = enc.encode(&epoch_of(&mut src, 1, pfns)).unwrap();
    src.poke(100, &[1, 2, 3, 4]);
    let pfns = src.read_and_clear_dirty().unwrap();
    let second = enc.encode(&epoch_of(&mut src, 2, pfns)).unwrap();
    assert!(first.wire_bytes > PAGE_SIZE as u64, "noise is sent raw");
    assert!(
        second.wire_bytes < 200,
        "a 4-byte change costs far less than a page: {}",
        second.wire_bytes
    );
}
