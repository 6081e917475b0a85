//! XML-RPC values, calls and responses: XenAPI's value model on top of `quick-xml`.
//!
//! Follows the XML-RPC specification (<http://xmlrpc.scripting.com/spec.html>) as XenAPI uses it
//! (xen-api `doc/content/xen-api/wire-protocol.md`):
//!
//! - XenAPI `int` is 64-bit and travels as a `<string>` of decimal digits, never as `<int>`/`<i4>`
//!   (32-bit in XML-RPC). [`Value::Int`] therefore only holds an `i32`, and helpers such as
//!   [`Value::as_i64`] accept both spellings when reading; [`Value::int64`] writes the string.
//! - `float`, `bool`, `datetime`, `string` map to `<double>`, `<boolean>`, `<dateTime.iso8601>`,
//!   `<string>`; a `<value>` with bare text and no type element is a string (this is how xapi
//!   writes strings), its whitespace kept.
//! - enums and refs are strings, sets are `<array>`, maps are `<struct>` with stringified keys.
//!
//! XML itself (tokens, entity and character references, CDATA, comments, end-tag matching,
//! escaping, `\r` preserved as `&#13;`) is `quick-xml`'s; this module only maps the XML-RPC
//! elements onto [`Value`]. Anything else (DTDs, unknown entities or elements, nesting deeper
//! than [`MAX_DEPTH`]) is a [`XmlRpcError`], never a panic. The caller bounds the input size
//! (the transport caps replies at [`crate::transport::MAX_REPLY_BYTES`]).
//!
//! ## Why not `serde_xmlrpc`
//!
//! `serde_xmlrpc` 0.2.3 (the newest release) was the intended codec; it cannot carry XenAPI
//! faithfully. Each gap is measured in `tests/serde_xmlrpc_gaps.rs`:
//!
//! - `<string>`, `<name>` and `<methodName>` text is returned still escaped (it uses
//!   `quick_xml::Reader::read_text`, which does not unescape): `a &amp; b` decodes as
//!   `"a &amp; b"`. Every JSON value the registry keeps in `other_config` would be corrupted.
//! - Untyped `<value>` text, xapi's spelling of a string, is trimmed.
//! - `<dateTime.iso8601>` decodes to a plain string and cannot be written at all (its
//!   `Value::DateTime` is written as `<string>`), so date-times do not survive a round trip.
//! - The reader recurses without a depth limit: a deeply nested document overflows the stack
//!   and aborts the process instead of returning an error.
//! - `<int>` silently accepts 64-bit values; trailing junk inside `<value>`/`<member>` is skipped.
//!
//! `quick-xml` (the parser `serde_xmlrpc` is itself built on) does the XML here instead.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use quick_xml::escape::escape;
use quick_xml::events::Event;
use quick_xml::Reader;

/// Deepest nesting of arrays/structs accepted by the decoder.
pub const MAX_DEPTH: usize = 64;

/// One XML-RPC value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `<int>` / `<i4>`: 32-bit only. XenAPI ints travel as [`Value::String`].
    Int(i32),
    /// `<boolean>`: `0` or `1`.
    Bool(bool),
    /// `<string>` (or untyped text).
    String(String),
    /// `<double>`.
    Double(f64),
    /// `<dateTime.iso8601>`, kept as the text the peer sent (e.g. `20260101T10:00:00Z`).
    DateTime(String),
    /// `<base64>`, kept as the encoded text (XenAPI does not use it).
    Base64(String),
    /// `<struct>`: name → value.
    Struct(BTreeMap<String, Value>),
    /// `<array>`.
    Array(Vec<Value>),
    /// `<nil/>` (an extension; Python's xmlrpc.client sends it with `allow_none`).
    Nil,
}

/// Why an XML-RPC document could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum XmlRpcError {
    /// The XML itself is malformed.
    #[error("malformed XML at byte {offset}: {reason}")]
    Xml {
        /// Byte offset into the document.
        offset: usize,
        /// What was wrong.
        reason: String,
    },
    /// Well-formed XML, but not the XML-RPC structure expected.
    #[error("not a valid XML-RPC document: {0}")]
    Structure(String),
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("XML-RPC value nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// A decoded XML-RPC `<methodResponse>`.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `<params><param><value>..`: the single return value.
    Success(Value),
    /// `<fault>`: XML-RPC transport-level fault (XenAPI reports API errors inside a Success).
    Fault {
        /// `faultCode`.
        code: i32,
        /// `faultString`.
        message: String,
    },
}

