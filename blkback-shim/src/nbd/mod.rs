//! The NBD front: protocol constants ([`proto`]) and the server ([`server`]).

pub mod client;
pub mod proto;
pub mod server;
