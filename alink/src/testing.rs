//! Helpers for tests and benchmarks of the crates that use links.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::TcpListener;

use crate::{Link, LinkConfig, LinkError, PathConfig};

/// A secret good enough for tests.
pub const TEST_SECRET: &[u8] = b"xenft test pool secret, 32 bytes";

/// Two configurations joined by `paths` loopback paths, with the accepting side's listeners
/// already bound (free ports chosen by the kernel). `host_a` dials, `host_b` accepts.
///
/// # Errors
/// When a loopback port cannot be bound.
pub async fn loopback_configs(
    paths: usize,
) -> Result<(LinkConfig, LinkConfig, Vec<TcpListener>), LinkError> {
    let lo = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut listeners = Vec::new();
    let mut a_paths = Vec::new();
    let mut b_paths = Vec::new();
    for _ in 0..paths {
        let l = TcpListener::bind(lo)
            .await
            .map_err(|source| LinkError::Bind { addr: lo, source })?;
        let addr = l
            .local_addr()
            .map_err(|source| LinkError::Bind { addr: lo, source })?;
        a_paths.push(PathConfig {
            local: lo,
            peer: addr,
        });
        b_paths.push(PathConfig {
            local: addr,
            peer: lo,
        });
        listeners.push(l);
    }
    Ok((
        LinkConfig::new("host-a", "host-b", TEST_SECRET, a_paths),
        LinkConfig::new("host-b", "host-a", TEST_SECRET, b_paths),
        listeners,
    ))
}

/// Two started links joined over `paths` loopback paths (`.0` dials, `.1` accepts).
///
/// # Errors
/// When a loopback port cannot be bound.
pub async fn loopback_pair(paths: usize) -> Result<(Link, Link), LinkError> {
    let (a, b, listeners) = loopback_configs(paths).await?;
    let lb = Link::start_with_listeners(b, listeners)?;
    let la = Link::start_with_listeners(a, Vec::new())?;
    Ok((la, lb))
}
