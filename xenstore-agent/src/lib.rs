//! # xenft-agent: the per-host decision maker
//!
//! One agent runs in dom0 of every host. It watches xenstore, exchanges heartbeats with its
//! peers over the A-links (see `xenft-alink`), classifies failures, asks the quorum servers
//! before acting, drives the block and network shims and the level-3 checkpoint engine, and
//! serves the status API, metrics and console. The `xenft-quorum` server binary lives here too.
