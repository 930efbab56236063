//! The Grafana dashboard: its variables, and every metric it queries is one
//! that a running proxy exports.

use std::collections::BTreeSet;

use super::*;

#[test]
fn dashboard_queries_only_exported_metrics_through_its_variables() {
    let dashboard = dashboard();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name}"))
    };
    assert_eq!(var("DS_PROMETHEUS")["type"], "datasource");
    assert_eq!(var("DS_PROMETHEUS")["query"], "prometheus");
    assert_eq!(
        var("listener")["definition"],
        "label_values(pulsegate_connections_active, listener)"
    );
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate panel id {}",
            p["id"]
        );
        if p["type"] == "row" {
            continue;
        }
        let title = &p["title"];
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {title}");
        }
    }
    let queried: BTreeSet<String> = dashboard_metrics(&dashboard)
        .into_iter()
        .map(|m| base_name(&m).0)
        .collect();
    let contract: BTreeSet<String> = EXPORTED_METRICS.iter().map(|m| m.to_string()).collect();
    let unknown: Vec<_> = queried.difference(&contract).collect();
    let unshown: Vec<_> = contract.difference(&queried).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics pulsegate does not export: {unknown:?}"
    );
    assert!(
        unshown.is_empty(),
        "exported metrics no panel shows: {unshown:?}"
    );
}

/// Runs the real binary, gives each metric something to count, and checks
/// that every name the dashboard queries is in `/metrics`.
#[test]
fn dashboard_metrics_are_exported_by_a_running_proxy() {
    let proxy = Proxy::start();
    let wanted = dashboard_metrics(&dashboard());

    let mut idle = TcpStream::connect(proxy.listen).unwrap();
    echo_once(&mut idle);
    let mut brief = TcpStream::connect(proxy.listen).unwrap();
    echo_once(&mut brief);
    brief.shutdown(Shutdown::Both).unwrap();
    // Its only backend refuses: an upstream connect failure and a refusal.
    let mut refused = TcpStream::connect(proxy.unreachable).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = refused.read(&mut [0u8; 1]);
    // Through the API rather than SIGHUP: a signal could beat the handler.
    let (status, body) = proxy.request("POST", "/reload");
    assert_eq!(status, 200, "POST /reload: {body}");

    // Probes need the idle session to stay quiet past probe_interval.
    let deadline = Instant::now() + Duration::from_secs(15);
    let missing = loop {
        let exposition = proxy.get("/metrics").1;
        let missing: Vec<String> = wanted
            .iter()
            .filter(|m| !exported(&exposition, m))
            .cloned()
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    drop(idle);
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics that /metrics lacks (no `# TYPE` line): {missing:?}\n\
         pulsegate metrics exported: {:?}\n--- log ---\n{}",
        exported_names(&proxy.get("/metrics").1),
        proxy.log()
    );
}

/// Every `pulsegate_*` name in the dashboard's queries.
fn dashboard_metrics(dashboard: &serde_json::Value) -> BTreeSet<String> {
    let mut exprs = vec![];
    collect_exprs(dashboard, &mut exprs);
    assert!(
        exprs.len() > 10,
        "only {} queries in the dashboard",
        exprs.len()
    );
    exprs.iter().flat_map(|e| metric_names(e)).collect()
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Tokens matching `pulsegate_[a-z0-9_]+`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = vec![];
    let mut rest = expr;
    while let Some(at) = rest.find("pulsegate_") {
        let preceded = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded {
            names.push(tail[..len].to_string());
        }
        rest = &tail[len..];
    }
    names
}

/// A histogram's series name mapped to its family: (`family`, is_series).
fn base_name(metric: &str) -> (String, bool) {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = metric.strip_suffix(suffix) {
            return (base.to_string(), true);
        }
    }
    (metric.to_string(), false)
}

/// Whether the exposition declares `metric` (a histogram's `_bucket`,
/// `_sum` and `_count` need their family declared as a histogram).
fn exported(exposition: &str, metric: &str) -> bool {
    let (family, is_series) = base_name(metric);
    exposition.lines().any(|l| {
        let mut words = l.split_whitespace();
        let declared = words.next() == Some("#")
            && words.next() == Some("TYPE")
            && words.next() == Some(&family);
        declared && (!is_series || words.next() == Some("histogram"))
    })
}

fn exported_names(exposition: &str) -> Vec<&str> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("pulsegate_"))
        .collect()
}

fn dashboard() -> serde_json::Value {
    let text = read(&deploy_dir().join("grafana/pulsegate-dashboard.json"));
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

#[test]
fn metric_names_are_read_from_queries() {
    let expr = "histogram_quantile(0.99, sum by (le) (rate(pulsegate_check_duration_seconds_bucket{x=\"pulsegate_no\"}[5m]))) / xpulsegate_y";
    assert_eq!(
        metric_names(expr),
        ["pulsegate_check_duration_seconds_bucket", "pulsegate_no"]
    );
    let exposition =
        "# TYPE pulsegate_check_duration_seconds histogram\n# TYPE pulsegate_bytes_total counter\n";
    assert!(exported(
        exposition,
        "pulsegate_check_duration_seconds_bucket"
    ));
    assert!(exported(exposition, "pulsegate_bytes_total"));
    assert!(!exported(exposition, "pulsegate_bytes"));
    assert!(!exported(exposition, "pulsegate_bytes_total_count"));
}

// ---------------------------------------------------------------- exec hooks
