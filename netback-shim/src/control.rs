//! The control socket of the `xenft-netback` binary: the control contract
//! `xenft_control::netback`, served by the contract's server.
//!
//! [`handle`] carries out one request on the relay (`begin_epoch`, `commit`, `discard`,
//! `set_mode`, `takeover`, `announce`, `redirect`, `add_addresses`, `isolate`, `counters`; refusals are
//! typed). Events pushed to subscribers: `early_checkpoint` (from the relay's hook, at once),
//! and, from [`CounterWatch`] over the counters every [`EVENT_POLL`], `uplink_lost` /
//! `uplink_restored`, `uplink_redirected` / `uplink_returned`, `vif_bound` / `vif_lost`. The
//! socket is created mode 0600; at most 16 connections are served at once.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use xenft_control::netback::{Counters, Event, Reply, Request};
use xenft_control::{ErrorReply, Events, Netback, Server, ServerOptions};

use crate::shim::Shim;

/// How often the counters are compared for events.
pub const EVENT_POLL: Duration = Duration::from_millis(50);

/// Applies one request to the relay.
///
/// # Errors
/// `refused` when the relay refuses (an epoch out of order, a call for another mode).
pub fn handle(shim: &Shim, req: Request) -> Result<Reply, ErrorReply> {
    match req {
        Request::BeginEpoch { epoch } => shim
            .begin_epoch(epoch)
            .map(|()| Reply::Done)
            .map_err(ErrorReply::refused),
        Request::Commit { epoch } => shim
            .commit(epoch)
            .map(|n| Reply::Released { released: n as u64 })
            .map_err(ErrorReply::refused),
        Request::Discard => Ok(Reply::Discarded {
            discarded: shim.discard() as u64,
        }),
        Request::SetMode { mode } => {
            shim.set_mode(mode);
            Ok(Reply::Done)
        }
        Request::Takeover { mode } => Ok(Reply::Announced {
            announced: shim.takeover(mode) as u64,
        }),
        Request::Announce => Ok(Reply::Announced {
            announced: shim.announce() as u64,
        }),
        Request::Redirect { on } => {
            shim.set_redirect(on);
            Ok(Reply::Done)
        }
        Request::AddAddresses { addresses } => {
            shim.add_addresses(&addresses);
            Ok(Reply::Done)
        }
        Request::Isolate { on } => {
            shim.set_isolated(on);
            Ok(Reply::Done)
        }
        Request::Counters => Ok(Reply::Counters {
            counters: Box::new(shim.counters()),
        }),
    }
}

/// Turns changes of the relay's counters into events (pure: fed one snapshot at a time).
#[derive(Debug, Default)]
pub struct CounterWatch {
    last: Option<Counters>,
}

impl CounterWatch {
    /// The events between the last snapshot and `c`. The first snapshot reports only what is
    /// wrong already (an uplink down, a redirect running).
    pub fn observe(&mut self, uplink: &str, c: &Counters) -> Vec<Event> {
        let mut out = Vec::new();
        let was = self.last.as_ref();
        let up = c.redirect.uplink_up;
        match (was.map(|w| w.redirect.uplink_up), up) {
            (Some(true) | None, false) => out.push(Event::UplinkLost {
                uplink: uplink.to_string(),
            }),
            (Some(false), true) => out.push(Event::UplinkRestored {
                uplink: uplink.to_string(),
            }),
            _ => {}
        }
        let was_redirecting = was.is_some_and(|w| w.redirect.redirecting);
        match (was_redirecting, c.redirect.redirecting, c.redirect.reason) {
            (false, true, Some(reason)) => out.push(Event::UplinkRedirected { reason }),
            (true, false, _) => out.push(Event::UplinkReturned),
            _ => {}
        }
        if let Some(w) = was {
            if c.vif_losses > w.vif_losses {
                out.push(Event::VifLost);
            }
            if c.vif_binds > w.vif_binds {
                if let Some(ifindex) = c.vif_ifindex {
                    out.push(Event::VifBound { ifindex });
                }
            }
        }
        self.last = Some(c.clone());
        out
    }
}

