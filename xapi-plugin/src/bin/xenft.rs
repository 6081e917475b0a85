//! `xenft`: the xe-style command line (see `xenft_xapi::cli`).
fn main() {}
