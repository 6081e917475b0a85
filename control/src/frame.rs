//! The one framing every control socket speaks: JSON lines with a version.
//!
//! Client → component, one object per line:
//!
//! ```text
//! {"v":1,"req":{"op":"status"}}          a request (the component's request enum)
//! {"v":1,"subscribe":true}               turns the connection into an event stream
//! ```
//!
//! Component → client, one object per line:
//!
//! ```text
//! {"v":1,"ok":{"reply":"status",...}}    the reply to one request (the component's reply enum)
//! {"v":1,"err":{"kind":"refused","message":"..."}}
//! {"v":1,"subscribed":true}              then, for as long as the connection lives:
//! {"v":1,"event":{"event":"peer_lost",...}}
//! ```
//!
//! A line is at most [`MAX_LINE`] bytes including its newline. A request the component cannot
//! decode is answered with a typed [`ErrorReply`] (`malformed`, `unknown_request`,
//! `unsupported_version`, `too_long`): a client never has to guess from free text.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The framing version this build speaks. A line with another `v` is refused
/// (`unsupported_version`) by servers and by clients alike.
pub const VERSION: u32 = 1;

/// Longest line, in bytes, a server accepts or a client reads (the newline included).
pub const MAX_LINE: usize = 1 << 20;

/// Longest error message kept from the other side.
pub const MAX_MESSAGE: usize = 512;

/// Why a component did not carry out a request: a stable kind to match on, and a message for
/// people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ErrorReply {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What happened, for the log and the operator.
    pub message: String,
}

/// The kinds of [`ErrorReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line is not a JSON object of this framing, or the request's fields are wrong.
    Malformed,
    /// The request's `op` is not one this component knows.
    UnknownRequest,
    /// The line's `v` is not [`VERSION`].
    UnsupportedVersion,
    /// The line exceeds [`MAX_LINE`].
    TooLong,
    /// The request is valid but not now, or not for this role (e.g. `promote` on a primary).
    Refused,
    /// The component tried and failed.
    Failed,
    /// A kind this build does not know (a newer component): kept, not guessed.
    #[serde(other)]
    Other,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Malformed => "malformed",
            Self::UnknownRequest => "unknown_request",
            Self::UnsupportedVersion => "unsupported_version",
            Self::TooLong => "too_long",
            Self::Refused => "refused",
            Self::Failed => "failed",
            Self::Other => "other",
        })
    }
}

impl ErrorReply {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl std::fmt::Display) -> Self {
        Self {
            kind,
            message: clean(&message.to_string()),
        }
    }

    /// [`ErrorKind::Refused`].
    pub fn refused(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::Refused, message)
    }

    /// [`ErrorKind::Failed`].
    pub fn failed(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::Failed, message)
    }
}

/// Control characters dropped, at most [`MAX_MESSAGE`] characters: text from the other side
/// goes into logs.
fn clean(s: &str) -> String {
    let t: String = s
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE)
        .collect();
    if t.is_empty() {
        "no reason given".into()
    } else {
        t
    }
}

/// What a client sent, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming<R> {
    /// One request.
    Request(R),
    /// Stream events on this connection from now on.
    Subscribe,
}

/// What a component sent, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing<T, E> {
    /// The reply to a request.
    Reply(Result<T, ErrorReply>),
    /// The subscription was accepted.
    Subscribed,
    /// One event.
    Event(E),
}

#[derive(Serialize)]
struct RequestLine<'a, R> {
    v: u32,
    req: &'a R,
}

#[derive(Serialize)]
struct SubscribeLine {
    v: u32,
    subscribe: bool,
}

#[derive(Serialize)]
struct OkLine<'a, T> {
    v: u32,
    ok: &'a T,
}

#[derive(Serialize)]
struct ErrLine<'a> {
    v: u32,
    err: &'a ErrorReply,
}

#[derive(Serialize)]
struct SubscribedLine {
    v: u32,
    subscribed: bool,
}

#[derive(Serialize)]
struct EventLine<'a, E> {
    v: u32,
    event: &'a E,
}

fn line<T: Serialize>(v: &T) -> String {
    // Serialising our own enums and structs into JSON cannot fail (string keys, no
    // non-finite floats are sent: serde_json writes those as null).
    let mut s = serde_json::to_string(v).unwrap_or_else(|e| {
        format!(
            "{{\"v\":{VERSION},\"err\":{{\"kind\":\"failed\",\"message\":\"encoding: {}\"}}}}",
            clean(&e.to_string()).replace('"', "'")
        )
    });
    s.push('\n');
    s
}