/// The control socket server. Dropping it stops accepting, stops the event watch and removes
/// the socket file.
#[derive(Debug)]
pub struct ControlServer {
    _server: Server,
    stop: Arc<AtomicBool>,
    watch: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path` (replacing a stale socket file) and serves requests for `shim`. It
    /// also installs the shim's early-checkpoint hook and starts the counter watch, which feed
    /// subscribed connections.
    ///
    /// # Errors
    /// When the socket cannot be bound or a thread cannot start.
    pub fn start(shim: Arc<Shim>, path: &Path) -> io::Result<ControlServer> {
        let events: Arc<Events<Event>> = Events::new();
        {
            let events = Arc::clone(&events);
            shim.set_early_checkpoint_hook(Arc::new(move |epoch| {
                events.publish(&Event::EarlyCheckpoint { epoch });
            }));
        }
        let on_connection = shim.realtime_priority().map(|p| {
            Arc::new(move || {
                if let Err(e) = crate::sys::set_realtime_priority(p) {
                    tracing::debug!(error = %e, "control thread stays on the default scheduler");
                }
            }) as xenft_control::server::ConnectionHook
        });
        let handler = {
            let shim = Arc::clone(&shim);
            move |req| handle(&shim, req)
        };
        let server = Server::start::<Netback, _>(
            path,
            Arc::new(handler),
            Arc::clone(&events),
            ServerOptions {
                on_connection,
                ..ServerOptions::default()
            },
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let watch = std::thread::Builder::new()
            .name("netback-events".into())
            .spawn(move || {
                let mut w = CounterWatch::default();
                let uplink = shim.uplink_name().to_string();
                while !stop2.load(Ordering::Relaxed) {
                    for e in w.observe(&uplink, &shim.counters()) {
                        tracing::info!(event = ?e, "netback event");
                        events.publish(&e);
                    }
                    std::thread::sleep(EVENT_POLL);
                }
            })?;
        Ok(ControlServer {
            _server: server,
            stop,
            watch: Some(watch),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.watch.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenft_control::netback::RedirectReason;

    fn counters(up: bool) -> Counters {
        let mut c = Counters::default();
        c.redirect.uplink_up = up;
        c
    }

    #[test]
    fn a_healthy_start_says_nothing_and_a_lost_uplink_is_said_once() {
        let mut w = CounterWatch::default();
        assert!(w.observe("eth0", &counters(true)).is_empty());
        assert_eq!(
            w.observe("eth0", &counters(false)),
            vec![Event::UplinkLost {
                uplink: "eth0".into()
            }]
        );
        assert!(w.observe("eth0", &counters(false)).is_empty());
        assert_eq!(
            w.observe("eth0", &counters(true)),
            vec![Event::UplinkRestored {
                uplink: "eth0".into()
            }]
        );
    }

    #[test]
    fn a_relay_started_without_uplink_reports_it_at_once() {
        let mut w = CounterWatch::default();
        assert_eq!(
            w.observe("eth0", &counters(false)),
            vec![Event::UplinkLost {
                uplink: "eth0".into()
            }]
        );
    }

    #[test]
    fn a_redirect_and_its_end_are_events_with_the_cause() {
        let mut w = CounterWatch::default();
        w.observe("eth0", &counters(true));
        let mut c = counters(false);
        c.redirect.redirecting = true;
        c.redirect.reason = Some(RedirectReason::Carrier);
        assert_eq!(
            w.observe("eth0", &c),
            vec![
                Event::UplinkLost {
                    uplink: "eth0".into()
                },
                Event::UplinkRedirected {
                    reason: RedirectReason::Carrier
                }
            ]
        );
        assert_eq!(
            w.observe("eth0", &counters(true)),
            vec![
                Event::UplinkRestored {
                    uplink: "eth0".into()
                },
                Event::UplinkReturned
            ]
        );
    }

    #[test]
    fn the_vif_coming_and_going_are_events() {
        let mut w = CounterWatch::default();
        let mut c = counters(true);
        w.observe("eth0", &c);
        c.vif_losses = 1;
        c.vif_ifindex = None;
        assert_eq!(w.observe("eth0", &c), vec![Event::VifLost]);
        c.vif_binds = 2;
        c.vif_ifindex = Some(42);
        assert_eq!(w.observe("eth0", &c), vec![Event::VifBound { ifindex: 42 }]);
    }
}
