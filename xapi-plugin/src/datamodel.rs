//! XenAPI method names and arities from xapi's datamodel, kept as data in
//! `xapi-plugin/datamodel/xapi-methods.txt` (its header says where it comes from and how it was
//! derived).
//!
//! Two readers: the XenAPI test server answers unknown methods and wrong parameter counts from
//! it as xapi does, and the unit test below checks that every call this crate's client makes
//! names a method of the datamodel with the right number of parameters.
//!
//! Wire conventions (xen-api `ocaml/idl/ocaml_backend/gen_server.ml`, `server_helpers.ml`):
//! an unknown name is `MESSAGE_METHOD_UNKNOWN [name]`; a wrong count is
//! `MESSAGE_PARAMETER_COUNT_MISMATCH [name, expected, received]` where both counts leave out
//! the session reference and `expected` counts only parameters without a default value.

use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The method list as shipped in the repository.
pub const XAPI_METHODS: &str = include_str!("../datamodel/xapi-methods.txt");

/// One method's signature on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    /// Fewest wire parameters (session included when it takes one).
    pub min: usize,
    /// Most wire parameters.
    pub max: usize,
    /// Whether the first parameter is a session reference.
    pub session: bool,
}

impl Signature {
    /// Whether a call with `n` wire parameters is accepted.
    pub fn accepts(&self, n: usize) -> bool {
        (self.min..=self.max).contains(&n)
    }
}

/// A malformed line of the method list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("xapi-methods.txt line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// The methods of the datamodel, by wire name (`VM.get_record`).
#[derive(Debug, Clone, Default)]
pub struct Methods {
    by_name: BTreeMap<String, Signature>,
}

