//! The Grafana dashboard (`packaging/grafana/xenft.json`) and the README's metric table name
//! exactly the metrics the agent exports on `/metrics`: every name a query or the README uses
//! is in the agent's output, and every metric the agent exports is documented.

use std::collections::BTreeSet;
use std::path::PathBuf;

use xenft_agent::core::{LocalCopy, PeerView, VmView};
use xenft_agent::ids::{HostId, PathId, VmId};
use xenft_agent::lifecycle::{Level, Phase, VmRecord};
use xenft_agent::status::{StatusHub, StatusSnapshot};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Every `xenft_…` identifier in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("xenft_") {
        let start = i + at;
        let before_ok =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if before_ok {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The agent's `/metrics` with one peer (two paths) and one protected VM.
fn exported() -> String {
    let hub = StatusHub::new(8);
    let host = |h: &str| HostId::new(h).expect("host");
    hub.set(StatusSnapshot {
        host: Some(host("host1")),
        peers: vec![PeerView {
            host: host("host2"),
            paths: vec![(PathId::Alink(0), true, 5), (PathId::Mgmt, true, 7)],
            silent: false,
            last_heard_ms_ago: 5,
        }],
        vms: vec![VmView {
            record: VmRecord {
                vm: VmId::new("vm1").expect("vm"),
                level: Level::L3,
                raising_to: None,
                primary: host("host1"),
                secondary: host("host2"),
                generation: 1,
                phase: Phase::Protected,
                consistent: true,
                memory_mb: 64,
            },
            local: LocalCopy::Running,
            lease_valid: true,
            redirected: Vec::new(),
        }],
        ..StatusSnapshot::default()
    });
    hub.metrics()
}

/// Metric names with a series in `/metrics` (label sets stripped).
fn series(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let text = std::fs::read_to_string(repo().join("packaging/grafana/xenft.json"))
        .expect("packaging/grafana/xenft.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let exprs: Vec<&str> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(
        exprs.len() >= 8,
        "the dashboard has {} queries",
        exprs.len()
    );
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    let have = series(&exported());
    let missing: Vec<_> = used.difference(&have).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
    // And the dashboard shows all of them.
    let unused: Vec<_> = have.difference(&used).collect();
    assert!(unused.is_empty(), "exported but on no panel: {unused:?}");
}

#[test]
fn the_readme_documents_exactly_the_exported_metrics() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## Metrics")
        .nth(1)
        .expect("a \"## Metrics\" section in the README");
    let section = section.split("\n## ").next().unwrap_or(section);
    let documented: BTreeSet<String> = metric_names(section)
        .into_iter()
        .filter(|n| n.starts_with("xenft_agent_"))
        .collect();
    let have = series(&exported());
    assert_eq!(documented, have, "README's metrics vs /metrics");
}
