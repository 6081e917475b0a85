//! Property tests of the XML-RPC codec: every value survives a round trip, and arbitrary bytes
//! never panic the decoders (they read hostile input: xapi replies, plugin argv).

use std::collections::BTreeMap;

use proptest::prelude::*;
use xenft_xapi::xmlrpc::{
    decode_call, decode_response, encode_call, encode_response, Response, Value,
};

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i32>().prop_map(Value::Int),
        any::<bool>().prop_map(Value::Bool),
        // XML 1.0 cannot carry most control characters; XenAPI strings do not contain them.
        "[^\u{0}-\u{8}\u{b}\u{c}\u{e}-\u{1f}\u{fffe}\u{ffff}]{0,20}".prop_map(Value::String),
        (-1e9f64..1e9f64).prop_map(Value::Double),
        any::<i64>().prop_map(Value::int64),
        Just(Value::Nil),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z0-9_.:-]{0,12}", inner, 0..6)
                .prop_map(|m: BTreeMap<String, Value>| Value::Struct(m)),
        ]
    })
}

proptest! {
    #[test]
    fn every_value_round_trips(v in value(), name in "[a-zA-Z_.]{1,20}") {
        let (n, params) = decode_call(&encode_call(&name, std::slice::from_ref(&v))).unwrap();
        prop_assert_eq!(n, name);
        prop_assert_eq!(&params[0], &v);
        prop_assert_eq!(decode_response(&encode_response(&v)).unwrap(), Response::Success(v));
    }

    #[test]
    fn arbitrary_input_never_panics(s in "\\PC{0,200}") {
        let _ = decode_call(&s);
        let _ = decode_response(&s);
    }

    #[test]
    fn token_soup_never_panics(parts in prop::collection::vec(prop::sample::select(vec![
        "<methodResponse>", "</methodResponse>", "<params>", "<param>", "</param>", "<value>",
        "</value>", "<value/>", "<array>", "<data>", "</data>", "</array>", "<struct>",
        "<member>", "<name>", "</name>", "</member>", "</struct>", "<string>", "</string>",
        "<int>", "</int>", "<i8>", "<nil/>", "<boolean>", "<double>", "1", "x", " ", "&amp;",
        "&#0;", "&#x110000;", "&bogus;", "&", "<![CDATA[", "]]>", "<!--", "-->", "<?", "?>",
        "<!DOCTYPE a>", "\u{feff}", "\r\n",
    ]), 0..200)) {
        let doc: String = parts.concat();
        let _ = decode_response(&doc);
        let _ = decode_call(&doc);
    }

    #[test]
    fn mutated_documents_never_panic(v in value(), cut in 0usize..400, junk in "[<>/&;a-z]{0,5}") {
        let doc = encode_response(&v);
        let mut cut = cut.min(doc.len());
        while !doc.is_char_boundary(cut) { cut -= 1; }
        let mutated = format!("{}{}{}", &doc[..cut], junk, &doc[cut..]);
        let _ = decode_response(&mutated);
    }
}
