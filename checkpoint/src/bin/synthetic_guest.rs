//! `xenft-synthetic-guest`: the local backend's guest process (started by `LocalDomain`).

use std::os::fd::{OwnedFd, RawFd};

use anyhow::{bail, Context};
use clap::Parser;
use xenft_checkpoint::local::guest::{run_guest, GuestArgs, Tracking};
use xenft_checkpoint::workload::WorkloadState;

/// Synthetic guest: runs a page-writing workload on a shared memory file.
#[derive(Parser)]
struct Args {
    /// Inherited fd of the memory file.
    #[arg(long)]
    memory_fd: RawFd,
    /// Inherited fd of the control socket.
    #[arg(long)]
    control_fd: RawFd,
    /// Memory size in pages.
    #[arg(long)]
    pages: u64,
    /// Encoded workload state, hex.
    #[arg(long)]
    context: String,
    /// Stay paused until resumed.
    #[arg(long)]
    start_paused: bool,
    /// Dirty tracking: auto, async or sync.
    #[arg(long, default_value = "sync")]
    tracking: String,
}

fn take_fd(fd: RawFd) -> anyhow::Result<OwnedFd> {
    xenft_checkpoint::take_inherited_fd(fd).with_context(|| format!("inherited fd {fd}"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // No PR_SET_PDEATHSIG: it fires when the spawning *thread* exits, which would kill a
    // guest started from a short-lived thread. The guest exits when its control socket
    // closes instead, which happens when the engine process dies.
    if args.context.len() % 2 != 0 || args.context.len() > 1024 {
        bail!("--context must be an even-length hex string");
    }
    let bytes: Vec<u8> = (0..args.context.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&args.context[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .context("--context is not hex")?;
    let state = WorkloadState::decode(&bytes)?;
    let Some(tracking) = Tracking::from_name(&args.tracking) else {
        bail!("--tracking must be auto, async or sync");
    };
    let memory = std::fs::File::from(take_fd(args.memory_fd)?);
    let control = std::os::unix::net::UnixStream::from(take_fd(args.control_fd)?);
    run_guest(GuestArgs {
        memory,
        control,
        pages: args.pages,
        state,
        start_paused: args.start_paused,
        tracking,
    })?;
    Ok(())
}