impl Value {
    /// Shorthand for a string value.
    pub fn str(s: impl Into<String>) -> Value {
        Value::String(s.into())
    }

    /// A XenAPI 64-bit `int`, encoded as a decimal string as the wire protocol requires.
    pub fn int64(n: i64) -> Value {
        Value::String(n.to_string())
    }

    /// A XenAPI `(string → string) map`.
    pub fn string_map<'a>(m: impl IntoIterator<Item = (&'a String, &'a String)>) -> Value {
        Value::Struct(
            m.into_iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        )
    }

    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A XenAPI int: accepts the decimal-string form (the wire protocol) and `<int>`.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(i64::from(*i)),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// A bool: `<boolean>`, or the strings `true`/`false` some peers send.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s == "true" => Some(true),
            Value::String(s) if s == "false" => Some(false),
            _ => None,
        }
    }

    /// The members, if this is a struct.
    pub fn as_struct(&self) -> Option<&BTreeMap<String, Value>> {
        match self {
            Value::Struct(m) => Some(m),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A `(string → string) map`; non-string members are skipped.
    pub fn to_string_map(&self) -> Option<BTreeMap<String, String>> {
        self.as_struct().map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
    }

    /// Appends the `<value>..</value>` encoding of `self` to `out`.
    pub fn encode_into(&self, out: &mut String) {
        out.push_str("<value>");
        match self {
            Value::Int(i) => {
                let _ = write!(out, "<int>{i}</int>");
            }
            Value::Bool(b) => {
                let _ = write!(out, "<boolean>{}</boolean>", u8::from(*b));
            }
            Value::String(s) => {
                out.push_str("<string>");
                escape_into(s, out);
                out.push_str("</string>");
            }
            Value::Double(d) => {
                // XML-RPC doubles have no exponent form and no NaN/inf; finite values only.
                // `Display` never uses an exponent and prints the shortest exact form.
                let d = if d.is_finite() { *d } else { 0.0 };
                let _ = write!(out, "<double>{d}</double>");
            }
            Value::DateTime(s) => {
                out.push_str("<dateTime.iso8601>");
                escape_into(s, out);
                out.push_str("</dateTime.iso8601>");
            }
            Value::Base64(s) => {
                out.push_str("<base64>");
                escape_into(s, out);
                out.push_str("</base64>");
            }
            Value::Struct(m) => {
                out.push_str("<struct>");
                for (k, v) in m {
                    out.push_str("<member><name>");
                    escape_into(k, out);
                    out.push_str("</name>");
                    v.encode_into(out);
                    out.push_str("</member>");
                }
                out.push_str("</struct>");
            }
            Value::Array(a) => {
                out.push_str("<array><data>");
                for v in a {
                    v.encode_into(out);
                }
                out.push_str("</data></array>");
            }
            Value::Nil => out.push_str("<nil/>"),
        }
        out.push_str("</value>");
    }
}

/// Appends `s` with XML's special characters (and `\r`, which XML parsers would turn into `\n`)
/// escaped by `quick-xml`.
fn escape_into(s: &str, out: &mut String) {
    out.push_str(&escape(s));
}

/// Encodes a `<methodCall>`. Like xapi's own encoder (ocaml-rpc `Xmlrpc`), no whitespace
/// between elements: some parsers keep it as text (Xen Orchestra's `@vates/xml-rpc` fails on a
/// newline after the XML declaration).
pub fn encode_call(method: &str, params: &[Value]) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?><methodCall><methodName>");
    escape_into(method, &mut out);
    out.push_str("</methodName><params>");
    for p in params {
        out.push_str("<param>");
        p.encode_into(&mut out);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>");
    out
}

/// Encodes a successful `<methodResponse>` carrying `value`, without whitespace between
/// elements, as xapi writes it.
pub fn encode_response(value: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?><methodResponse><params><param>");
    value.encode_into(&mut out);
    out.push_str("</param></params></methodResponse>");
    out
}

/// Encodes a `<fault>` `<methodResponse>`.
pub fn encode_fault(code: i32, message: &str) -> String {
    let mut m = BTreeMap::new();
    m.insert("faultCode".to_string(), Value::Int(code));
    m.insert("faultString".to_string(), Value::str(message));
    let mut out = String::from("<?xml version=\"1.0\"?><methodResponse><fault>");
    Value::Struct(m).encode_into(&mut out);
    out.push_str("</fault></methodResponse>");
    out
}

/// Decodes a `<methodCall>` into its method name and parameters.
pub fn decode_call(xml: &str) -> Result<(String, Vec<Value>), XmlRpcError> {
    let mut p = Parser::new(xml);
    p.expect_start("methodCall")?;
    p.expect_start("methodName")?;
    let name = p.text()?;
    p.expect_end("methodName")?;
    let mut params = Vec::new();
    match p.next()? {
        Tok::End(n) if n == "methodCall" => return p.finish().map(|()| (name, params)),
        Tok::Start(n) if n == "params" => {
            while p.peek_start("param")? {
                p.expect_start("param")?;
                params.push(p.value(0)?);
                p.expect_end("param")?;
            }
            p.expect_end("params")?;
        }
        t => return Err(p.unexpected(&t, "<params>")),
    }
    p.expect_end("methodCall")?;
    p.finish()?;
    Ok((name, params))
}

/// Decodes a `<methodResponse>`.
pub fn decode_response(xml: &str) -> Result<Response, XmlRpcError> {
    let mut p = Parser::new(xml);
    p.expect_start("methodResponse")?;
    let r = match p.next()? {
        Tok::Start(n) if n == "params" => {
            p.expect_start("param")?;
            let v = p.value(0)?;
            p.expect_end("param")?;
            p.expect_end("params")?;
            Response::Success(v)
        }
        Tok::Start(n) if n == "fault" => {
            let v = p.value(0)?;
            p.expect_end("fault")?;
            let m = v
                .as_struct()
                .ok_or_else(|| XmlRpcError::Structure("fault is not a struct".into()))?;
            let code = match m.get("faultCode") {
                Some(Value::Int(i)) => *i,
                Some(v) => v
                    .as_i64()
                    .and_then(|i| i32::try_from(i).ok())
                    .ok_or_else(|| XmlRpcError::Structure("faultCode is not an int".into()))?,
                None => return Err(XmlRpcError::Structure("fault without faultCode".into())),
            };
            let message = m
                .get("faultString")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            Response::Fault { code, message }
        }
        t => return Err(p.unexpected(&t, "<params> or <fault>")),
    };
    p.expect_end("methodResponse")?;
    p.finish()?;
    Ok(r)
}

/// Decodes a lone `<value>` document (used by tests and by tools).
pub fn decode_value(xml: &str) -> Result<Value, XmlRpcError> {
    let mut p = Parser::new(xml);
    let v = p.value(0)?;
    p.finish()?;
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// The XML-RPC grammar over quick-xml's events.

/// What the grammar sees: elements and text. Empty elements arrive as a start and an end
/// (`expand_empty_elements`), adjacent text, CDATA and references as one `Text`.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Start(String),
    End(String),
    Text(String),
    Eof,
}

struct Parser<'a> {
    reader: Reader<&'a [u8]>,
    peeked: Option<Tok>,
    /// Tokens already read from quick-xml, handed out next (last first).
    pending: Vec<Tok>,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        let mut reader = Reader::from_str(src);
        let cfg = reader.config_mut();
        cfg.expand_empty_elements = true;
        cfg.check_end_names = true;
        cfg.trim_text(false);
        Parser {
            reader,
            peeked: None,
            pending: Vec::new(),
        }
    }

    fn offset(&self) -> usize {
        usize::try_from(self.reader.buffer_position()).unwrap_or(usize::MAX)
    }

    fn err(&self, reason: impl Into<String>) -> XmlRpcError {
        XmlRpcError::Xml {
            offset: self.offset(),
            reason: reason.into(),
        }
    }

    fn unexpected(&self, t: &Tok, wanted: &str) -> XmlRpcError {
        let got = match t {
            Tok::Start(n) => format!("<{n}>"),
            Tok::End(n) => format!("</{n}>"),
            Tok::Text(_) => "text".to_string(),
            Tok::Eof => "end of document".to_string(),
        };
        XmlRpcError::Structure(format!(
            "expected {wanted}, found {got} at byte {}",
            self.offset()
        ))
    }

    /// The next token, text included (possibly whitespace only).
    fn raw_next(&mut self) -> Result<Tok, XmlRpcError> {
        if let Some(t) = self.peeked.take() {
            return Ok(t);
        }
        if let Some(t) = self.pending.pop() {
            return Ok(t);
        }
        let mut text: Option<String> = None;
        loop {
            let ev = match self.reader.read_event() {
                Ok(ev) => ev,
                Err(e) => {
                    let offset = usize::try_from(self.reader.error_position()).unwrap_or(0);
                    return Err(XmlRpcError::Xml {
                        offset,
                        reason: e.to_string(),
                    });
                }
            };
            let tok = match ev {
                Event::Text(t) => {
                    text.get_or_insert_with(String::new)
                        .push_str(&t.xml10_content());
                    continue;
                }
                Event::CData(c) => {
                    text.get_or_insert_with(String::new)
                        .push_str(&c.xml10_content());
                    continue;
                }
                Event::GeneralRef(r) => {
                    let c = resolve_reference(&r).map_err(|e| self.err(e))?;
                    text.get_or_insert_with(String::new).push(c);
                    continue;
                }
                Event::Comment(_) | Event::PI(_) | Event::Decl(_) => continue,
                Event::DocType(_) => {
                    return Err(self.err("DTDs and declarations are not accepted"));
                }
                Event::Start(e) => Tok::Start(e.name().as_ref().to_string()),
                Event::End(e) => Tok::End(e.name().as_ref().to_string()),
                // `expand_empty_elements` makes these a start and an end already.
                Event::Empty(e) => {
                    let name = e.name().as_ref().to_string();
                    self.pending.push(Tok::End(name.clone()));
                    Tok::Start(name)
                }
                Event::Eof => Tok::Eof,
            };
            return Ok(match text {
                Some(t) => {
                    self.pending.push(tok);
                    Tok::Text(t)
                }
                None => tok,
            });
        }
    }

    /// Next token with whitespace-only text skipped.
    fn next(&mut self) -> Result<Tok, XmlRpcError> {
        loop {
            match self.raw_next()? {
                Tok::Text(s) if s.trim().is_empty() => continue,
                t => return Ok(t),
            }
        }
    }

    fn peek(&mut self) -> Result<&Tok, XmlRpcError> {
        if self.peeked.is_none() {
            let t = self.next()?;
            self.peeked = Some(t);
        }
        Ok(self.peeked.get_or_insert(Tok::Eof))
    }

    fn peek_start(&mut self, name: &str) -> Result<bool, XmlRpcError> {
        Ok(matches!(self.peek()?, Tok::Start(n) if n == name))
    }

    fn expect_start(&mut self, name: &str) -> Result<(), XmlRpcError> {
        match self.next()? {
            Tok::Start(n) if n == name => Ok(()),
            t => Err(self.unexpected(&t, &format!("<{name}>"))),
        }
    }

    fn expect_end(&mut self, name: &str) -> Result<(), XmlRpcError> {
        match self.next()? {
            Tok::End(n) if n == name => Ok(()),
            t => Err(self.unexpected(&t, &format!("</{name}>"))),
        }
    }

    fn finish(&mut self) -> Result<(), XmlRpcError> {
        match self.next()? {
            Tok::Eof => Ok(()),
            t => Err(self.unexpected(&t, "end of document")),
        }
    }

    /// Text content up to the next tag (possibly empty; whitespace kept).
    fn text(&mut self) -> Result<String, XmlRpcError> {
        match self.raw_next()? {
            Tok::Text(s) => Ok(s),
            t => {
                self.peeked = Some(t);
                Ok(String::new())
            }
        }
    }

    /// Parses `<value>...</value>`.
    fn value(&mut self, depth: usize) -> Result<Value, XmlRpcError> {
        if depth > MAX_DEPTH {
            return Err(XmlRpcError::TooDeep);
        }
        self.expect_start("value")?;
        // Untyped text is a string; keep its whitespace.
        let text = self.text()?;
        let v = match self.next()? {
            Tok::End(n) if n == "value" => return Ok(Value::String(text)),
            Tok::Start(n) => self.typed(&n, depth)?,
            t => return Err(self.unexpected(&t, "a value type")),
        };
        self.expect_end("value")?;
        Ok(v)
    }

    fn typed(&mut self, ty: &str, depth: usize) -> Result<Value, XmlRpcError> {
        let v = match ty {
            "string" => Value::String(self.text()?),
            "int" | "i4" => {
                let t = self.text()?;
                Value::Int(
                    t.trim()
                        .parse()
                        .map_err(|_| XmlRpcError::Structure(format!("bad <{ty}> {t:?}")))?,
                )
            }
            // 64-bit <i8> (an extension): XenAPI's own convention is a decimal string, so
            // that is how we keep it.
            "i8" => {
                let t = self.text()?;
                let n: i64 = t
                    .trim()
                    .parse()
                    .map_err(|_| XmlRpcError::Structure(format!("bad <i8> {t:?}")))?;
                Value::String(n.to_string())
            }
            "boolean" => match self.text()?.trim() {
                "1" => Value::Bool(true),
                "0" => Value::Bool(false),
                t => return Err(XmlRpcError::Structure(format!("bad <boolean> {t:?}"))),
            },
            "double" => {
                let t = self.text()?;
                Value::Double(
                    t.trim()
                        .parse()
                        .map_err(|_| XmlRpcError::Structure(format!("bad <double> {t:?}")))?,
                )
            }
            "dateTime.iso8601" => Value::DateTime(self.text()?.trim().to_string()),
            "base64" => Value::Base64(self.text()?.trim().to_string()),
            "nil" => Value::Nil,
            "struct" => {
                let mut m = BTreeMap::new();
                while self.peek_start("member")? {
                    self.expect_start("member")?;
                    self.expect_start("name")?;
                    let name = self.text()?;
                    self.expect_end("name")?;
                    let v = self.value(depth + 1)?;
                    self.expect_end("member")?;
                    m.insert(name, v);
                }
                Value::Struct(m)
            }
            "array" => {
                let mut a = Vec::new();
                // `<array/>` (no `<data>`) is an empty array too.
                if self.peek_start("data")? {
                    self.expect_start("data")?;
                    while self.peek_start("value")? {
                        a.push(self.value(depth + 1)?);
                    }
                    self.expect_end("data")?;
                }
                Value::Array(a)
            }
            other => return Err(XmlRpcError::Structure(format!("unknown type <{other}>"))),
        };
        self.expect_end(ty)?;
        Ok(v)
    }
}

