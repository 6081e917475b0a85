//! The VM's service: a write-ahead record store on the VM's (mirrored) disk.
//!
//! Protocol: one ASCII line per request, one line per answer, on TCP port
//! [`crate::topology::SERVICE_PORT`] of the service address.
//! - `PUT n` stores record `n` (1 ≤ n < capacity) in sector `n` with FUA and answers `OK n`
//!   only after the write completed — on a mirrored disk, on both copies.
//! - `GET` answers `COUNT c HOST h` (highest record stored).
//! - `CHECK a b` reads records `a..=b` back and answers `CHECKED k MISSING m FIRST x` (x = 0
//!   when nothing is missing).
//!
//! After a takeover the counter is recovered from the disk (the first missing record ends the
//! scan; the client writes records in order).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use xenft_blkback::nbd::client::NbdClient;

use crate::LabError;

/// Record size (one sector).
pub const RECORD: u64 = 512;
const MAGIC: &[u8; 8] = b"XFTLREC1";
/// Longest request line accepted.
const MAX_LINE: u64 = 128;
/// Most records one CHECK may read.
pub const MAX_CHECK: u64 = 1 << 20;

/// The exact bytes of record `n`.
#[must_use]
pub fn record(n: u64) -> Vec<u8> {
    let mut r = vec![0u8; 512];
    r[..8].copy_from_slice(MAGIC);
    r[8..16].copy_from_slice(&n.to_le_bytes());
    for (i, b) in r.iter_mut().enumerate().skip(16) {
        let v = n.wrapping_mul(31).wrapping_add(i as u64);
        *b = v.to_le_bytes()[0];
    }
    r
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Store record n.
    Put(u64),
    /// Highest stored record.
    Get,
    /// Verify records a..=b.
    Check(u64, u64),
}

/// Parses one request line; `capacity` is the number of records the disk holds.
pub fn parse(line: &str, capacity: u64) -> Result<Request, String> {
    let mut w = line.split_whitespace();
    let num = |s: Option<&str>| -> Result<u64, String> {
        s.ok_or("missing number")?
            .parse::<u64>()
            .map_err(|e| format!("bad number: {e}"))
    };
    let req = match w.next() {
        Some("PUT") => Request::Put(num(w.next())?),
        Some("GET") => Request::Get,
        Some("CHECK") => Request::Check(num(w.next())?, num(w.next())?),
        Some(other) => return Err(format!("unknown request {other:?}")),
        None => return Err("empty request".into()),
    };
    if w.next().is_some() {
        return Err("trailing words".into());
    }
    match req {
        Request::Put(n) if n == 0 || n >= capacity => {
            Err(format!("record {n} out of range 1..{capacity}"))
        }
        Request::Check(a, b) if a == 0 || b >= capacity || a > b || b - a >= MAX_CHECK => {
            Err(format!("bad range {a}..={b}"))
        }
        r => Ok(r),
    }
}

/// The VM's disk as its service sees it: the export of the host's `xenft-blkback` over NBD,
/// one request at a time (a write is acknowledged once blkback acknowledged it: on a mirrored
/// disk, on both copies).
pub struct NbdDisk {
    client: tokio::sync::Mutex<NbdClient<UnixStream>>,
    size: u64,
    sock: std::path::PathBuf,
}

impl NbdDisk {
    /// Connects to the export `xenft` on the NBD socket `sock`.
    ///
    /// # Errors
    /// [`LabError::Component`] when the export cannot be reached or negotiated.
    pub async fn connect(sock: &std::path::Path) -> Result<Self, LabError> {
        let client = NbdClient::connect_unix(sock, "xenft")
            .await
            .map_err(|e| LabError::component("NBD client", e))?;
        Ok(Self {
            size: client.size,
            client: tokio::sync::Mutex::new(client),
            sock: sock.to_path_buf(),
        })
    }

    /// After a failed request: connects again (blkback was restarted — e.g. the VM was
    /// unprotected and protected again — and serves the same disk on the same socket).
    async fn reconnect(&self, c: &mut NbdClient<UnixStream>) -> bool {
        match NbdClient::connect_unix(&self.sock, "xenft").await {
            Ok(n) if n.size == self.size => {
                *c = n;
                true
            }
            _ => false,
        }
    }

