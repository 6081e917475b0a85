//! [`NetbackDriver`]: the [`NetRelay`] seam over one VM's `xenft-netback` control socket
//! (JSON lines, see `xenft_netback::control`).
//!
//! | seam call | control requests |
//! |---|---|
//! | `redirect on` / `off` | `{"op":"redirect","on":true}` (force the uplink through the A-link tunnel) / `{"op":"redirect","on":null}` (back to the relay's own uplink detection) |
//! | `announce` | `{"op":"add_addresses",...}` (the configured VM addresses), then `{"op":"takeover","mode":"passthrough"}`: drops what the dead primary's epochs held, releases output from now on, sends GARP / unsolicited NA / a relearn frame; repeated [`REPEATS`] times in the background (switches and hosts may miss one) |

use std::net::IpAddr;
use std::time::Duration;

use serde_json::json;

use super::control::ControlSocket;
use crate::ids::VmId;
use crate::seams::{NetRelay, SeamError};

/// Announcements repeated after a take-over, [`REPEAT_EVERY`] apart.
pub const REPEATS: u32 = 3;
/// Pause between repeated announcements.
pub const REPEAT_EVERY: Duration = Duration::from_millis(200);

/// Drives one VM's `xenft-netback`.
#[derive(Debug, Clone)]
pub struct NetbackDriver {
    ctl: ControlSocket,
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
    pub fn new(ctl: ControlSocket, addresses: Vec<IpAddr>) -> Self {
        Self { ctl, addresses }
    }
}

impl NetRelay for NetbackDriver {
    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        // Off means "stop forcing": the relay's own uplink monitor decides again.
        let forced = on.then_some(true);
        self.ctl
            .request(&json!({"op": "redirect", "on": forced}).to_string())
            .map_err(|e| seam("redirect", vm, e))?;
        tracing::info!(%vm, on, "uplink redirect through the A-link tunnel");
        Ok(())
    }

    fn report(&self, _vm: &VmId) -> Option<serde_json::Value> {
        let v = match self.ctl.request(&json!({"op": "counters"}).to_string()) {
            Ok(v) => v,
            Err(e) => return Some(json!({"error": e.to_string()})),
        };
        // Only known fields, re-serialised.
        let c = &v["counters"];
        let mode: String = c["mode"].as_str().unwrap_or("").chars().take(32).collect();
        Some(json!({
            "mode": mode,
            "epoch": c["epoch"].as_u64(),
            "committed_epoch": c["committed_epoch"].as_u64(),
            "held_bytes": c["held_bytes_now"].as_u64(),
            "redirecting": c["redirect"]["redirecting"].as_bool(),
        }))
    }

    fn announce(&self, vm: &VmId) -> Result<(), SeamError> {
        if !self.addresses.is_empty() {
            self.ctl
                .request(&json!({"op": "add_addresses", "addresses": self.addresses}).to_string())
                .map_err(|e| seam("announce", vm, e))?;
        }
        let v = self
            .ctl
            .request(&json!({"op": "takeover", "mode": "passthrough"}).to_string())
            .map_err(|e| seam("announce", vm, e))?;
        let sent = v.get("announced").and_then(serde_json::Value::as_u64);
        tracing::warn!(%vm, announced = ?sent, "network presence taken over (GARP / NA sent)");
        let ctl = self.ctl.clone();
        let vm = vm.clone();
        std::thread::spawn(move || {
            for _ in 0..REPEATS {
                std::thread::sleep(REPEAT_EVERY);
                if let Err(e) = ctl.request(&json!({"op": "announce"}).to_string()) {
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

    fn vm() -> VmId {
        VmId::new("vm1").unwrap()
    }

    #[test]
    fn announce_adds_the_addresses_then_takes_over_in_passthrough() {
        let (_d, p, seen) = fake::serve(Box::new(|_| r#"{"ok":true,"announced":2}"#.into()));
        let drv = NetbackDriver::new(
            ControlSocket::new(&p, Duration::from_secs(2)),
            vec!["10.0.0.5".parse().unwrap()],
        );
        drv.announce(&vm()).unwrap();
        let seen = seen.lock().unwrap().clone();
        let ops: Vec<serde_json::Value> = seen
            .iter()
            .take(2)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(ops[0]["op"], "add_addresses");
        assert_eq!(ops[0]["addresses"], serde_json::json!(["10.0.0.5"]));
        assert_eq!(
            ops[1],
            serde_json::json!({"op": "takeover", "mode": "passthrough"})
        );
    }

    #[test]
    fn redirect_is_sent_and_a_refusal_is_an_error() {
        let (_d, p, seen) = fake::serve(Box::new(|l| {
            if !l.contains("null") {
                r#"{"ok":true}"#.into()
            } else {
                r#"{"ok":false,"error":"no tunnel"}"#.into()
            }
        }));
        let drv = NetbackDriver::new(ControlSocket::new(&p, Duration::from_secs(2)), vec![]);
        drv.redirect(&vm(), true).unwrap();
        let e = drv.redirect(&vm(), false).unwrap_err();
        assert!(e.reason.contains("no tunnel"), "{e}");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen[0],
            serde_json::json!({"op": "redirect", "on": true}).to_string()
        );
        assert_eq!(
            seen[1],
            serde_json::json!({"op": "redirect", "on": null}).to_string()
        );
    }
}