/// `{"v":1,"req":...}` and a newline.
pub fn encode_request<R: Serialize>(req: &R) -> String {
    line(&RequestLine { v: VERSION, req })
}

/// `{"v":1,"subscribe":true}` and a newline.
pub fn encode_subscribe() -> String {
    line(&SubscribeLine {
        v: VERSION,
        subscribe: true,
    })
}

/// A reply line: `{"v":1,"ok":...}` or `{"v":1,"err":...}`, and a newline.
pub fn encode_reply<T: Serialize>(reply: &Result<T, ErrorReply>) -> String {
    match reply {
        Ok(ok) => line(&OkLine { v: VERSION, ok }),
        Err(err) => line(&ErrLine { v: VERSION, err }),
    }
}

/// `{"v":1,"subscribed":true}` and a newline.
pub fn encode_subscribed() -> String {
    line(&SubscribedLine {
        v: VERSION,
        subscribed: true,
    })
}

/// `{"v":1,"event":...}` and a newline.
pub fn encode_event<E: Serialize>(event: &E) -> String {
    line(&EventLine { v: VERSION, event })
}

fn malformed(m: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(ErrorKind::Malformed, m)
}

/// Parses a line into its object, checking the version.
fn object(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, ErrorReply> {
    if bytes.len() > MAX_LINE {
        return Err(ErrorReply::new(
            ErrorKind::TooLong,
            format!("line of {} bytes, at most {MAX_LINE}", bytes.len()),
        ));
    }
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| malformed(format!("not JSON: {e}")))?;
    let Value::Object(map) = v else {
        return Err(malformed("not a JSON object"));
    };
    match map.get("v").map(Value::as_u64) {
        Some(Some(n)) if n == u64::from(VERSION) => Ok(map),
        Some(Some(n)) => Err(ErrorReply::new(
            ErrorKind::UnsupportedVersion,
            format!("framing version {n}; this component speaks {VERSION}"),
        )),
        Some(None) => Err(malformed("\"v\" is not a version number")),
        None => Err(malformed(format!(
            "no \"v\": expected {{\"v\":{VERSION},\"req\":{{\"op\":...}}}}"
        ))),
    }
}

/// Decodes a client's line (server side).
///
/// # Errors
/// The [`ErrorReply`] to send back: `too_long`, `malformed`, `unsupported_version`, or
/// `unknown_request` when the `op` is not one of `R`'s.
pub fn decode_incoming<R: DeserializeOwned>(bytes: &[u8]) -> Result<Incoming<R>, ErrorReply> {
    let mut map = object(bytes)?;
    if map.get("subscribe") == Some(&Value::Bool(true)) {
        return Ok(Incoming::Subscribe);
    }
    let Some(req) = map.remove("req") else {
        return Err(malformed("neither \"req\" nor \"subscribe\":true"));
    };
    if !req.get("op").is_some_and(Value::is_string) {
        return Err(malformed("the request has no string \"op\""));
    }
    serde_json::from_value(req)
        .map(Incoming::Request)
        .map_err(|e| {
            let m = e.to_string();
            // serde's message for an internally tagged enum's unknown tag.
            if m.starts_with("unknown variant") {
                ErrorReply::new(ErrorKind::UnknownRequest, m)
            } else {
                malformed(m)
            }
        })
}

