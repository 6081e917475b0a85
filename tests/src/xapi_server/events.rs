//! `event.from` and `event.inject`, as xapi implements them (xen-api
//! `ocaml/xapi/xapi_event.ml`, result type in `ocaml/xapi-types/event_types.ml`):
//!
//! - tokens are `"%020d,%020d"` (database generation, message generation); the empty token
//!   means "from the beginning", so every object comes as `add`; anything else unparsable is
//!   `EVENT_FROM_TOKEN_PARSE_FAILURE [token]`;
//! - classes are matched case-insensitively (`vm`, `VM`), `*` is every class, `class/ref`
//!   one object;
//! - one event per changed object with its latest snapshot (`add` if created after the
//!   token), fields `id`, `timestamp`, `class` (lower case), `operation`, `ref`, `snapshot`
//!   (absent for `del`);
//! - `valid_ref_counts`: the number of objects of every class, zero included (Xen
//!   Orchestra's client re-reads its tasks when the `task` count differs from its own);
//! - the call waits up to `timeout` seconds for an event, and returns an empty batch then;
//! - `event.inject(class, ref)` touches the object (a `mod` event) and returns a token just
//!   before that event; `HANDLE_INVALID [class, ref]` unless `ref` is of exactly `class`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use xenft_xapi::xmlrpc::Value;

use super::calls::arg_str;
use super::objects::{class_event_name, Ev};
use super::{fail, methods, ApiResult, Failure, Shared};

/// Longest `event.from` wait honoured (Xen Orchestra's client asks for 60.1 s).
const MAX_EVENT_WAIT: f64 = 61.0;

pub(super) fn token(generation: u64) -> String {
    format!("{generation:020},{:020}", 0)
}

fn parse_token(t: &str) -> Result<u64, Failure> {
    if t.is_empty() {
        return Ok(0);
    }
    let bad = || fail("EVENT_FROM_TOKEN_PARSE_FAILURE", &[t]);
    let (generation, msg) = t.split_once(',').ok_or_else(bad)?;
    msg.trim().parse::<u64>().map_err(|_| bad())?;
    generation.trim().parse().map_err(|_| bad())
}

fn class_matches(filters: &[String], class: &str, r: &str) -> bool {
    filters.iter().any(|f| {
        f == "*" || f.eq_ignore_ascii_case(class) || {
            match f.split_once('/') {
                Some((c, fr)) => c.eq_ignore_ascii_case(class) && fr == r,
                None => false,
            }
        }
    })
}

fn event_value(id: u64, class: &str, op: &str, r: &str, snapshot: Option<Value>) -> Value {
    let mut m = BTreeMap::new();
    m.insert("id".into(), Value::str(id.to_string()));
    m.insert("timestamp".into(), Value::str("0.0"));
    m.insert("class".into(), Value::str(class));
    m.insert("operation".into(), Value::str(op));
    m.insert("ref".into(), Value::str(r));
    if let Some(s) = snapshot {
        m.insert("snapshot".into(), s);
    }
    Value::Struct(m)
}

fn batch(events: Vec<Value>, generation: u64, counts: &BTreeMap<String, usize>) -> Value {
    let mut all: BTreeMap<String, Value> = methods::methods()
        .names()
        .filter_map(|n| n.split_once('.').map(|(c, _)| c))
        .filter(|c| *c != "system")
        .map(|c| (class_event_name(c), Value::Int(0)))
        .collect();
    for (c, n) in counts {
        all.insert(c.clone(), Value::Int(i32::try_from(*n).unwrap_or(i32::MAX)));
    }
    let mut m = BTreeMap::new();
    m.insert("events".into(), Value::Array(events));
    m.insert("valid_ref_counts".into(), Value::Struct(all));
    m.insert("token".into(), Value::str(token(generation)));
    Value::Struct(m)
}

pub(super) async fn from(sh: &Arc<Shared>, method: &str, args: &[Value]) -> ApiResult {
    let filters: Vec<String> = args[0]
        .as_array()
        .ok_or_else(|| fail("FIELD_TYPE_ERROR", &["classes"]))?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let token = arg_str(args, 1, method)?;
    let timeout = match &args[2] {
        Value::Double(d) => *d,
        v => v.as_i64().map(|i| i as f64).unwrap_or(0.0),
    };
    let timeout = if timeout.is_finite() {
        timeout.clamp(0.0, MAX_EVENT_WAIT)
    } else {
        0.0
    };
    if token.is_empty() {
        let db = sh.lock();
        let events = db
            .objects
            .iter()
            .filter(|(r, o)| class_matches(&filters, &class_event_name(o.class), r))
            .map(|(r, o)| {
                event_value(
                    db.last_event,
                    &class_event_name(o.class),
                    "add",
                    r,
                    Some(Value::Struct(o.fields.clone())),
                )
            })
            .collect();
        return Ok(batch(events, db.last_event, &db.counts()));
    }
    let since = parse_token(token)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    let mut rx = sh.event_tx.subscribe();
    loop {
        {
            let db = sh.lock();
            if since < db.dropped_upto {
                return Err(fail("EVENTS_LOST", &[]));
            }
            // One event per object: its latest state; "add" if created after the token.
            let mut per_obj: BTreeMap<&str, (u64, &'static str, &Ev)> = BTreeMap::new();
            for e in db.events.iter().filter(|e| e.id > since) {
                if !class_matches(&filters, &e.class, &e.obj_ref) {
                    continue;
                }
                let op = match per_obj.get(e.obj_ref.as_str()) {
                    Some((_, "add", _)) if e.op != "del" => "add",
                    _ => e.op,
                };
                per_obj.insert(e.obj_ref.as_str(), (e.id, op, e));
            }
            if !per_obj.is_empty() || tokio::time::Instant::now() >= deadline {
                let mut evs: Vec<_> = per_obj.into_values().collect();
                evs.sort_by_key(|(id, _, _)| *id);
                let events = evs
                    .into_iter()
                    .map(|(id, op, e)| {
                        event_value(id, &e.class, op, &e.obj_ref, e.snapshot.clone())
                    })
                    .collect();
                return Ok(batch(events, db.last_event.max(since), &db.counts()));
            }
        }
        // On timeout, loop once more to return an empty batch with the current token.
        let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
    }
}

pub(super) fn inject(sh: &Shared, method: &str, args: &[Value]) -> ApiResult {
    let class = arg_str(args, 0, method)?;
    let r = arg_str(args, 1, method)?;
    let mut db = sh.lock();
    match db.objects.get(r) {
        Some(o) if o.class == class => {}
        _ => return Err(fail("HANDLE_INVALID", &[class, r])),
    }
    let before = db.last_event;
    sh.emit(&mut db, r, "mod");
    Ok(Value::str(token(before)))
}
