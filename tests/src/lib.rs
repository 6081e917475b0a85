//! # xenft-tests: shared harness for cross-crate integration tests
//!
//! The tests in `tests/tests/` build real multi-host topologies on one Linux machine: every
//! "host" is a network namespace, every A-link or uplink is a veth pair. This crate holds the
//! pieces they share:
//!
//! - [`netns::Netns`]: a network namespace that is removed when dropped (and swept if a test
//!   process died before it could drop it), with helpers to run commands or threads inside it;
//! - [`netns::veth`]: a veth pair between two namespaces with addresses;
//! - [`netns::require_root`]: the skip rule for privileged tests (they print why and pass
//!   trivially only when not root, which CI never is);
//! - [`components`]: the components' control sockets through the contract's client;
//! - [`lab::Lab`]: the local pool (`xenft-lab`) as a fixture, one at a time;
//! - [`xapi_server::FakeXapi`]: a XenAPI test server with xapi's semantics (also run as the
//!   `xenft-fake-xapi` binary), checked against the official Python SDK in `tests/xapi_sdk.rs`.

pub mod alink_hosts;
pub mod components;
pub mod lab;
pub mod netns;
pub mod xapi_server;
