//! # xenft-control: the one control contract of xenft's components
//!
//! Every per-VM component — `xenft-blkback`, `xenft-netback`, `xenft-checkpoint` — serves a
//! control socket, and every process that drives one (the agent's drivers, the checkpoint
//! engine stamping the shims' epochs, the local pool, the tests, scripts) speaks to it through
//! this crate and nothing else:
//!
//! - [`frame`]: the framing — JSON lines with a version (`{"v":1,"req":{"op":...}}` out,
//!   `{"v":1,"ok":...}` / `{"v":1,"err":{"kind":...}}` back, `{"v":1,"event":...}` pushed);
//! - [`Component`]: one marker type per component ([`Blkback`], [`Netback`], [`Checkpoint`])
//!   naming its request, reply and event enums, defined in [`blkback`], [`netback`] and
//!   [`checkpoint`];
//! - [`client::Client`]: the one bounded client (timeouts, reply size, typed errors) and its
//!   event [`client::Subscription`];
//! - [`server::Server`]: the one server (connection and line limits, typed error replies for
//!   anything undecodable, event fan-out through [`server::Events`]).
//!
//! What it is not: it carries no component logic, opens no disk or interface, and depends on
//! serde, serde_json, thiserror, tracing and nix (to wake its accept thread) only, so that any
//! process can speak the contract without linking a component.
//!
//! From a shell: `echo '{"v":1,"req":{"op":"status"}}' | socat - UNIX-CONNECT:/run/xenft/<vm>/blkback.sock`.

#![deny(missing_docs)]

pub mod blkback;
pub mod checkpoint;
pub mod client;
pub mod frame;
pub mod netback;
pub mod server;

pub use client::{Client, ControlError, Subscription};
pub use frame::{ErrorKind, ErrorReply, VERSION};
pub use server::{Events, Handler, Server, ServerOptions};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A component's side of the contract: what it is asked, what it answers, what it pushes.
pub trait Component: Send + Sync + 'static {
    /// Short name for logs and thread names.
    const NAME: &'static str;
    /// The requests it takes (an enum tagged by `op`).
    type Request: Serialize + DeserializeOwned + std::fmt::Debug + Clone + Send + 'static;
    /// Its replies (an enum tagged by `reply`).
    type Reply: Serialize + DeserializeOwned + std::fmt::Debug + Send + 'static;
    /// The events it pushes to subscribers (an enum tagged by `event`).
    type Event: Serialize + DeserializeOwned + std::fmt::Debug + Clone + Send + 'static;
}

/// A marker type for one component and its [`Component`] impl.
macro_rules! component {
    ($(#[$doc:meta])* $name:ident, $text:literal, $module:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name;

        impl Component for $name {
            const NAME: &'static str = $text;
            type Request = $module::Request;
            type Reply = $module::Reply;
            type Event = $module::Event;
        }
    };
}

component!(
    /// `xenft-blkback`: the disk backend and its mirror.
    Blkback,
    "blkback",
    blkback
);
component!(
    /// `xenft-netback`: the packet relay.
    Netback,
    "netback",
    netback
);
component!(
    /// `xenft-checkpoint secondary --control`: the level-3 replica the agent takes over with.
    Checkpoint,
    "checkpoint",
    checkpoint
);
