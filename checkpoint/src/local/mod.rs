//! Local backend: the synthetic guest.
//!
//! A synthetic guest is a separate process (`xenft-synthetic-guest`) whose "RAM" is a memfd
//! shared with the engine, running a [`crate::workload`] program at a set rate. It tracks its
//! dirty pages with userfaultfd write-protect (`sys::uffd`), pauses at a safe point
//! between two writes and reports its workload state as its vCPU context. The engine side is
//! [`LocalDomain`]; the guest side is [`guest::run_guest`]; they talk over a Unix socket pair
//! with the [`protocol`] below.

pub mod domain;
pub mod guest;
pub mod protocol;

pub use domain::{LocalDomain, LocalGuestConfig};
