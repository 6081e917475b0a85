//! # xenft-alink: availability links
//!
//! (Being written: see issue 2.)
