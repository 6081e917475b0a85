//! What the components push, into the decision core: one follower thread per VM and
//! component subscribes to the component's events (the control contract's subscription) and
//! turns the ones that matter into [`Input::Component`] — failure class (d): a local disk or
//! uplink failed and its I/O goes through the peer, no failover.
//!
//! | component event | input |
//! |---|---|
//! | blkback `disk_redirected {cause}` | disk failed (`ok: false`), with the store's error |
//! | netback `uplink_lost {uplink}` / `uplink_redirected {reason}` | uplink failed (`ok: false`) |
//! | netback `uplink_restored` / `uplink_returned` | uplink works again (`ok: true`) |
//!
//! Every event is logged with its VM. A component that is not there yet, stops or restarts is
//! subscribed to again with backoff (200 ms doubling to 5 s); a follower ends when told to stop.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc;
use xenft_control::{blkback, netback, Blkback, Client, Component as Contract, Netback};

use super::VmDriversFile;
use crate::core::Input;
use crate::decision::Component;
use crate::ids::VmId;

/// First retry delay after a failed subscription; doubled up to [`MAX_BACKOFF`].
const BACKOFF: Duration = Duration::from_millis(200);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a follower waits for an event before it checks whether to stop.
const WAIT: Duration = Duration::from_millis(200);

fn component(vm: &VmId, component: Component, ok: bool, detail: String) -> Input {
    Input::Component {
        vm: Some(vm.clone()),
        component,
        ok,
        detail,
    }
}

/// The input a blkback event means for `vm`, if any.
#[must_use]
pub fn blkback_input(vm: &VmId, e: &blkback::Event) -> Option<Input> {
    match e {
        blkback::Event::DiskRedirected { cause } => Some(component(
            vm,
            Component::Disk,
            false,
            format!("blkback: local store failed ({cause}); disk served from the peer's copy"),
        )),
        blkback::Event::PeerLost { .. }
        | blkback::Event::ResyncProgress(_)
        | blkback::Event::InSync
        | blkback::Event::Promoted { .. } => None,
    }
}

/// The input a netback event means for `vm`, if any.
#[must_use]
pub fn netback_input(vm: &VmId, e: &netback::Event) -> Option<Input> {
    match e {
        netback::Event::UplinkLost { uplink } => Some(component(
            vm,
            Component::Uplink,
            false,
            format!("netback: uplink {uplink} lost its carrier"),
        )),
        netback::Event::UplinkRedirected { reason } => Some(component(
            vm,
            Component::Uplink,
            false,
            format!("netback: the VM's frames leave through the peer ({reason:?})"),
        )),
        netback::Event::UplinkRestored { uplink } => Some(component(
            vm,
            Component::Uplink,
            true,
            format!("netback: uplink {uplink} has its carrier again"),
        )),
        netback::Event::UplinkReturned => Some(component(
            vm,
            Component::Uplink,
            true,
            "netback: the VM's frames leave through the local uplink again".into(),
        )),
        netback::Event::EarlyCheckpoint { .. }
        | netback::Event::VifBound { .. }
        | netback::Event::VifLost => None,
    }
}

/// Follows the events of every configured component until `stop`; returns the threads.
///
/// # Errors
/// When a thread cannot be started.
pub fn follow(
    vms: &BTreeMap<VmId, VmDriversFile>,
    inputs: &mpsc::Sender<Input>,
    stop: &Arc<AtomicBool>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    for (vm, d) in vms {
        if let Some(b) = &d.blkback {
            let c = Client::<Blkback>::new(&b.control, Duration::from_millis(b.request_timeout_ms));
            threads.push(spawn(c, vm, inputs, stop, blkback_input)?);
        }
        if let Some(n) = &d.netback {
            let c = Client::<Netback>::new(&n.control, Duration::from_millis(n.request_timeout_ms));
            threads.push(spawn(c, vm, inputs, stop, netback_input)?);
        }
    }
    Ok(threads)
}

/// Follows the events of component `name` (`blkback` or `netback`) of one VM at `sock` (a
/// component the agent supervises) until `stop`; `None` for a component without events the
/// core acts on.
///
/// # Errors
/// When the thread cannot be started.
pub fn follow_supervised(
    name: &str,
    vm: &VmId,
    sock: &std::path::Path,
    timeout: Duration,
    inputs: &mpsc::Sender<Input>,
    stop: &Arc<AtomicBool>,
) -> Option<std::io::Result<JoinHandle<()>>> {
    Some(match name {
        "blkback" => spawn(
            Client::<Blkback>::new(sock, timeout),
            vm,
            inputs,
            stop,
            blkback_input,
        ),
        "netback" => spawn(
            Client::<Netback>::new(sock, timeout),
            vm,
            inputs,
            stop,
            netback_input,
        ),
        _ => return None,
    })
}

