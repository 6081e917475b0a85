//! XML-RPC values, calls and responses, encoded and decoded by hand.
//!
//! Follows the XML-RPC specification (<http://xmlrpc.scripting.com/spec.html>) as XenAPI uses it
//! (xen-api `doc/content/xen-api/wire-protocol.md`):
//!
//! - XenAPI `int` is 64-bit and travels as a `<string>` of decimal digits, never as `<int>`/`<i4>`
//!   (32-bit in XML-RPC). [`Value::Int`] therefore only holds an `i32`, and helpers such as
//!   [`Value::as_i64`] accept both spellings when reading.
//! - `float`, `bool`, `datetime`, `string` map to `<double>`, `<boolean>`, `<dateTime.iso8601>`,
//!   `<string>`; a `<value>` with bare text and no type element is a string.
//! - enums and refs are strings, sets are `<array>`, maps are `<struct>` with stringified keys.
//!
//! The decoder reads the subset of XML that XML-RPC needs (elements, text, the five predefined
//! entities, numeric character references, CDATA, comments and the `<?xml?>` prolog). Everything
//! else (DTDs, unknown elements, nesting deeper than [`MAX_DEPTH`]) is a [`XmlRpcError`], never a
//! panic. The caller bounds the input size.

use std::collections::BTreeMap;
use std::fmt::Write as _;

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
                let d = if d.is_finite() { *d } else { 0.0 };
                let _ = write!(out, "<double>{d:?}</double>");
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

fn escape_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

/// Encodes a `<methodCall>`.
pub fn encode_call(method: &str, params: &[Value]) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?>\n<methodCall><methodName>");
    escape_into(method, &mut out);
    out.push_str("</methodName><params>");
    for p in params {
        out.push_str("<param>");
        p.encode_into(&mut out);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>\n");
    out
}

/// Encodes a successful `<methodResponse>` carrying `value`.
pub fn encode_response(value: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?>\n<methodResponse><params><param>");
    value.encode_into(&mut out);
    out.push_str("</param></params></methodResponse>\n");
    out
}

/// Encodes a `<fault>` `<methodResponse>`.
pub fn encode_fault(code: i32, message: &str) -> String {
    let mut m = BTreeMap::new();
    m.insert("faultCode".to_string(), Value::Int(code));
    m.insert("faultString".to_string(), Value::str(message));
    let mut out = String::from("<?xml version=\"1.0\"?>\n<methodResponse><fault>");
    Value::Struct(m).encode_into(&mut out);
    out.push_str("</fault></methodResponse>\n");
    out
}

