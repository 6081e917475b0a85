//! # xenft-netback: the userspace packet relay
//!
//! Sits between a protected VM's vif and the uplink bridge. Holds the VM's output per
//! checkpoint epoch until the epoch commits (level 3), announces a takeover with the same MAC
//! and IP (gratuitous ARP, unsolicited NA), and tunnels frames over the `alink` when the local
//! uplink fails (level 2).
//!
//! Data path: VM → vif → **this crate** → bridge/uplink (or A-link → peer's shim → its uplink).