impl Methods {
    /// Parses the list format: `Class.method ARITY [nosession]`, `#` comments.
    pub fn parse(text: &str) -> Result<Methods, ParseError> {
        let mut by_name = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let err = |reason: String| ParseError {
                line: i + 1,
                reason,
            };
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let mut words = l.split_whitespace();
            let (Some(name), Some(arity)) = (words.next(), words.next()) else {
                return Err(err(format!("expected `Class.method ARITY`, got {l:?}")));
            };
            let session = match words.next() {
                None => true,
                Some("nosession") => false,
                Some(w) => return Err(err(format!("unknown flag {w:?}"))),
            };
            if !name.contains('.') {
                return Err(err(format!("{name:?} is not Class.method")));
            }
            let num = |s: &str| {
                s.parse::<usize>()
                    .map_err(|_| err(format!("bad arity {arity:?}")))
            };
            let (min, max) = match arity.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(arity)?, num(arity)?),
            };
            if min > max || (session && min == 0) {
                return Err(err(format!("impossible arity {arity:?}")));
            }
            if by_name
                .insert(name.to_string(), Signature { min, max, session })
                .is_some()
            {
                return Err(err(format!("{name} listed twice")));
            }
        }
        Ok(Methods { by_name })
    }

    /// The list shipped in the repository (parsed once).
    pub fn shipped() -> &'static Methods {
        static M: OnceLock<Methods> = OnceLock::new();
        M.get_or_init(|| {
            Methods::parse(XAPI_METHODS).unwrap_or_else(|e| panic!("shipped method list: {e}"))
        })
    }

    /// A method's signature.
    pub fn get(&self, name: &str) -> Option<Signature> {
        self.by_name.get(name).copied()
    }

    /// Every method name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Whether `class` has a method `class.<anything>` in the list.
    pub fn has_class(&self, class: &str) -> bool {
        let prefix = format!("{class}.");
        self.by_name
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix))
    }

    /// xapi's answer to calling `name` with `n` wire parameters, if it is a failure:
    /// `MESSAGE_METHOD_UNKNOWN [name]` or `MESSAGE_PARAMETER_COUNT_MISMATCH [name, expected,
    /// received]` (counts without the session, `expected` without defaulted parameters).
    pub fn check_call(&self, name: &str, n: usize) -> Result<Signature, (String, Vec<String>)> {
        let Some(sig) = self.get(name) else {
            return Err((
                crate::codes::MESSAGE_METHOD_UNKNOWN.to_string(),
                vec![name.to_string()],
            ));
        };
        if sig.accepts(n) {
            return Ok(sig);
        }
        let session = usize::from(sig.session);
        Err((
            crate::codes::MESSAGE_PARAMETER_COUNT_MISMATCH.to_string(),
            vec![
                name.to_string(),
                (sig.min - session).to_string(),
                n.saturating_sub(session).to_string(),
            ],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Class;

    #[test]
    fn shipped_list_parses_and_has_the_classes_we_use() {
        let m = Methods::shipped();
        for class in [
            "session", "pool", "host", "VM", "VBD", "VDI", "SR", "network", "VIF", "secret",
            "event", "task", "message",
        ] {
            assert!(m.has_class(class), "no {class} methods in xapi-methods.txt");
        }
        assert_eq!(
            m.get("session.login_with_password"),
            Some(Signature {
                min: 2,
                max: 4,
                session: false
            })
        );
        assert!(!m.has_class("V"), "a class prefix is not a class");
    }

    #[test]
    fn check_call_answers_as_xapi() {
        let m = Methods::shipped();
        assert_eq!(
            m.check_call("VM.no_such", 1).unwrap_err(),
            ("MESSAGE_METHOD_UNKNOWN".into(), vec!["VM.no_such".into()])
        );
        // VM.get_record(session, vm) called with the session only: xapi counts without it.
        assert_eq!(
            m.check_call("VM.get_record", 1).unwrap_err().1,
            vec!["VM.get_record", "1", "0"]
        );
        assert_eq!(
            m.check_call("session.login_with_password", 1)
                .unwrap_err()
                .1,
            vec!["session.login_with_password", "2", "1"]
        );
        assert!(m.check_call("session.login_with_password", 2).is_ok());
        assert!(m.check_call("system.listMethods", 0).is_ok());
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        assert_eq!(Methods::parse("# c\nVM.x\n").unwrap_err().line, 2);
        assert!(Methods::parse("VM.x two").is_err());
        assert!(Methods::parse("VM.x 1 weird").is_err());
        assert!(Methods::parse("VM.x 1\nVM.x 1").is_err());
        assert!(Methods::parse("VM.x 3-2").is_err());
    }

    /// A XenAPI call found in the client's source: the method name (possibly a template with
    /// `{}` for the class and `{field}` for a map field) and its wire arity.
    #[derive(Debug)]
    struct CallSite {
        file: &'static str,
        name: String,
        arity: usize,
    }

    /// Counts the top-level elements of `vec![...]` starting at `s` (just after `vec![`).
    fn count_vec_elements(s: &str) -> Option<usize> {
        let mut depth = 0usize;
        let mut n = 0usize;
        let mut any = false;
        let mut in_str = false;
        let mut prev = ' ';
        for c in s.chars() {
            if in_str {
                if c == '"' && prev != '\\' {
                    in_str = false;
                }
                prev = c;
                continue;
            }
            match c {
                '"' => {
                    in_str = true;
                    any = true;
                }
                '(' | '[' | '{' => {
                    depth += 1;
                    any = true;
                }
                ')' | '}' => depth = depth.checked_sub(1)?,
                ']' if depth == 0 => return Some(n + usize::from(any)),
                ']' => depth -= 1,
                ',' if depth == 0 => {
                    // A trailing comma before `]` does not start another element.
                    n += 1;
                    any = false;
                    prev = c;
                    continue;
                }
                c if !c.is_whitespace() => any = true,
                _ => {}
            }
            prev = c;
        }
        None
    }

    /// Every `call*("Name", vec![..])` / `call*(&format!("{}.x", ..), vec![..])` in `src`.
    fn call_sites(file: &'static str, src: &str) -> Vec<CallSite> {
        let mut out = Vec::new();
        let patterns: [(&str, bool); 3] = [
            ("call(", true),
            ("call_with_timeout(", true),
            ("call_raw(", false),
        ];
        for (pat, session) in patterns {
            let mut rest = src;
            while let Some(i) = rest.find(pat) {
                let before = &rest[..i];
                rest = &rest[i + pat.len()..];
                // Method calls only (`.call(`), not definitions (`fn call(`).
                if !before.trim_end().ends_with('.') {
                    continue;
                }
                let head = rest.trim_start();
                let name = if let Some(lit) = head.strip_prefix('"') {
                    lit.split('"').next().unwrap_or_default().to_string()
                } else if let Some(f) = head.strip_prefix("&format!(\"") {
                    f.split('"').next().unwrap_or_default().to_string()
                } else {
                    // `call_raw(method, params, ..)` forwards a caller's name: not a call site.
                    continue;
                };
                let Some(v) = rest.find("vec![") else {
                    continue;
                };
                let arity = count_vec_elements(&rest[v + "vec![".len()..])
                    .unwrap_or_else(|| panic!("{file}: cannot count the arguments of {name}"));
                out.push(CallSite {
                    file,
                    name,
                    arity: arity + usize::from(session),
                });
            }
        }
        out
    }

    /// The concrete method names a call site can produce, using the classes and map fields the
    /// client lets through (see [`Class::map_fields`], [`Class::has_get_by_name_label`]).
    fn expand(site: &CallSite) -> Vec<String> {
        let Some((class_part, verb)) = site.name.split_once('.') else {
            panic!("{}: {:?} is not Class.method", site.file, site.name);
        };
        if class_part != "{}" {
            return vec![site.name.clone()];
        }
        let mut out = Vec::new();
        for class in Class::ALL {
            if verb.contains("{field}") {
                for field in class.map_fields() {
                    out.push(format!(
                        "{}.{}",
                        class.api_name(),
                        verb.replace("{field}", field)
                    ));
                }
            } else if verb == "get_by_name_label" {
                if class.has_get_by_name_label() {
                    out.push(format!("{}.{verb}", class.api_name()));
                }
            } else {
                assert!(
                    !verb.contains('{'),
                    "{}: template {:?} has a placeholder this test cannot expand",
                    site.file,
                    site.name
                );
                out.push(format!("{}.{verb}", class.api_name()));
            }
        }
        out
    }

    #[test]
    fn every_call_the_client_makes_is_in_the_datamodel_with_its_arity() {
        let mut sites = call_sites("api.rs", include_str!("api.rs"));
        sites.extend(call_sites("client.rs", include_str!("client.rs")));
        assert!(
            sites.len() >= 15,
            "the call-site scan found only {} calls: {sites:?}",
            sites.len()
        );
        let m = Methods::shipped();
        let mut problems = Vec::new();
        for site in &sites {
            for name in expand(site) {
                match m.get(&name) {
                    None => problems.push(format!(
                        "{}: {name} is not a XenAPI method (xapi answers MESSAGE_METHOD_UNKNOWN)",
                        site.file
                    )),
                    Some(sig) if !sig.accepts(site.arity) => problems.push(format!(
                        "{}: {name} is called with {} wire parameters, the datamodel has {}-{}",
                        site.file, site.arity, sig.min, sig.max
                    )),
                    Some(_) => {}
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn the_call_site_scan_sees_a_wrong_arity_and_an_unknown_name() {
        let src = r#"
            self.call("VM.get_record", vec![Value::str(a), Value::str(b)]).await;
            self.call(&format!("{}.no_such_verb", class.api_name()), vec![]).await;
        "#;
        let sites = call_sites("inline", src);
        assert_eq!(sites.len(), 2, "{sites:?}");
        assert_eq!(sites[0].arity, 3);
        let m = Methods::shipped();
        assert!(!m.get("VM.get_record").unwrap().accepts(sites[0].arity));
        assert!(expand(&sites[1]).iter().all(|n| m.get(n).is_none()));
        assert_eq!(count_vec_elements("a, f(b, c), \"x,]\",\n]"), Some(3));
        assert_eq!(count_vec_elements("]"), Some(0));
    }
}
