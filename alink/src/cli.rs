//! The A-link's command-line options, shared by the binaries that talk to a peer host over
//! a link (`xenft-blkback`, `xenft-checkpoint`): flatten [`AlinkArgs`] into a clap parser and
//! turn it into a validated [`LinkConfig`] with [`AlinkArgs::link_config`].
//!
//! ```text
//! --alink-path LOCAL_IP:PORT=PEER_IP:PORT   (repeat: one per path)
//! --host NAME --peer-host NAME --secret-file FILE (>= 16 bytes) [--alink-path-timeout-ms MS]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use crate::{LinkConfig, LinkError, PathConfig};

/// Longest secret file read (the secret itself needs only 16 bytes).
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// The A-link options. `--alink-path` requires `--host`, `--peer-host` and `--secret-file`
/// (clap reports the missing one); a path that is not `LOCAL=PEER` socket addresses is a
/// clap error naming it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AlinkArgs {
    /// A-link transport: one path as LOCAL_ADDR=PEER_ADDR (repeat for each path).
    #[arg(
        long = "alink-path",
        value_name = "LOCAL=PEER",
        value_parser = parse_path,
        requires_all = ["host", "peer_host", "secret_file"]
    )]
    pub alink_paths: Vec<PathConfig>,
    /// A-link: this host's name.
    #[arg(long)]
    pub host: Option<String>,
    /// A-link: the peer host's name.
    #[arg(long)]
    pub peer_host: Option<String>,
    /// A-link: file holding the pool secret (at least 16 bytes).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// A-link: a path silent this long is down (milliseconds; default: the link's own).
    #[arg(long)]
    pub alink_path_timeout_ms: Option<u64>,
}

/// The A-link options do not make a usable link.
#[derive(Debug, thiserror::Error)]
pub enum AlinkArgsError {
    /// `--alink-path` without one of the options it needs (when not parsed by clap).
    #[error("--alink-path needs {0}")]
    Missing(&'static str),
    /// The secret file cannot be read.
    #[error("reading the secret file {path}: {source}")]
    Secret {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The secret file is larger than any secret.
    #[error("the secret file {0} is larger than {MAX_SECRET_FILE} bytes")]
    SecretTooLarge(PathBuf),
    /// The resulting configuration is invalid (short secret, same host names, ...).
    #[error(transparent)]
    Config(#[from] LinkError),
}

/// Parses one `--alink-path` value, `LOCAL_IP:PORT=PEER_IP:PORT`.
///
/// # Errors
/// A message naming what is wrong with `s`.
pub fn parse_path(s: &str) -> Result<PathConfig, String> {
    let (l, r) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected LOCAL_IP:PORT=PEER_IP:PORT"))?;
    Ok(PathConfig {
        local: l
            .trim()
            .parse()
            .map_err(|_| format!("bad local address {l:?} (expected IP:PORT)"))?,
        peer: r
            .trim()
            .parse()
            .map_err(|_| format!("bad peer address {r:?} (expected IP:PORT)"))?,
    })
}

impl AlinkArgs {
    /// Whether an A-link was asked for (at least one `--alink-path`).
    #[must_use]
    pub fn is_set(&self) -> bool {
        !self.alink_paths.is_empty()
    }

    /// The link configuration, `None` without `--alink-path`. Reads the secret file.
    ///
    /// # Errors
    /// [`AlinkArgsError`] naming the missing option, unreadable secret or invalid setting.
    pub fn link_config(&self) -> Result<Option<LinkConfig>, AlinkArgsError> {
        if !self.is_set() {
            return Ok(None);
        }
        let host = self.host.clone().ok_or(AlinkArgsError::Missing("--host"))?;
        let peer = self
            .peer_host
            .clone()
            .ok_or(AlinkArgsError::Missing("--peer-host"))?;
        let path = self
            .secret_file
            .clone()
            .ok_or(AlinkArgsError::Missing("--secret-file"))?;
        let secret = read_secret(&path)?;
        let mut cfg = LinkConfig::new(host, peer, secret, self.alink_paths.clone());
        if let Some(ms) = self.alink_path_timeout_ms {
            cfg.path_timeout = Duration::from_millis(ms);
        }
        cfg.validate()?;
        Ok(Some(cfg))
    }
}

fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, AlinkArgsError> {
    use std::io::Read;
    let err = |source| AlinkArgsError::Secret {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut secret = Vec::new();
    f.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut secret)
        .map_err(err)?;
    if u64::try_from(secret.len()).unwrap_or(u64::MAX) > MAX_SECRET_FILE {
        return Err(AlinkArgsError::SecretTooLarge(path.to_path_buf()));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        link: AlinkArgs,
    }

    #[test]
    fn a_path_is_two_socket_addresses_joined_by_equals() {
        let p = parse_path("10.0.0.1:7400=10.0.0.2:7400").unwrap();
        assert_eq!(p.local, "10.0.0.1:7400".parse().unwrap());
        assert_eq!(p.peer, "10.0.0.2:7400".parse().unwrap());
        assert!(parse_path("10.0.0.1:7400")
            .unwrap_err()
            .contains("expected"));
        assert!(parse_path("10.0.0.1=10.0.0.2:1")
            .unwrap_err()
            .contains("local"));
    }

    #[test]
    fn alink_path_without_host_is_a_clap_error() {
        let e = Cli::try_parse_from(["x", "--alink-path", "127.0.0.1:1=127.0.0.1:2"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("--host"), "{e}");
    }

    #[test]
    fn full_options_give_a_validated_config() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"0123456789abcdef").unwrap();
        let cli = Cli::try_parse_from([
            "x",
            "--alink-path",
            "127.0.0.1:1=127.0.0.1:2",
            "--alink-path",
            "127.0.0.1:3=127.0.0.1:4",
            "--host",
            "a",
            "--peer-host",
            "b",
            "--secret-file",
            secret.to_str().unwrap(),
            "--alink-path-timeout-ms",
            "900",
        ])
        .unwrap();
        let cfg = cli.link.link_config().unwrap().unwrap();
        assert_eq!(cfg.paths.len(), 2);
        assert_eq!(cfg.path_timeout, Duration::from_millis(900));
        std::fs::write(&secret, b"short").unwrap();
        assert!(matches!(
            cli.link.link_config(),
            Err(AlinkArgsError::Config(_))
        ));
    }
}
