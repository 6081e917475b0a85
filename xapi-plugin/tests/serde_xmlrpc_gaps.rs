//! Why the XML-RPC codec (`src/xmlrpc.rs`) is built on `quick-xml` and not on `serde_xmlrpc`:
//! each gap that rules `serde_xmlrpc` 0.2 out for XenAPI, measured against the crate itself,
//! next to the same document through our codec. When a `serde_xmlrpc` upgrade makes one of
//! these tests fail, the gap is closed and the choice can be revisited.

use xenft_xapi::xmlrpc::{self, Value};

fn ours(xml: &str) -> Value {
    xmlrpc::decode_value(xml).expect("our codec decodes it")
}

#[test]
fn escaped_string_text_comes_back_still_escaped() {
    // xapi escapes `&`, `<`, `>` and `"` in strings; the registry's JSON is full of `"`.
    let doc = "<value><string>{&quot;v&quot;: 1} &amp; &lt;x&gt;</string></value>";
    let theirs = serde_xmlrpc::value_from_str(doc).unwrap();
    assert_eq!(theirs.as_str(), Some("{&quot;v&quot;: 1} &amp; &lt;x&gt;"));
    assert_eq!(ours(doc), Value::str("{\"v\": 1} & <x>"));
}

#[test]
fn escaped_member_names_and_method_names_come_back_still_escaped() {
    let doc =
        "<value><struct><member><name>a&amp;b</name><value>v</value></member></struct></value>";
    let theirs = serde_xmlrpc::value_from_str(doc).unwrap();
    assert!(theirs.as_struct().unwrap().contains_key("a&amp;b"));
    assert!(ours(doc).as_struct().unwrap().contains_key("a&b"));

    let call = "<methodCall><methodName>x&amp;y</methodName><params></params></methodCall>";
    assert_eq!(serde_xmlrpc::request_from_str(call).unwrap().0, "x&amp;y");
    assert_eq!(xmlrpc::decode_call(call).unwrap().0, "x&y");
}

#[test]
fn untyped_string_is_trimmed() {
    // xapi writes strings as bare `<value>` text.
    let doc = "<value>  padded name </value>";
    assert_eq!(
        serde_xmlrpc::value_from_str(doc).unwrap().as_str(),
        Some("padded name")
    );
    assert_eq!(ours(doc), Value::str("  padded name "));
}

#[test]
fn date_time_loses_its_type() {
    // e.g. VM.snapshot_time in every VM record.
    let doc = "<value><dateTime.iso8601>20260101T10:00:00Z</dateTime.iso8601></value>";
    let theirs = serde_xmlrpc::value_from_str(doc).unwrap();
    assert_eq!(
        theirs,
        serde_xmlrpc::Value::String("20260101T10:00:00Z".into())
    );
    // ...and writing it back produces a <string>: there is no way to write a dateTime.
    let written = serde_xmlrpc::value_to_string(theirs).unwrap();
    assert!(written.contains("<string>"), "{written}");
    assert_eq!(ours(doc), Value::DateTime("20260101T10:00:00Z".into()));
}

#[test]
fn int_accepts_values_beyond_32_bits() {
    let doc = "<value><int>99999999999</int></value>";
    assert_eq!(
        serde_xmlrpc::value_from_str(doc).unwrap(),
        serde_xmlrpc::Value::Int64(99_999_999_999)
    );
    assert!(xmlrpc::decode_value(doc).is_err());
}

#[test]
fn trailing_junk_inside_a_value_is_skipped() {
    let doc = "<value><int>1</int><junk>2</junk></value>";
    assert_eq!(
        serde_xmlrpc::value_from_str(doc).unwrap(),
        serde_xmlrpc::Value::Int(1)
    );
    assert!(xmlrpc::decode_value(doc).is_err());
}

/// The documents nest one million arrays deep (20 MB).
fn deep() -> String {
    let n = 1_000_000;
    format!(
        "{}<value>x</value>{}",
        "<value><array><data>".repeat(n),
        "</data></array></value>".repeat(n)
    )
}

#[test]
fn deep_nesting_overflows_the_stack_and_aborts_the_process() {
    const CHILD: &str = "XENFT_SERDE_XMLRPC_GAPS_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let _ = serde_xmlrpc::value_from_str(&deep());
        return;
    }
    // Run the decoder in a child process (this test binary, this test only): a stack overflow
    // cannot be caught, it kills the process.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "deep_nesting_overflows_the_stack_and_aborts_the_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("overflowed its stack"), "{stderr}");
    // Ours: a typed error.
    assert_eq!(
        xmlrpc::decode_value(&deep()),
        Err(xmlrpc::XmlRpcError::TooDeep)
    );
}