/// Decodes a `<methodCall>` into its method name and parameters.
pub fn decode_call(xml: &str) -> Result<(String, Vec<Value>), XmlRpcError> {
    let mut p = Parser::new(xml)?;
    p.expect_start("methodCall")?;
    p.expect_start("methodName")?;
    let name = p.text()?;
    p.expect_end("methodName")?;
    let mut params = Vec::new();
    match p.next()? {
        Tok::End(n) if n == "methodCall" => return p.finish().map(|()| (name, params)),
        Tok::Empty(n) if n == "params" => {}
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
    let mut p = Parser::new(xml)?;
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
    let mut p = Parser::new(xml)?;
    let v = p.value(0)?;
    p.finish()?;
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// A minimal XML tokenizer for the XML-RPC subset.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Start(String),
    End(String),
    Empty(String),
    Text(String),
    Eof,
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    peeked: Option<(Tok, usize)>,
    /// Offset where the last token began (for error messages).
    last: usize,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Result<Self, XmlRpcError> {
        let mut p = Parser {
            src,
            pos: 0,
            peeked: None,
            last: 0,
        };
        // Skip a BOM.
        if p.src.starts_with('\u{feff}') {
            p.pos = '\u{feff}'.len_utf8();
        }
        Ok(p)
    }

    fn err(&self, reason: impl Into<String>) -> XmlRpcError {
        XmlRpcError::Xml {
            offset: self.last,
            reason: reason.into(),
        }
    }

    fn unexpected(&self, t: &Tok, wanted: &str) -> XmlRpcError {
        let got = match t {
            Tok::Start(n) => format!("<{n}>"),
            Tok::End(n) => format!("</{n}>"),
            Tok::Empty(n) => format!("<{n}/>"),
            Tok::Text(_) => "text".to_string(),
            Tok::Eof => "end of document".to_string(),
        };
        XmlRpcError::Structure(format!(
            "expected {wanted}, found {got} at byte {}",
            self.last
        ))
    }

    /// Next token with whitespace-only text skipped.
    fn next(&mut self) -> Result<Tok, XmlRpcError> {
        loop {
            let t = self.raw_next()?;
            match &t {
                Tok::Text(s) if s.trim().is_empty() => continue,
                _ => return Ok(t),
            }
        }
    }

    fn raw_next(&mut self) -> Result<Tok, XmlRpcError> {
        if let Some((t, at)) = self.peeked.take() {
            self.last = at;
            return Ok(t);
        }
        self.lex()
    }

    fn peek_raw(&mut self) -> Result<&Tok, XmlRpcError> {
        if self.peeked.is_none() {
            let t = self.lex()?;
            self.peeked = Some((t, self.last));
        }
        match &self.peeked {
            Some((t, _)) => Ok(t),
            None => Err(self.err("internal: peek")),
        }
    }

    fn peek(&mut self) -> Result<Tok, XmlRpcError> {
        loop {
            let t = self.peek_raw()?.clone();
            match &t {
                Tok::Text(s) if s.trim().is_empty() => {
                    self.peeked = None;
                }
                _ => return Ok(t),
            }
        }
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
        let mut s = String::new();
        while let Tok::Text(_) = self.peek_raw()? {
            if let Some((Tok::Text(t), _)) = self.peeked.take() {
                s.push_str(&t);
            }
        }
        Ok(s)
    }

    /// Parses `<value>...</value>`.
    fn value(&mut self, depth: usize) -> Result<Value, XmlRpcError> {
        if depth > MAX_DEPTH {
            return Err(XmlRpcError::TooDeep);
        }
        match self.next()? {
            Tok::Empty(n) if n == "value" => return Ok(Value::String(String::new())),
            Tok::Start(n) if n == "value" => {}
            t => return Err(self.unexpected(&t, "<value>")),
        }
        // Untyped text is a string; keep its whitespace.
        let text = self.text()?;
        let v = match self.next()? {
            Tok::End(n) if n == "value" => return Ok(Value::String(text)),
            Tok::Empty(n) => match n.as_str() {
                "nil" => Value::Nil,
                "string" => Value::String(String::new()),
                "struct" => Value::Struct(BTreeMap::new()),
                "array" => Value::Array(Vec::new()),
                other => return Err(XmlRpcError::Structure(format!("empty <{other}/>"))),
            },
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
                match self.next()? {
                    Tok::Empty(n) if n == "data" => {}
                    Tok::Start(n) if n == "data" => {
                        while matches!(self.peek()?, Tok::Start(ref n) | Tok::Empty(ref n) if n == "value")
                        {
                            a.push(self.value(depth + 1)?);
                        }
                        self.expect_end("data")?;
                    }
                    t => return Err(self.unexpected(&t, "<data>")),
                }
                Value::Array(a)
            }
            other => return Err(XmlRpcError::Structure(format!("unknown type <{other}>"))),
        };
        self.expect_end(ty)?;
        Ok(v)
    }

    fn lex(&mut self) -> Result<Tok, XmlRpcError> {
        loop {
            self.last = self.pos;
            let rest = &self.src[self.pos..];
            if rest.is_empty() {
                return Ok(Tok::Eof);
            }
            if let Some(r) = rest.strip_prefix("<?") {
                let end = r.find("?>").ok_or_else(|| self.err("unterminated <?"))?;
                self.pos += 2 + end + 2;
                continue;
            }
            if let Some(r) = rest.strip_prefix("<!--") {
                let end = r
                    .find("-->")
                    .ok_or_else(|| self.err("unterminated comment"))?;
                self.pos += 4 + end + 3;
                continue;
            }
            if let Some(r) = rest.strip_prefix("<![CDATA[") {
                let end = r
                    .find("]]>")
                    .ok_or_else(|| self.err("unterminated CDATA"))?;
                self.pos += 9 + end + 3;
                return Ok(Tok::Text(r[..end].to_string()));
            }
            if rest.starts_with("<!") {
                return Err(self.err("DTDs and declarations are not accepted"));
            }
            if let Some(r) = rest.strip_prefix("</") {
                let end = r
                    .find('>')
                    .ok_or_else(|| self.err("unterminated end tag"))?;
                let name = r[..end].trim();
                check_name(name).map_err(|e| self.err(e))?;
                self.pos += 2 + end + 1;
                return Ok(Tok::End(name.to_string()));
            }
            if let Some(r) = rest.strip_prefix('<') {
                let end = r.find('>').ok_or_else(|| self.err("unterminated tag"))?;
                let inner = &r[..end];
                let (inner, empty) = match inner.strip_suffix('/') {
                    Some(i) => (i, true),
                    None => (inner, false),
                };
                // Attributes are not used by XML-RPC; the name is the first word.
                let name = inner.split_whitespace().next().unwrap_or("");
                check_name(name).map_err(|e| self.err(e))?;
                self.pos += 1 + end + 1;
                return Ok(if empty {
                    Tok::Empty(name.to_string())
                } else {
                    Tok::Start(name.to_string())
                });
            }
            let end = rest.find('<').unwrap_or(rest.len());
            let raw = &rest[..end];
            let text = unescape(raw).map_err(|e| self.err(e))?;
            self.pos += end;
            return Ok(Tok::Text(text));
        }
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
    {
        return Err(format!("bad element name {name:?}"));
    }
    Ok(())
}

fn unescape(raw: &str) -> Result<String, String> {
    if !raw.contains('&') {
        return Ok(raw.to_string());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let r = &rest[i + 1..];
        let end = r
            .find(';')
            .filter(|&e| e <= 10)
            .ok_or_else(|| "unterminated entity".to_string())?;
        let ent = &r[..end];
        let c = match ent {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(h) = ent.strip_prefix("#x") {
                    u32::from_str_radix(h, 16).ok()
                } else if let Some(d) = ent.strip_prefix('#') {
                    d.parse().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32)
                    .ok_or_else(|| format!("unknown entity &{ent};"))?
            }
        };
        out.push(c);
        rest = &r[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
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
}