fn spawn<C: Contract>(
    client: Client<C>,
    vm: &VmId,
    inputs: &mpsc::Sender<Input>,
    stop: &Arc<AtomicBool>,
    map: fn(&VmId, &C::Event) -> Option<Input>,
) -> std::io::Result<JoinHandle<()>> {
    let (vm, inputs, stop) = (vm.clone(), inputs.clone(), Arc::clone(stop));
    std::thread::Builder::new()
        .name(format!("events-{}-{}", C::NAME, vm.as_str()))
        .spawn(move || follow_one(&client, &vm, &inputs, &stop, map))
}

fn follow_one<C: Contract>(
    client: &Client<C>,
    vm: &VmId,
    inputs: &mpsc::Sender<Input>,
    stop: &AtomicBool,
    map: fn(&VmId, &C::Event) -> Option<Input>,
) {
    let mut backoff = BACKOFF;
    let mut said = false;
    while !stop.load(Ordering::Relaxed) {
        let mut sub = match client.subscribe() {
            Ok(s) => s,
            Err(e) => {
                if !said {
                    tracing::info!(%vm, component = C::NAME, error = %e, "no event subscription yet: retrying");
                    said = true;
                }
                sleep_unless(stop, backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        tracing::info!(%vm, component = C::NAME, "following the component's events");
        (backoff, said) = (BACKOFF, false);
        while !stop.load(Ordering::Relaxed) {
            match sub.next_within(WAIT) {
                Ok(Some(e)) => {
                    tracing::warn!(%vm, component = C::NAME, event = ?e, "component event");
                    if let Some(input) = map(vm, &e) {
                        if inputs.blocking_send(input).is_err() {
                            return; // the agent stopped
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%vm, component = C::NAME, error = %e, "event stream ended: subscribing again");
                    break;
                }
            }
        }
    }
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = std::time::Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
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
    fn a_failed_disk_and_a_lost_uplink_are_component_faults_with_their_cause() {
        let i = blkback_input(
            &vm(),
            &blkback::Event::DiskRedirected {
                cause: "Read of 4096 bytes at offset 0: truncated".into(),
            },
        );
        assert!(matches!(
            i,
            Some(Input::Component { component: Component::Disk, ok: false, ref detail, .. })
                if detail.contains("truncated")
        ));
        let i = netback_input(
            &vm(),
            &netback::Event::UplinkLost {
                uplink: "eth0".into(),
            },
        );
        assert!(matches!(
            i,
            Some(Input::Component { component: Component::Uplink, ok: false, ref detail, .. })
                if detail.contains("eth0")
        ));
        assert!(matches!(
            netback_input(&vm(), &netback::Event::UplinkReturned),
            Some(Input::Component { ok: true, .. })
        ));
        assert!(blkback_input(&vm(), &blkback::Event::InSync).is_none());
        assert!(netback_input(&vm(), &netback::Event::EarlyCheckpoint { epoch: 3 }).is_none());
    }

    #[test]
    fn a_follower_waits_for_its_component_and_forwards_what_it_pushes() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("net.ctl");
        let (tx, mut rx) = mpsc::channel(8);
        let stop = Arc::new(AtomicBool::new(false));
        let client = Client::<Netback>::new(&path, Duration::from_secs(2));
        let t = spawn(client, &vm(), &tx, &stop, netback_input).unwrap();
        // The component starts after its follower.
        std::thread::sleep(Duration::from_millis(300));
        let events: Arc<xenft_control::Events<netback::Event>> = xenft_control::Events::new();
        let f = fake::serve_at_with_events::<Netback>(&path, Arc::clone(&events));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while events.subscriber_count() == 0 {
            assert!(std::time::Instant::now() < deadline, "never subscribed");
            std::thread::sleep(Duration::from_millis(20));
        }
        events.publish(&netback::Event::UplinkLost {
            uplink: "up0".into(),
        });
        let got = rx.blocking_recv().unwrap();
        assert!(matches!(
            got,
            Input::Component {
                component: Component::Uplink,
                ok: false,
                ..
            }
        ));
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        drop(f);
    }
}
