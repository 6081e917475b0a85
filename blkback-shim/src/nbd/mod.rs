//! The NBD front: protocol constants ([`proto`]), the server ([`server`]) and its
//! `base:allocation` block status ([`block_status`]).

pub mod block_status;
pub mod client;
pub mod proto;
mod reply;
pub mod server;
