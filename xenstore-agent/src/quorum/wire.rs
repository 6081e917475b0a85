//! The authenticated frame used by quorum requests and replies and by heartbeat datagrams.
//!
//! ```text
//! magic (4 bytes) | body length (u32, big endian) | body (JSON) | HMAC-SHA256(secret, magic | length | body)
//! ```
//! The body length is bounded before anything is allocated; the MAC is checked (in constant
//! time) before the body is parsed, so a peer without the pool secret can make the receiver
//! do no more than one HMAC over a bounded buffer.

use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Magic of quorum frames.
pub const QUORUM_MAGIC: [u8; 4] = *b"XFQ1";
/// Magic of heartbeat datagrams.
pub const HEARTBEAT_MAGIC: [u8; 4] = *b"XFH1";
/// Largest accepted body.
pub const MAX_BODY: usize = 256 * 1024;
const MAC_LEN: usize = 32;
const HEADER: usize = 8;

/// A frame could not be read, verified or decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Wrong magic: not our protocol or not our version.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// Declared body larger than [`MAX_BODY`].
    #[error("body of {0} bytes exceeds {MAX_BODY}")]
    TooLarge(usize),
    /// The frame is shorter than its header says.
    #[error("truncated frame")]
    Truncated,
    /// The MAC does not match: wrong pool secret or tampering.
    #[error("authentication failed")]
    BadMac,
    /// Authenticated but not a valid message.
    #[error("malformed body: {0}")]
    Json(#[from] serde_json::Error),
    /// The secret is empty.
    #[error("empty secret")]
    EmptySecret,
}

fn mac(secret: &[u8]) -> Result<Hmac<Sha256>, WireError> {
    if secret.is_empty() {
        return Err(WireError::EmptySecret);
    }
    Hmac::<Sha256>::new_from_slice(secret).map_err(|_| WireError::EmptySecret)
}

/// Encodes `msg` into one authenticated frame.
///
/// # Errors
/// [`WireError::TooLarge`] or [`WireError::EmptySecret`].
pub fn encode<T: Serialize>(magic: [u8; 4], secret: &[u8], msg: &T) -> Result<Vec<u8>, WireError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_BODY {
        return Err(WireError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| WireError::TooLarge(body.len()))?;
    let mut out = Vec::with_capacity(HEADER + body.len() + MAC_LEN);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    let mut m = mac(secret)?;
    m.update(&out);
    out.extend_from_slice(&m.finalize().into_bytes());
    Ok(out)
}

fn verify(secret: &[u8], signed: &[u8], tag: &[u8]) -> Result<(), WireError> {
    let mut m = mac(secret)?;
    m.update(signed);
    m.verify_slice(tag).map_err(|_| WireError::BadMac)
}

/// Decodes one whole frame (a datagram).
///
/// # Errors
/// [`WireError`] naming the problem.
pub fn decode<T: DeserializeOwned>(
    magic: [u8; 4],
    secret: &[u8],
    buf: &[u8],
) -> Result<T, WireError> {
    if buf.len() < HEADER + MAC_LEN {
        return Err(WireError::Truncated);
    }
    let got: [u8; 4] = buf[..4].try_into().map_err(|_| WireError::Truncated)?;
    if got != magic {
        return Err(WireError::BadMagic(got));
    }
    let len_bytes: [u8; 4] = buf[4..8].try_into().map_err(|_| WireError::Truncated)?;
    let len = usize::try_from(u32::from_be_bytes(len_bytes)).map_err(|_| WireError::Truncated)?;
    if len > MAX_BODY {
        return Err(WireError::TooLarge(len));
    }
    if buf.len() != HEADER + len + MAC_LEN {
        return Err(WireError::Truncated);
    }
    let (signed, tag) = buf.split_at(HEADER + len);
    verify(secret, signed, tag)?;
    Ok(serde_json::from_slice(&signed[HEADER..])?)
}

/// Reads one frame from a stream.
///
/// # Errors
/// [`WireError`]; `Io` with `UnexpectedEof` when the peer closed the stream.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    magic: [u8; 4],
    secret: &[u8],
) -> Result<T, WireError> {
    let mut head = [0u8; HEADER];
    r.read_exact(&mut head).await?;
    let got: [u8; 4] = head[..4].try_into().map_err(|_| WireError::Truncated)?;
    if got != magic {
        return Err(WireError::BadMagic(got));
    }
    let len_bytes: [u8; 4] = head[4..8].try_into().map_err(|_| WireError::Truncated)?;
    let len = usize::try_from(u32::from_be_bytes(len_bytes)).map_err(|_| WireError::Truncated)?;
    if len > MAX_BODY {
        return Err(WireError::TooLarge(len));
    }
    let mut buf = vec![0u8; HEADER + len + MAC_LEN];
    buf[..HEADER].copy_from_slice(&head);
    r.read_exact(&mut buf[HEADER..]).await?;
    decode(magic, secret, &buf)
}

/// Writes one frame to a stream.
///
/// # Errors
/// [`WireError`].
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    magic: [u8; 4],
    secret: &[u8],
    msg: &T,
) -> Result<(), WireError> {
    let buf = encode(magic, secret, msg)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_tampering_is_detected() {
        let f = encode(QUORUM_MAGIC, b"secret", &vec![1u32, 2, 3]).unwrap();
        let v: Vec<u32> = decode(QUORUM_MAGIC, b"secret", &f).unwrap();
        assert_eq!(v, vec![1, 2, 3]);
        assert!(matches!(
            decode::<Vec<u32>>(QUORUM_MAGIC, b"other", &f),
            Err(WireError::BadMac)
        ));
        let mut t = f.clone();
        t[9] ^= 1;
        assert!(matches!(
            decode::<Vec<u32>>(QUORUM_MAGIC, b"secret", &t),
            Err(WireError::BadMac)
        ));
        assert!(matches!(
            decode::<Vec<u32>>(HEARTBEAT_MAGIC, b"secret", &f),
            Err(WireError::BadMagic(_))
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let mut f = encode(QUORUM_MAGIC, b"s", &1u8).unwrap();
        f[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode::<u8>(QUORUM_MAGIC, b"s", &f),
            Err(WireError::TooLarge(_))
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let r: Result<u8, _> = rt.block_on(read_frame(&mut &f[..], QUORUM_MAGIC, b"s"));
        assert!(matches!(r, Err(WireError::TooLarge(_))));
    }

    #[test]
    fn garbage_never_panics() {
        for n in 0..64usize {
            let junk: Vec<u8> = (0..n)
                .map(|i| u8::try_from(i * 37 % 251).unwrap())
                .collect();
            let _ = decode::<u8>(QUORUM_MAGIC, b"s", &junk);
        }
    }
}
