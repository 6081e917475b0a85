//! Fuzzes the A-link frame decoder with arbitrary bytes: it must never panic, and whatever it
//! accepts must re-encode to the same bytes.
//! Run: `cargo +nightly fuzz run frame_decode` from `alink/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenft_alink::frame::{decode, encode, keyed};

fuzz_target!(|data: &[u8]| {
    let key = keyed(b"fuzzing key for the frame decoder");
    if let Ok((frame, used)) = decode(&key, data) {
        assert_eq!(&encode(&key, &frame)[..], &data[..used]);
    }
});
