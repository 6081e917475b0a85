//! The frame reader against streams that deliver a frame in pieces of any size.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use super::*;

/// A stream that hands out its bytes in pieces of the given sizes, in turn.
struct Pieces {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    next: usize,
}

impl AsyncRead for Pieces {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let n = me.sizes[me.next % me.sizes.len()]
            .min(buf.remaining())
            .min(me.data.len() - me.pos);
        buf.put_slice(&me.data[me.pos..me.pos + n]);
        me.pos += n;
        me.next += 1;
        Poll::Ready(Ok(()))
    }
}

fn data_frame(len: usize) -> Frame {
    Frame {
        kind: Kind::Data,
        channel: Channel::Disk,
        flags: 0,
        seq: 42,
        payload: (0..len)
            .map(|i| u8::try_from(i * 31 % 251).unwrap_or_default())
            .collect::<Vec<u8>>()
            .into(),
    }
}

async fn read_in(wire: Vec<u8>, sizes: &[usize], key: &FrameMac) -> Result<Frame, ReadError> {
    let mut s = Pieces {
        data: wire,
        pos: 0,
        sizes: sizes.to_vec(),
        next: 0,
    };
    read_frame(&mut s, key, MAX_FRAGMENT).await
}

/// Piece sizes that cut a fragment everywhere: single bytes, sizes around the MAC run, reads
/// far larger than it.
const CUTS: [&[usize]; 6] = [
    &[1],
    &[MAC_RUN - 1, 7],
    &[MAC_RUN + 1],
    &[40 * 1024, 200 * 1024, 3, 150 * 1024 + 5],
    &[HEADER_LEN, MAC_RUN - HEADER_LEN, 1],
    &[usize::MAX],
];

#[tokio::test]
async fn a_fragment_read_in_any_pieces_is_authenticated_whole() {
    let key = keyed(b"connection key");
    for len in [
        0,
        1,
        MAC_RUN - HEADER_LEN,
        MAC_RUN,
        3 * MAC_RUN + 17,
        MAX_FRAGMENT,
    ] {
        let f = data_frame(len);
        let wire = frame::encode(&key, &f).to_vec();
        // Single-byte reads of a whole fragment take long: only for the small ones.
        for sizes in CUTS.iter().filter(|c| len < 100_000 || c[0] > 1) {
            match read_in(wire.clone(), sizes, &key).await {
                Ok(back) => assert_eq!(back, f, "len {len}, pieces {sizes:?}"),
                Err(e) => panic!("len {len}, pieces {sizes:?}: {e}"),
            }
        }
    }
}

#[tokio::test]
async fn a_changed_byte_anywhere_in_a_fragment_is_a_bad_mac_however_it_is_cut() {
    let key = keyed(b"connection key");
    let f = data_frame(3 * MAC_RUN + 17);
    let wire = frame::encode(&key, &f).to_vec();
    let payload_end = HEADER_LEN + f.payload.len();
    // Bytes on both sides of each run boundary, the first and last payload bytes, the tag.
    let mut positions = vec![HEADER_LEN, payload_end - 1, payload_end, wire.len() - 1];
    for k in 1..=3 {
        positions.extend([k * MAC_RUN - 1, k * MAC_RUN]);
    }
    for pos in positions {
        let mut bad = wire.clone();
        bad[pos] ^= 0x40;
        for sizes in CUTS.iter().filter(|c| c[0] > 1) {
            let r = read_in(bad.clone(), sizes, &key).await;
            assert!(
                matches!(r, Err(ReadError::Frame(FrameError::BadMac))),
                "byte {pos} changed, pieces {sizes:?}: not rejected as a bad MAC"
            );
        }
    }
}

#[test]
fn mac_runs_end_on_run_boundaries_of_the_macd_stream_and_never_past_the_data() {
    assert_eq!(mac_run_end(0), 0);
    assert_eq!(mac_run_end(MAC_RUN - HEADER_LEN - 1), 0);
    assert_eq!(mac_run_end(MAC_RUN - HEADER_LEN), MAC_RUN - HEADER_LEN);
    for avail in (0..MAX_FRAGMENT).step_by(4093) {
        let end = mac_run_end(avail);
        assert!(end <= avail);
        assert!(avail - end < MAC_RUN);
        if end > 0 {
            assert_eq!((HEADER_LEN + end) % MAC_RUN, 0);
        }
    }
}
