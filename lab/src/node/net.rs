//! The VM's network on this host: an `xenft-netback` process relaying between the VM's vif
//! (`vif0`, whose far end `vm0` is the VM's interface in its own namespace) and the production
//! uplink `prod0` — pass-through on the host running the VM, standby on the other — driven by
//! the agent through the production driver (take-over announcement, uplink redirect) and the
//! production event follower (uplink lost or back). The relays tunnel the VM's frames to each
//! other over an A-link of their own ([`NETBACK_PORT`]) when the running copy's uplink fails.

use std::path::PathBuf;
use std::time::Duration;

use xenft_control::netback::{Counters, Reply, Request};
use xenft_control::{Client, Netback};

use super::process::{args, stop_component};
use super::Node;
use crate::topology::{PROD_IF, VIF_IF, VM_MAC};
use crate::LabError;

/// Port of the netback processes' own A-link (on both A-link interfaces).
pub const NETBACK_PORT: u16 = 7140;

/// The relay's mode at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Relays the VM's frames (the VM runs here).
    Passthrough,
    /// Relays nothing until a take-over or the peer's redirect.
    Standby,
}

impl Node {
    pub(super) fn net_ctl(&self) -> PathBuf {
        self.file("net.ctl")
    }

    /// The relay's counters, if it answers.
    pub(super) fn netback_counters(&self) -> Option<Counters> {
        match Client::<Netback>::new(self.net_ctl(), Duration::from_secs(2))
            .call(&Request::Counters)
        {
            Ok(Reply::Counters { counters }) => Some(*counters),
            _ => None,
        }
    }

    /// (Re)starts this host's netback in `mode` and waits until it answers.
    pub(super) fn start_netback(&self, mode: Mode) -> Result<(), LabError> {
        let _ = std::fs::remove_file(self.net_ctl());
        let (me, peer) = (self.me(), self.me().peer());
        let mut a = args(
            &[
                "--vif",
                VIF_IF,
                "--uplink",
                PROD_IF,
                "--mac",
                VM_MAC,
                "--mode",
                match mode {
                    Mode::Passthrough => "passthrough",
                    Mode::Standby => "standby",
                },
                "--alink-host",
                me.name(),
                "--alink-peer",
                peer.name(),
            ],
            &[
                ("--control", self.net_ctl()),
                ("--alink-secret-file", self.cfg.dir.file("secret")),
            ],
        );
        a.extend(self.alink_path_args(NETBACK_PORT));
        self.start_component(&self.net, "netback", &self.cfg.netback_binary, &a, || {
            self.netback_counters().is_some()
        })?;
        self.event(
            &format!("xenft-netback started ({mode:?})"),
            match mode {
                Mode::Passthrough => "relays the VM's vif to the production network",
                Mode::Standby => "holds the VM's network presence for a take-over",
            },
        );
        Ok(())
    }

    /// Stops this host's netback, if this node started one.
    pub(super) fn stop_netback(&self) {
        stop_component(&self.net);
    }
}
