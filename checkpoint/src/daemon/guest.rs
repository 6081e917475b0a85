//! The guest a `xenft-checkpoint` process protects or replicates: a synthetic guest (a
//! separate process, [`LocalDomain`]) or a Xen domain ([`XenDomain`]), chosen at run time and
//! driven by the engine as one [`Domain`].

use std::num::NonZeroU32;
use std::path::PathBuf;

use super::error::{DaemonError, GuestOp};
use crate::domain::{Domain, DomainError, VcpuContext};
use crate::local::{LocalDomain, LocalGuestConfig};
use crate::workload::{WorkloadSpec, WorkloadState};
use crate::xen::XenDomain;

/// Which guest the engine protects or replicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestKind {
    /// A synthetic guest, run by the `xenft-synthetic-guest` binary.
    Synthetic {
        /// Path of `xenft-synthetic-guest`.
        binary: PathBuf,
        /// Guest memory in bytes.
        memory_bytes: u64,
    },
    /// A Xen domain: on the primary the running domain, on the secondary the paused replica
    /// the toolstack built with `xl create -p` from the primary's configuration.
    Xen {
        /// Domain id.
        domid: u32,
        /// The domain's vCPU count.
        vcpus: NonZeroU32,
    },
}

impl GuestKind {
    /// The guest to protect: the running Xen domain, or a synthetic guest started now with
    /// `workload` (seeded by `seed`; a Xen domain runs its own).
    pub(super) fn protected(self, workload: WorkloadSpec, seed: u64) -> Result<Guest, DaemonError> {
        Ok(match self {
            Self::Xen { domid, vcpus } => Guest::Xen(Box::new(
                XenDomain::open(domid, vcpus.get())
                    .map_err(DaemonError::guest(GuestOp::OpenXen(domid)))?,
            )),
            Self::Synthetic {
                binary,
                memory_bytes,
            } => {
                let workload = WorkloadState::new(workload, seed).map_err(DaemonError::Workload)?;
                Guest::Local(
                    LocalDomain::spawn(&LocalGuestConfig {
                        binary,
                        memory_bytes,
                        workload,
                        tracking: Default::default(),
                    })
                    .map_err(DaemonError::guest(GuestOp::Spawn))?,
                )
            }
        })
    }

    /// The replica to receive into: an all-zero synthetic guest, or the paused Xen domain
    /// (zeroed).
    pub(super) fn replica(&self) -> Result<Guest, DaemonError> {
        Ok(match self {
            Self::Synthetic {
                binary,
                memory_bytes,
            } => Guest::Local(
                LocalDomain::replica(binary.clone(), *memory_bytes)
                    .map_err(DaemonError::guest(GuestOp::Replica))?,
            ),
            Self::Xen { domid, vcpus } => Guest::Xen(Box::new(
                XenDomain::open_replica(*domid, vcpus.get())
                    .map_err(DaemonError::guest(GuestOp::OpenXenReplica(*domid)))?,
            )),
        })
    }
}

/// A synthetic guest or a Xen domain, as one [`Domain`].
pub(super) enum Guest {
    Local(LocalDomain),
    Xen(Box<XenDomain>),
}

macro_rules! on_guest {
    ($g:expr, $d:ident => $e:expr) => {
        match $g {
            Guest::Local($d) => $e,
            Guest::Xen($d) => $e,
        }
    };
}

impl Guest {
    /// The synthetic guest's process id (none for a Xen domain).
    pub(super) fn guest_pid(&self) -> Option<u32> {
        match self {
            Guest::Local(d) => d.guest_pid(),
            Guest::Xen(_) => None,
        }
    }
}

impl Domain for Guest {
    fn memory_pages(&self) -> u64 {
        on_guest!(self, d => d.memory_pages())
    }
    fn pause(&mut self) -> Result<(), DomainError> {
        on_guest!(self, d => d.pause())
    }
    fn resume(&mut self) -> Result<(), DomainError> {
        on_guest!(self, d => d.resume())
    }
    fn enable_dirty_log(&mut self) -> Result<(), DomainError> {
        on_guest!(self, d => d.enable_dirty_log())
    }
    fn disable_dirty_log(&mut self) -> Result<(), DomainError> {
        on_guest!(self, d => d.disable_dirty_log())
    }
    fn read_and_clear_dirty(&mut self) -> Result<Vec<u64>, DomainError> {
        on_guest!(self, d => d.read_and_clear_dirty())
    }
    fn read_pages(&mut self, pfns: &[u64], out: &mut [u8]) -> Result<(), DomainError> {
        on_guest!(self, d => d.read_pages(pfns, out))
    }
    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), DomainError> {
        on_guest!(self, d => d.write_pages(pfns, data))
    }
    fn vcpu_context(&mut self) -> Result<VcpuContext, DomainError> {
        on_guest!(self, d => d.vcpu_context())
    }
    fn pause_and_collect(&mut self) -> Result<(Vec<u64>, VcpuContext), DomainError> {
        on_guest!(self, d => d.pause_and_collect())
    }
    fn set_vcpu_context(&mut self, ctx: &VcpuContext) -> Result<(), DomainError> {
        on_guest!(self, d => d.set_vcpu_context(ctx))
    }
    fn start_from_replica(&mut self) -> Result<(), DomainError> {
        on_guest!(self, d => d.start_from_replica())
    }
}