/// The five predefined entities and character references; XML-RPC has no others (and DTDs,
/// which could declare more, are refused).
fn resolve_reference(r: &quick_xml::events::BytesRef<'_>) -> Result<char, String> {
    let name: Cow<'_, str> = r.xml10_content();
    if let Some(c) = r
        .resolve_char_ref()
        .map_err(|e| format!("bad character reference &{name};: {e}"))?
    {
        return Ok(c);
    }
    match name.as_ref() {
        "lt" => Ok('<'),
        "gt" => Ok('>'),
        "amp" => Ok('&'),
        "quot" => Ok('"'),
        "apos" => Ok('\''),
        _ => Err(format!("unknown entity &{name};")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        let mut m = BTreeMap::new();
        m.insert("name".into(), Value::str("a <b> & \"c\"\r\n"));
        m.insert("n".into(), Value::int64(1 << 40));
        m.insert("i".into(), Value::Int(-5));
        m.insert("b".into(), Value::Bool(true));
        m.insert("d".into(), Value::Double(1.5));
        m.insert("t".into(), Value::DateTime("20260101T10:00:00Z".into()));
        m.insert("nil".into(), Value::Nil);
        m.insert(
            "a".into(),
            Value::Array(vec![Value::str(""), Value::Struct(BTreeMap::new())]),
        );
        Value::Struct(m)
    }

    #[test]
    fn call_round_trips_every_value_kind() {
        let xml = encode_call("VM.get_record", &[Value::str("OpaqueRef:1"), sample()]);
        let (name, params) = decode_call(&xml).unwrap();
        assert_eq!(name, "VM.get_record");
        assert_eq!(params, vec![Value::str("OpaqueRef:1"), sample()]);
    }

    #[test]
    fn documents_have_no_whitespace_between_elements_as_xapi_writes_them() {
        let docs = [
            encode_call("VM.get_all", &[Value::str("OpaqueRef:s")]),
            encode_response(&Value::str("x")),
            encode_fault(1, "f"),
        ];
        for d in docs {
            assert!(!d.contains('\n'), "{d:?}");
        }
    }

    #[test]
    fn int64_is_never_emitted_as_int_element() {
        let xml = encode_response(&Value::int64(8_589_934_592));
        assert!(xml.contains("<string>8589934592</string>"), "{xml}");
        assert!(!xml.contains("<int>"));
    }

    #[test]
    fn response_and_fault_decode() {
        let xml = encode_response(&sample());
        assert_eq!(decode_response(&xml).unwrap(), Response::Success(sample()));
        let xml = encode_fault(-1, "boom & bust");
        assert_eq!(
            decode_response(&xml).unwrap(),
            Response::Fault {
                code: -1,
                message: "boom & bust".into()
            }
        );
    }

    #[test]
    fn untyped_value_is_string_as_in_the_wire_protocol_example() {
        let xml = "<methodResponse><params><param><value><struct><member><name>Status</name>\
                   <value>Success</value></member><member><name>Value</name><value><array><data>\
                   <value>81547a35</value></data></array></value></member></struct></value>\
                   </param></params></methodResponse>";
        let Response::Success(v) = decode_response(xml).unwrap() else {
            panic!("not success")
        };
        let m = v.as_struct().unwrap();
        assert_eq!(m["Status"], Value::str("Success"));
        assert_eq!(m["Value"], Value::Array(vec![Value::str("81547a35")]));
    }

    #[test]
    fn python_xmlrpc_client_spelling_decodes() {
        // As emitted by Python's xmlrpc.client.dumps((\"OpaqueRef:x\", {\"vm\": \"a\"}), \"status\").
        let xml =
            "<?xml version='1.0'?>\n<methodCall>\n<methodName>status</methodName>\n<params>\n\
                   <param>\n<value><string>OpaqueRef:x</string></value>\n</param>\n<param>\n\
                   <value><struct>\n<member>\n<name>vm</name>\n<value><string>a</string></value>\n\
                   </member>\n</struct></value>\n</param>\n</params>\n</methodCall>\n";
        let (name, params) = decode_call(xml).unwrap();
        assert_eq!(name, "status");
        assert_eq!(params.len(), 2);
        assert_eq!(params[1].to_string_map().unwrap()["vm"], "a");
    }

    #[test]
    fn hostile_documents_are_errors_not_panics() {
        let deep = format!(
            "<methodCall><methodName>x</methodName><params><param>{}</param></params></methodCall>",
            "<value><array><data>".repeat(200)
        );
        assert_eq!(decode_call(&deep), Err(XmlRpcError::TooDeep));
        for bad in [
            "",
            "<",
            "<methodCall>",
            "<!DOCTYPE x [<!ENTITY a \"b\">]><methodCall/>",
            "<methodCall><methodName>a&bogus;</methodName></methodCall>",
            "<methodCall><methodName>a</methodName><params><param><value><int>99999999999</int></value></param></params></methodCall>",
            "<methodResponse><params><param><value><boolean>2</boolean></value></param></params></methodResponse>",
            "<methodResponse></methodResponse>",
            "<methodCall><methodName>a</methodName></methodCall><extra/>",
        ] {
            assert!(decode_call(bad).is_err() || decode_response(bad).is_err(), "{bad}");
            let _ = decode_response(bad);
        }
    }

    fn value_of(xml: &str) -> Result<Value, XmlRpcError> {
        decode_value(xml)
    }

    #[test]
    fn references_and_cdata_are_resolved_in_every_text() {
        let xml = "<methodCall><methodName>a&amp;b</methodName><params><param><value><struct>\
                   <member><name>k&lt;1&gt;</name><value><string>{&quot;x&quot;: &apos;&#233;&#x41;&apos;}\
                   <![CDATA[<raw & kept>]]></string></value></member></struct></value></param>\
                   </params></methodCall>";
        let (name, params) = decode_call(xml).unwrap();
        assert_eq!(name, "a&b");
        let m = params[0].as_struct().unwrap();
        assert_eq!(m["k<1>"], Value::str("{\"x\": 'éA'}<raw & kept>"));
    }

    #[test]
    fn untyped_string_keeps_its_whitespace_and_comments_are_ignored() {
        assert_eq!(
            value_of("<value>  x\t </value>").unwrap(),
            Value::str("  x\t ")
        );
        assert_eq!(
            value_of("<value><string>a<!-- note -->b</string></value>").unwrap(),
            Value::str("ab")
        );
        assert_eq!(value_of("<value>   </value>").unwrap(), Value::str("   "));
    }

    #[test]
    fn carriage_return_survives_xml_line_end_normalisation() {
        let xml = encode_response(&Value::str("a\r\nb\rc"));
        assert!(!xml.contains('\r'), "{xml:?}");
        assert_eq!(
            decode_response(&xml).unwrap(),
            Response::Success(Value::str("a\r\nb\rc"))
        );
        // A literal CR LF in the document is a line end, read as LF (XML 1.0 section 2.11).
        assert_eq!(
            value_of("<value>a\r\nb</value>").unwrap(),
            Value::str("a\nb")
        );
    }

    #[test]
    fn empty_element_spellings_decode() {
        assert_eq!(value_of("<value/>").unwrap(), Value::str(""));
        assert_eq!(
            value_of("<value><string/></value>").unwrap(),
            Value::str("")
        );
        assert_eq!(value_of("<value><nil/></value>").unwrap(), Value::Nil);
        assert_eq!(
            value_of("<value><struct/></value>").unwrap(),
            Value::Struct(BTreeMap::new())
        );
        assert_eq!(
            value_of("<value><array/></value>").unwrap(),
            Value::Array(vec![])
        );
        assert_eq!(
            value_of("<value><array><data/></array></value>").unwrap(),
            Value::Array(vec![])
        );
        let (name, params) =
            decode_call("<methodCall><methodName>m</methodName><params/></methodCall>").unwrap();
        assert_eq!((name.as_str(), params.len()), ("m", 0));
    }

    #[test]
    fn xapi_scalar_spellings_decode() {
        assert_eq!(
            value_of("<value><dateTime.iso8601>20260101T10:00:00Z</dateTime.iso8601></value>")
                .unwrap(),
            Value::DateTime("20260101T10:00:00Z".into())
        );
        assert_eq!(
            value_of("<value><i8>-9223372036854775808</i8></value>").unwrap(),
            Value::int64(i64::MIN)
        );
        assert_eq!(
            value_of("<value><base64> aGk= </base64></value>").unwrap(),
            Value::Base64("aGk=".into())
        );
        assert_eq!(
            value_of("<value><double>1e300</double></value>").unwrap(),
            Value::Double(1e300)
        );
        assert!(matches!(
            value_of("<value><int>99999999999</int></value>"),
            Err(XmlRpcError::Structure(_))
        ));
        assert_eq!(
            value_of("\u{feff}<?xml version=\"1.0\"?><value><i4>-7</i4></value>").unwrap(),
            Value::Int(-7)
        );
    }

    #[test]
    fn doubles_are_written_without_exponent() {
        for d in [1e-7, 1e20, -0.5, 1.0] {
            let xml = encode_response(&Value::Double(d));
            let text = xml
                .split("<double>")
                .nth(1)
                .unwrap()
                .split('<')
                .next()
                .unwrap();
            assert!(
                text.chars()
                    .all(|c| c.is_ascii_digit() || c == '.' || c == '-'),
                "{xml}"
            );
            assert_eq!(
                decode_response(&xml).unwrap(),
                Response::Success(Value::Double(d))
            );
        }
    }

    #[test]
    fn nesting_limit_is_exactly_max_depth() {
        let nested = |n: usize| {
            format!(
                "{}<value>x</value>{}",
                "<value><array><data>".repeat(n),
                "</data></array></value>".repeat(n)
            )
        };
        assert!(value_of(&nested(MAX_DEPTH)).is_ok());
        assert_eq!(value_of(&nested(MAX_DEPTH + 1)), Err(XmlRpcError::TooDeep));
        // Far deeper than any stack could recurse: still a typed error.
        assert_eq!(value_of(&nested(1_000_000)), Err(XmlRpcError::TooDeep));
    }

    #[test]
    fn malformed_xml_and_unknown_markup_are_typed_errors() {
        let call = |v: &str| {
            format!("<methodCall><methodName>m</methodName><params><param>{v}</param></params></methodCall>")
        };
        for (doc, xml_level) in [
            (
                "<!DOCTYPE x [<!ENTITY a \"b\">]><methodCall/>".to_string(),
                true,
            ),
            (call("<value>&a;</value>"), true),
            (call("<value>a & b</value>"), true),
            (call("<value><string>x</int></value>"), true),
            (call("<value><custom>x</custom></value>"), false),
            (call("<value><string><b>x</b></string></value>"), false),
            (
                call("<value><struct><member><name>a</name></member></struct></value>"),
                false,
            ),
            ("text<methodCall/>".to_string(), false),
        ] {
            let e = decode_call(&doc).unwrap_err();
            assert_eq!(
                matches!(e, XmlRpcError::Xml { .. }),
                xml_level,
                "{doc}: {e}"
            );
        }
    }
}