/// Decodes a component's line (client side).
///
/// # Errors
/// Why the line is not a reply, subscription acknowledgement or event of this framing (the
/// [`ErrorReply`] describes it; it is a local verdict, not the component's).
pub fn decode_outgoing<T: DeserializeOwned, E: DeserializeOwned>(
    bytes: &[u8],
) -> Result<Outgoing<T, E>, ErrorReply> {
    let mut map = object(bytes)?;
    if let Some(ok) = map.remove("ok") {
        return serde_json::from_value(ok)
            .map(|t| Outgoing::Reply(Ok(t)))
            .map_err(|e| malformed(format!("reply: {e}")));
    }
    if let Some(err) = map.remove("err") {
        return serde_json::from_value::<ErrorReply>(err)
            .map(|e| Outgoing::Reply(Err(ErrorReply::new(e.kind, e.message))))
            .map_err(|e| malformed(format!("error reply: {e}")));
    }
    if let Some(ev) = map.remove("event") {
        return serde_json::from_value(ev)
            .map(Outgoing::Event)
            .map_err(|e| malformed(format!("event: {e}")));
    }
    if map.get("subscribed") == Some(&Value::Bool(true)) {
        return Ok(Outgoing::Subscribed);
    }
    Err(malformed(
        "none of \"ok\", \"err\", \"event\", \"subscribed\"",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case")]
    enum Req {
        Status,
        Commit { epoch: u64 },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "event", rename_all = "snake_case")]
    enum Ev {
        PeerLost { reason: String },
    }

    fn incoming(s: &str) -> Result<Incoming<Req>, ErrorReply> {
        decode_incoming(s.as_bytes())
    }

    #[test]
    fn a_request_round_trips_through_its_line() {
        let l = encode_request(&Req::Commit { epoch: 7 });
        assert_eq!(l, "{\"v\":1,\"req\":{\"op\":\"commit\",\"epoch\":7}}\n");
        assert_eq!(
            incoming(&l).unwrap(),
            Incoming::Request(Req::Commit { epoch: 7 })
        );
        assert_eq!(incoming(&encode_subscribe()).unwrap(), Incoming::Subscribe);
    }

    #[test]
    fn bad_requests_get_the_kind_a_client_can_match() {
        let kind = |s: &str| incoming(s).unwrap_err().kind;
        assert_eq!(kind("status"), ErrorKind::Malformed);
        assert_eq!(kind("[1]"), ErrorKind::Malformed);
        assert_eq!(kind(r#"{"req":{"op":"status"}}"#), ErrorKind::Malformed);
        assert_eq!(
            kind(r#"{"v":2,"req":{"op":"status"}}"#),
            ErrorKind::UnsupportedVersion
        );
        assert_eq!(
            kind(r#"{"v":1,"req":{"op":"explode"}}"#),
            ErrorKind::UnknownRequest
        );
        assert_eq!(kind(r#"{"v":1,"req":{"epoch":3}}"#), ErrorKind::Malformed);
        assert_eq!(
            kind(r#"{"v":1,"req":{"op":"commit","epoch":-1}}"#),
            ErrorKind::Malformed
        );
        assert_eq!(
            kind(r#"{"v":1,"req":{"op":"commit"}}"#),
            ErrorKind::Malformed
        );
        let long = format!("{{\"v\":1,\"x\":\"{}\"}}", "a".repeat(MAX_LINE));
        assert_eq!(kind(&long), ErrorKind::TooLong);
    }

    #[test]
    fn replies_errors_and_events_decode_on_the_client() {
        type Out = Outgoing<u64, Ev>;
        let d = |s: String| decode_outgoing::<u64, Ev>(s.as_bytes()).unwrap();
        assert_eq!(d(encode_reply(&Ok(5u64))), Out::Reply(Ok(5)));
        let e = ErrorReply::refused("not a secondary");
        assert_eq!(d(encode_reply::<u64>(&Err(e.clone()))), Out::Reply(Err(e)));
        assert_eq!(d(encode_subscribed()), Out::Subscribed);
        let ev = Ev::PeerLost {
            reason: "gone".into(),
        };
        assert_eq!(d(encode_event(&ev)), Out::Event(ev));
    }

    #[test]
    fn a_hostile_error_text_is_cleaned_and_an_unknown_kind_kept_as_other() {
        let line = format!(
            "{{\"v\":1,\"err\":{{\"kind\":\"meltdown\",\"message\":\"a\\u001b[2Jb{}\"}}}}",
            "x".repeat(4000)
        );
        let Outgoing::Reply(Err(e)) = decode_outgoing::<u64, Ev>(line.as_bytes()).unwrap() else {
            panic!("an error reply")
        };
        assert_eq!(e.kind, ErrorKind::Other);
        assert!(e.message.starts_with("a[2Jb"), "{}", e.message);
        assert_eq!(e.message.chars().count(), MAX_MESSAGE);
    }

    #[test]
    fn a_reply_of_another_version_is_refused_by_the_client() {
        let e = decode_outgoing::<u64, Ev>(br#"{"v":9,"ok":1}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnsupportedVersion);
        let e = decode_outgoing::<u64, Ev>(br#"{"v":1,"ok":"five"}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Malformed);
    }
}
