//! The control socket the agent uses: one text command per line, one JSON line back.
//!
//! Commands:
//! - `status` → the node's status (plus `alink`, the A-link's path status, when this process
//!   runs one) (role, link state, dirty bytes, resync progress with bytes
//!   left / rate / ETA, local store failure cause, counters);
//! - `resync-rate <bytes/s>` → sets the resync rate limit (0 = unlimited);
//! - `verify [block]` (primary) → online verify by block checksums (default 64 KiB blocks):
//!   `{"verify":{"bytes_checked","differing":[[offset,len],..],"differing_bytes"}}`;
//! - `checkpoint <n>` (primary) → checkpoint boundary: later writes belong to epoch `n + 1`
//!   (the checkpoint engine's `CommitSink::checkpoint`);
//! - `epoch <n>` (primary) → stamps subsequent writes with epoch `n`;
//! - `commit <n>` (primary) → commits epoch `n` on the secondary, replies when applied;
//! - `epoch-mode on|off` (secondary) → hold writes per epoch;
//! - `commit-local <n>` (secondary) → applies held epochs `<= n`;
//! - `discard` (secondary) → failover: drops uncommitted epochs.
//!
//! Replies are `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use crate::mirror::primary::Primary;
use crate::mirror::secondary::Secondary;

/// What this process is.
#[derive(Clone)]
pub enum Node {
    /// Serving the disk without a peer.
    Local,
    /// Serving the disk and mirroring it.
    Primary(Arc<Primary>),
    /// Holding the copy.
    Secondary(Arc<Secondary>),
}

impl Node {
    /// The status JSON.
    pub fn status(&self) -> Value {
        match self {
            Self::Local => json!({"ok": true, "role": "local"}),
            Self::Primary(p) => json!({"ok": true, "role": "primary", "primary": p.status()}),
            Self::Secondary(s) => {
                json!({"ok": true, "role": "secondary", "secondary": s.status()})
            }
        }
    }

    /// Executes one command line.
    pub async fn command(&self, line: &str) -> Value {
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let arg = words.next();
        let num = || arg.and_then(|a| a.parse::<u64>().ok());
        let err = |e: &str| json!({"ok": false, "error": e});
        match (cmd, self) {
            ("status", _) => self.status(),
            ("resync-rate", Self::Primary(p)) => match num() {
                Some(n) => {
                    p.set_resync_rate(n);
                    json!({"ok": true})
                }
                None => err("resync-rate needs bytes per second"),
            },
            ("verify", Self::Primary(p)) => {
                let block = num().unwrap_or(64 * 1024);
                match p.verify(block).await {
                    Ok(r) => json!({"ok": true, "verify": r}),
                    Err(e) => err(&e.to_string()),
                }
            }
            ("checkpoint", Self::Primary(p)) => match num() {
                Some(n) => {
                    p.checkpoint_boundary(n);
                    json!({"ok": true, "epoch": n.saturating_add(1)})
                }
                None => err("checkpoint needs an epoch"),
            },
            ("epoch", Self::Primary(p)) => match num() {
                Some(n) => {
                    p.set_epoch(n);
                    json!({"ok": true})
                }
                None => err("epoch needs a number"),
            },
            ("commit", Self::Primary(p)) => match num() {
                Some(n) => {
                    let t = p.commit_epoch(n);
                    match t.await {
                        Ok(Ok(())) => json!({"ok": true}),
                        _ => err("commit failed"),
                    }
                }
                None => err("commit needs an epoch"),
            },
            ("epoch-mode", Self::Secondary(s)) => match arg {
                Some("on") => {
                    s.set_epoch_mode(true);
                    json!({"ok": true})
                }
                Some("off") => {
                    s.set_epoch_mode(false);
                    json!({"ok": true})
                }
                _ => err("epoch-mode on|off"),
            },
            ("commit-local", Self::Secondary(s)) => match num() {
                Some(n) => {
                    let s = s.clone();
                    match tokio::task::spawn_blocking(move || s.commit_epoch(n)).await {
                        Ok(Ok(applied)) => json!({"ok": true, "applied": applied}),
                        Ok(Err(e)) => err(&e.to_string()),
                        Err(_) => err("commit task failed"),
                    }
                }
                None => err("commit-local needs an epoch"),
            },
            ("discard", Self::Secondary(s)) => {
                json!({"ok": true, "discarded": s.discard_uncommitted()})
            }
            _ => err("unknown command for this role"),
        }
    }

    /// Serves the control socket until the listener fails. With `link` (the process's own
    /// A-link), `status` replies also carry `"alink"`: per-path liveness and counters.
    pub async fn serve(
        self,
        listener: UnixListener,
        link: Option<xenft_alink::Link>,
    ) -> std::io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            let me = self.clone();
            let link = link.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut lines = BufReader::new(rd.take(64 * 1024)).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut v = me.command(&line).await;
                    if let (Some(l), Some(obj)) = (&link, v.as_object_mut()) {
                        if line.trim() == "status" {
                            obj.insert("alink".into(), json!(l.status()));
                        }
                    }
                    let mut out = v.to_string();
                    out.push('\n');
                    if wr.write_all(out.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
}

use tokio::io::AsyncReadExt as _;
