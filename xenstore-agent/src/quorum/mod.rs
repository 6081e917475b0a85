//! Quorum: who may run a VM when hosts cannot hear each other.
//!
//! - [`table`]: the lease table of one quorum server (pure);
//! - [`wire`]: the HMAC-authenticated, length-bounded frame;
//! - [`server`] and [`client`]: the TCP server (`xenft-quorum`) and the hosts' client.
//!
//! ## Zero, one or two quorum servers
//! - **One server**: a host must hold that server's lease to take a VM over; the running
//!   primary keeps its copy while it holds the lease *or* a live promise from its peer (see
//!   [`crate::core`]). A partitioned primary that has neither pauses its copy (self-fence).
//! - **Two servers (preferred, alternate)**: a take-over needs grants from *both*, acquired in
//!   order (preferred first, so two claimants never hold one server each); the primary keeps
//!   running while it holds *either* lease (or the peer's promise). Any grant set of the
//!   claimant and any lease set of the primary would have to intersect, and a server never
//!   grants one VM to two hosts at once, so at most one side runs. The price: while one quorum
//!   server is down, a dead primary is not taken over (a double fault); in exchange, losing
//!   one quorum server never stops a running VM. Split-site pools put the servers in a third
//!   site; the rules are the same.
//! - **No server** (two-host pool on direct A-links): the primary keeps running; the secondary
//!   promotes only when the primary is silent on every A-link, on the management network *and*
//!   on the storage heartbeat. Trade-off: this favours the running primary. A primary cut off
//!   from every network but still writing its storage heartbeat is never replaced (no split
//!   brain, but a primary that is alive-yet-useless stays in charge until an operator acts).
//!   Without a storage heartbeat configured, a primary cut off from the A-links and the
//!   management network looks exactly like a dead one and the secondary takes over while the
//!   primary still runs: **a split brain is possible**. Configure a storage heartbeat or a
//!   quorum server whenever the two hosts' networks can fail together.
//!
//! Every design above assumes a VM copy stops when its agent stops (the shims refuse I/O
//! without their agent and a host watchdog resets a host whose agent hangs); otherwise a dead
//! agent's VM would keep running after its leases expired.

pub mod client;
pub mod server;
pub mod table;
pub mod wire;
