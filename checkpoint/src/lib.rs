//! xenft-checkpoint: the level-3 checkpoint engine.
//!
//! (Module docs are completed with the engine API below.)

pub mod domain;
pub mod engine;
pub mod local;
#[allow(unsafe_code)]
mod sys;
pub mod testing;
pub mod wire;
pub mod workload;
pub mod xen;

pub use sys::take_inherited_fd;