    /// The disk's size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, String> {
        let mut c = self.client.lock().await;
        match c.read(offset, len).await {
            Ok(b) => Ok(b),
            Err(e) if self.reconnect(&mut c).await => {
                tracing::warn!(error = %e, "disk reconnected");
                c.read(offset, len).await.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    async fn write(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        let mut c = self.client.lock().await;
        match c.write(offset, data, true).await {
            Ok(()) => Ok(()),
            // The same record written again on the new connection: a write is idempotent.
            Err(e) if self.reconnect(&mut c).await => {
                tracing::warn!(error = %e, "disk reconnected");
                c.write(offset, data, true).await.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The running service.
pub struct Service {
    volume: Arc<NbdDisk>,
    count: AtomicU64,
    host: &'static str,
    fenced: std::sync::atomic::AtomicBool,
}

impl Service {
    /// A service on `volume`, recovering its counter from the records on it.
    pub async fn recover(volume: Arc<NbdDisk>, host: &'static str) -> Arc<Self> {
        let s = Arc::new(Self {
            volume,
            count: AtomicU64::new(0),
            host,
            fenced: std::sync::atomic::AtomicBool::new(false),
        });
        let mut n = 1;
        while n < s.capacity() && s.has(n).await {
            n += 1;
        }
        s.count.store(n - 1, Ordering::SeqCst);
        s
    }

    /// Records the disk holds.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.volume.size() / RECORD
    }

    /// Fences (`true`) or unfences the service: a fenced service closes every connection at
    /// its next request instead of answering.
    pub fn set_fenced(&self, on: bool) {
        self.fenced.store(on, Ordering::SeqCst);
    }

    /// Highest record stored.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    async fn has(&self, n: u64) -> bool {
        let len = u32::try_from(RECORD).unwrap_or(512);
        matches!(self.volume.read(n * RECORD, len).await, Ok(b) if b[..] == record(n)[..])
    }

    async fn answer(&self, line: &str) -> String {
        match parse(line, self.capacity()) {
            Err(e) => format!("ERR {e}"),
            Ok(Request::Put(n)) => match self.volume.write(n * RECORD, &record(n)).await {
                Ok(()) => {
                    self.count.fetch_max(n, Ordering::SeqCst);
                    format!("OK {n}")
                }
                Err(e) => format!("ERR write failed: {e}"),
            },
            Ok(Request::Get) => format!("COUNT {} HOST {}", self.count(), self.host),
            Ok(Request::Check(a, b)) => {
                let (mut missing, mut first) = (0u64, 0u64);
                for n in a..=b {
                    if !self.has(n).await {
                        missing += 1;
                        if first == 0 {
                            first = n;
                        }
                    }
                }
                format!("CHECKED {} MISSING {missing} FIRST {first}", b - a + 1)
            }
        }
    }

    /// Serves connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(rd.take(64 * 1024 * 1024)).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if me.fenced.load(Ordering::SeqCst) {
                        return; // a fenced copy answers nobody
                    }
                    if line.len() as u64 > MAX_LINE {
                        let _ = wr.write_all(b"ERR line too long\n").await;
                        return;
                    }
                    let mut out = me.answer(&line).await;
                    out.push('\n');
                    if wr.write_all(out.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
}

/// A blocking connection to the service (client and drill side).
pub struct Conn {
    rd: BufReader<TcpStream>,
    wr: TcpStream,
}

impl Conn {
    /// Connects with `timeout` for the connect and each answer.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<Self> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(Self {
            rd: BufReader::new(s.try_clone()?),
            wr: s,
        })
    }

    /// Sends one request and reads the answer line.
    pub fn ask(&mut self, req: &str) -> std::io::Result<String> {
        self.wr.write_all(format!("{req}\n").as_bytes())?;
        let mut line = String::new();
        let n = (&mut self.rd).take(4096).read_line(&mut line)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim().to_owned())
    }
}

/// Result of a `CHECK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CheckResult {
    /// Records read.
    pub checked: u64,
    /// Records absent or wrong.
    pub missing: u64,
    /// First missing (0: none).
    pub first_missing: u64,
}

/// Parses a `CHECKED k MISSING m FIRST x` answer.
pub fn parse_check(answer: &str) -> Result<CheckResult, LabError> {
    let w: Vec<&str> = answer.split_whitespace().collect();
    let bad = || LabError::WrongState(format!("unexpected CHECK answer {answer:?}"));
    if w.len() != 6 || w[0] != "CHECKED" || w[2] != "MISSING" || w[4] != "FIRST" {
        return Err(bad());
    }
    let n = |s: &str| s.parse::<u64>().map_err(|_| bad());
    Ok(CheckResult {
        checked: n(w[1])?,
        missing: n(w[3])?,
        first_missing: n(w[5])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_out_of_range_is_refused() {
        assert_eq!(parse("PUT 5", 100), Ok(Request::Put(5)));
        assert_eq!(parse("CHECK 1 9", 100), Ok(Request::Check(1, 9)));
        assert_eq!(parse("GET", 100), Ok(Request::Get));
        assert!(parse("PUT 0", 100).is_err());
        assert!(parse("PUT 100", 100).is_err());
        assert!(parse("PUT x", 100).is_err());
        assert!(parse("CHECK 5 2", 100).is_err());
        assert!(parse("PUT 1 2", 100).is_err());
        assert!(parse("", 100).is_err());
    }

    #[test]
    fn records_differ_and_carry_their_number() {
        assert_ne!(record(1), record(2));
        assert_eq!(&record(7)[8..16], &7u64.to_le_bytes());
    }

    #[test]
    fn check_answer_round_trips() {
        let r = parse_check("CHECKED 10 MISSING 2 FIRST 4").unwrap();
        assert_eq!((r.checked, r.missing, r.first_missing), (10, 2, 4));
        assert!(parse_check("OK 1").is_err());
    }
}
