//! [`NetbackDriver`]: the [`NetRelay`] seam over one VM's `xenft-netback` control socket
//! (the contract `xenft_control::netback`).
//!
//! | seam call | control requests |
//! |---|---|
//! | `redirect on` / `off` | `redirect {on: true}` (force the uplink through the A-link tunnel) / `redirect {on: null}` (back to the relay's own uplink detection) |
//! | `announce` | `add_addresses` (the configured VM addresses), then `takeover {mode: passthrough}`: drops what the dead primary's epochs held, releases output from now on, sends GARP / unsolicited NA / a relearn frame; `announce` repeated [`REPEATS`] times in the background (switches and hosts may miss one) |
//! | `isolate on` / `off` (fence / unfence) | `isolate {on}`: no frame passes in either direction (VM, uplink, tunnel), announcements included, until `isolate {on: false}` or a `takeover` |

use std::net::IpAddr;
use std::time::Duration;

use serde_json::json;
use xenft_control::netback::{Mode, Reply, Request};
use xenft_control::Netback;

use super::control::{Client, ControlError};
use crate::ids::VmId;
use crate::seams::{NetRelay, SeamError};

/// Announcements repeated after a take-over, [`REPEAT_EVERY`] apart.
pub const REPEATS: u32 = 3;
/// Pause between repeated announcements.
pub const REPEAT_EVERY: Duration = Duration::from_millis(200);

/// Drives one VM's `xenft-netback`.
#[derive(Debug, Clone)]
pub struct NetbackDriver {
    ctl: Client<Netback>,
    addresses: Vec<IpAddr>,
}

#[allow(clippy::needless_pass_by_value)] // callers pass temporaries (errors, literals)
fn seam(op: &'static str, vm: &VmId, e: impl ToString) -> SeamError {
    SeamError {
        component: "netback",
        operation: op,
        vm: vm.clone(),
        reason: e.to_string(),
    }
}

impl NetbackDriver {
    /// A driver for the relay whose control socket is `ctl`; `addresses` are the VM's IP
    /// addresses to announce (the relay also learns them from the VM's own frames).
    #[must_use]
    pub fn new(ctl: Client<Netback>, addresses: Vec<IpAddr>) -> Self {
        Self { ctl, addresses }
    }
}

impl NetRelay for NetbackDriver {
    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        // Off means "stop forcing": the relay's own uplink monitor decides again.
        let forced = on.then_some(true);
        self.ctl
            .call(&Request::Redirect { on: forced })
            .map_err(|e| seam("redirect", vm, e))?;
        tracing::info!(%vm, on, "uplink redirect through the A-link tunnel");
        Ok(())
    }

    fn isolate(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        self.ctl
            .call(&Request::Isolate { on })
            .map_err(|e| seam("isolate", vm, e))?;
        if on {
            tracing::warn!(%vm, "fenced copy isolated: its relay passes no frame");
        } else {
            tracing::info!(%vm, "unfenced copy reconnected: its relay passes frames again");
        }
        Ok(())
    }

    fn report(&self, _vm: &VmId) -> Option<serde_json::Value> {
        let c = match self.ctl.call(&Request::Counters) {
            Ok(Reply::Counters { counters }) => counters,
            Ok(other) => {
                let e = ControlError::unexpected(self.ctl.path(), other);
                return Some(json!({"error": e.to_string()}));
            }
            Err(e) => return Some(json!({"error": e.to_string()})),
        };
        Some(json!({
            "mode": c.mode,
            "epoch": c.epoch,
            "committed_epoch": c.committed_epoch,
            "held_bytes": c.held_bytes_now,
            "redirecting": c.redirect.redirecting,
            "isolated": c.isolated,
        }))
    }

    fn announce(&self, vm: &VmId) -> Result<(), SeamError> {
        if !self.addresses.is_empty() {
            self.ctl
                .call(&Request::AddAddresses {
                    addresses: self.addresses.clone(),
                })
                .map_err(|e| seam("announce", vm, e))?;
        }
        let sent = match self.ctl.call(&Request::Takeover {
            mode: Mode::Passthrough,
        }) {
            Ok(Reply::Announced { announced }) => Some(announced),
            Ok(_) => None,
            Err(e) => return Err(seam("announce", vm, e)),
        };
        tracing::warn!(%vm, announced = ?sent, "network presence taken over (GARP / NA sent)");
        let ctl = self.ctl.clone();
        let vm = vm.clone();
        std::thread::spawn(move || {
            for _ in 0..REPEATS {
                std::thread::sleep(REPEAT_EVERY);
                if let Err(e) = ctl.call(&Request::Announce) {
                    tracing::warn!(%vm, error = %e, "repeating the announcement failed");
                    return;
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::control::fake;
    use super::*;
    use xenft_control::ErrorReply;

    fn vm() -> VmId {
        VmId::new("vm1").unwrap()
    }

    #[test]
    fn announce_adds_the_addresses_then_takes_over_in_passthrough() {
        let f = fake::serve::<Netback>(|_| Ok(Reply::Announced { announced: 2 }));
        let drv = NetbackDriver::new(f.client(), vec!["10.0.0.5".parse().unwrap()]);
        drv.announce(&vm()).unwrap();
        let seen = f.seen();
        assert_eq!(
            seen[..2],
            [
                Request::AddAddresses {
                    addresses: vec!["10.0.0.5".parse().unwrap()]
                },
                Request::Takeover {
                    mode: Mode::Passthrough
                }
            ]
        );
    }

    #[test]
    fn isolate_is_sent_both_ways_and_a_dead_relay_is_an_error() {
        let f = fake::serve::<Netback>(|_| Ok(Reply::Done));
        let drv = NetbackDriver::new(f.client(), vec![]);
        drv.isolate(&vm(), true).unwrap();
        drv.isolate(&vm(), false).unwrap();
        assert_eq!(
            f.seen(),
            vec![
                Request::Isolate { on: true },
                Request::Isolate { on: false }
            ]
        );
        let gone = NetbackDriver::new(
            Client::new("/nonexistent/netback.sock", Duration::from_millis(200)),
            vec![],
        );
        let e = gone.isolate(&vm(), true).unwrap_err();
        assert_eq!((e.component, e.operation), ("netback", "isolate"));
    }

    #[test]
    fn redirect_is_sent_and_a_refusal_is_an_error() {
        let f = fake::serve::<Netback>(|req| match req {
            Request::Redirect { on: None } => Err(ErrorReply::refused("no tunnel")),
            _ => Ok(Reply::Done),
        });
        let drv = NetbackDriver::new(f.client(), vec![]);
        drv.redirect(&vm(), true).unwrap();
        let e = drv.redirect(&vm(), false).unwrap_err();
        assert!(e.reason.contains("no tunnel"), "{e}");
        assert_eq!(
            f.seen(),
            vec![
                Request::Redirect { on: Some(true) },
                Request::Redirect { on: None }
            ]
        );
    }
}
