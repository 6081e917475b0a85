//! # xenft-xapi: the control plane on XenAPI
//!
//! The XenAPI client (XML-RPC and JSON-RPC), the pool-wide protection registry kept in the
//! pool's and VMs' `other_config`, the xe-style `xenft` CLI, XenCenter custom fields and the
//! xapi host plugin. Everything an administrator or a script does goes through here.
//!
//! Layers, bottom up:
//! - [`xmlrpc`] / [`jsonrpc`]: value encodings (wire-protocol.md); XML by `quick-xml`, JSON by
//!   `serde_json`;
//! - [`transport`]: HTTP(S) with reqwest, HTTP/1.1 with hyper over xapi's Unix socket;
//! - [`client::XenApi`]: sessions, the `Status`/`Value`/`ErrorDescription` envelope,
//!   re-login on `SESSION_INVALID`; [`api`] adds typed calls and records and [`api::EventStream`]
//!   (`event.from` with `EVENTS_LOST` recovery);
//! - [`datamodel`]: xapi's method names and arities, kept as data (`datamodel/xapi-methods.txt`);
//! - [`error::XapiError`]: typed errors keeping XenAPI codes and parameters;
//! - [`registry`]: the protection registry in pool/VM `other_config` (checked writes);
//! - [`disks`]: where a VM's disks are, the xenft SR check of levels 2 and 3, moving disks
//!   into the xenft SR (`VDI.pool_migrate`);
//! - [`ops`]: protect/unprotect with admission control, status, pool-init, compat check,
//!   migrate: what the CLI, the host plugin and the watcher call;
//! - [`customfields`]: XenCenter custom field definitions and the watcher acting on them;
//! - [`cli`]: the xe-style `xenft` command line; [`plugin`]: the xapi host plugin.

pub mod api;
pub mod cli;
pub mod client;
pub mod customfields;
pub mod datamodel;
pub mod devices;
pub mod disks;
pub mod error;
pub mod jsonrpc;
pub mod ops;
pub mod plugin;
pub mod registry;
pub mod transport;
pub mod xmlrpc;

pub use api::{Class, EventStream, HostRecord, PoolRecord, Ref, VmRecord};
pub use client::{ConnectOptions, Credentials, Protocol, XenApi};
pub use error::{codes, XapiError};
