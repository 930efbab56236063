//! The admin server in a private network namespace, with real packet drops:
//! a real eviction shows in `/metrics` (counter and detection histogram) and
//! in `/status` with its TCP_INFO evidence; `/readyz` turns 503 when the
//! only backend is blackholed and 200 again when it returns.

#[path = "support/admin.rs"]
mod admin;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use admin::{sample, wait_for, HttpReply};
use pulsegate::lab::{Lab, ProxyConfig};
use support::*;

const ADMIN: &str = "127.0.0.1:9900";

fn admin_addr() -> SocketAddr {
    ADMIN.parse().unwrap()
}

/// A request from inside the lab (the admin server listens there).
fn call(lab: &Lab, method: &str, path: &str) -> HttpReply {
    lab.enter(|| admin::request(admin_addr(), method, path, None, b""))
        .expect("enter the lab")
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

#[test]
fn a_real_eviction_shows_in_metrics_and_status() {
    let Some(lab) = lab_or_skip("admin-evict") else {
        return;
    };
    let backend = start_echo_backend(&lab, None);
    let mut config = ProxyConfig::new(proxy_addr(), backend_addr());
    config.extra = format!("\n[admin]\nbind = \"{ADMIN}\"\n");
    let proxy = lab
        .start_pulsegate(&exe(), &config)
        .expect("start pulsegate");
    let mut client = connect(&lab, proxy_addr());
    exchange_line(&mut client);

    vanish(&lab, backend_addr().port(), &backend);
    let eviction = wait_eviction(&proxy, Duration::from_secs(10));
    assert_eq!(eviction.reason, "probe_unanswered");

    let lab_listener = [("listener", "lab")];
    let probe = [("listener", "lab"), ("reason", "probe_unanswered")];
    let text = wait_for("the eviction in /metrics", Duration::from_secs(5), || {
        let text = call(&lab, "GET", "/metrics").body;
        match sample(&text, "pulsegate_evictions_total", &probe) {
            Some(n) if n >= 1.0 => Ok(text),
            other => Err(other),
        }
    });
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing:\n{text}"))
    };
    assert_eq!(get("pulsegate_evictions_total", &probe), 1.0);
    assert_eq!(
        get("pulsegate_detection_duration_seconds_count", &probe),
        1.0
    );
    // dead_after is 1 s: detection is at least that, and within the bound
    // `pulsegate check` promises (dead_after + a sweep), with margin.
    let detection = get("pulsegate_detection_duration_seconds_sum", &probe);
    assert!(
        (0.95..=3.0).contains(&detection),
        "detection took {detection} s"
    );
    let upstream_leg = [("listener", "lab"), ("leg", "upstream")];
    assert!(get("pulsegate_probes_sent_total", &upstream_leg) >= 1.0);
    assert!(get("pulsegate_probes_unanswered_total", &upstream_leg) >= 1.0);
    assert_eq!(
        get("pulsegate_connections_accepted_total", &lab_listener),
        1.0
    );
    let bytes = [("listener", "lab"), ("direction", "client_to_upstream")];
    assert_eq!(get("pulsegate_bytes_total", &bytes), 6.0);

    let status = call(&lab, "GET", "/status").json();
    let event = &status["recent_evictions"][0];
    assert_eq!(event["reason"], "probe_unanswered", "{status:#}");
    assert_eq!(event["dead_leg"], "upstream");
    assert_eq!(event["listener"], "lab");
    assert!(
        event["tcp_info"]["probes"].as_u64().unwrap() >= 2,
        "{event}"
    );
    let ms = event["detection_ms"].as_u64().unwrap();
    assert!((950..=3000).contains(&ms), "{event}");
}

#[test]
fn readyz_follows_a_blackholed_backend() {
    let Some(lab) = lab_or_skip("admin-ready") else {
        return;
    };
    let _backend = start_echo_backend(&lab, None);
    let mut config = ProxyConfig::new(proxy_addr(), backend_addr());
    config.extra = format!(
        "[listener.check]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\n\
         fall = 2\nrise = 2\n\n[admin]\nbind = \"{ADMIN}\"\n"
    );
    let _proxy = lab
        .start_pulsegate(&exe(), &config)
        .expect("start pulsegate");
    let status = |lab: &Lab| call(lab, "GET", "/readyz");
    wait_for("ready at start", Duration::from_secs(5), || {
        let r = status(&lab);
        if r.status == 200 {
            Ok(())
        } else {
            Err(r)
        }
    });

    lab.drop_port(backend_addr().port()).expect("DROP");
    let r = wait_for(
        "503 once the backend is blackholed",
        Duration::from_secs(5),
        || {
            let r = status(&lab);
            if r.status == 503 {
                Ok(r)
            } else {
                Err(r)
            }
        },
    );
    let reasons = r.json()["reasons"].to_string();
    assert!(reasons.contains("down"), "{reasons}");
    assert_eq!(call(&lab, "GET", "/healthz").status, 200);

    lab.undrop_port(backend_addr().port()).expect("remove DROP");
    wait_for("200 once it answers again", Duration::from_secs(5), || {
        let r = status(&lab);
        if r.status == 200 {
            Ok(())
        } else {
            Err(r)
        }
    });
}

/// While a leg waits for corroboration, `/status` shows it with its
/// evidence; once it is evicted, the metrics say on what basis. A flow
/// silently dropped on the emulated link while its host answers the other
/// sessions: the leg is suspected after two unanswered probes and evicted
/// on its own after four.
#[test]
fn a_leg_under_suspicion_shows_its_evidence_in_status_then_its_verdict_in_metrics() {
    let Some(lab) = linked_lab_or_skip("admin-suspect") else {
        return;
    };
    let backend_at = pulsegate::lab::LinkedLab::far_addr(BACKEND_PORT);
    let _backend = start_echo_backend_on(lab.far(), backend_at, None);
    let mut config = ProxyConfig::new(proxy_addr(), backend_at);
    config.extra = format!("\n[admin]\nbind = \"{ADMIN}\"\n");
    let proxy = lab
        .near()
        .start_pulsegate(&exe(), &config)
        .expect("start pulsegate");
    let mut clients: Vec<_> = (0..5).map(|_| connect(lab.near(), proxy_addr())).collect();
    for c in &mut clients {
        exchange_line(c);
    }
    std::thread::sleep(Duration::from_secs(2));
    let upstream = lab
        .near()
        .tcp_sockets()
        .unwrap()
        .into_iter()
        .find(|e| e.remote == backend_at)
        .expect("an upstream connection");
    lab.link()
        .drop_flow(upstream.local, upstream.remote)
        .unwrap();

    let suspect = wait_for(
        "a leg under suspicion in /status",
        Duration::from_secs(8),
        || {
            let status = call(lab.near(), "GET", "/status").json();
            match status["listeners"][0]["under_suspicion"].as_array() {
                Some(legs) if !legs.is_empty() => Ok(legs[0].clone()),
                other => Err(other.cloned()),
            }
        },
    );
    eprintln!("under suspicion: {suspect}");
    assert_eq!(suspect["leg"], "upstream", "{suspect}");
    assert_eq!(suspect["reason"], "probe_unanswered", "{suspect}");
    assert_eq!(suspect["exchanges_needed"], 4, "a clean link: {suspect}");
    assert!(
        suspect["waiting_for"]
            .as_str()
            .unwrap()
            .contains("its host answers"),
        "{suspect}"
    );
    assert!(
        suspect["tcp_info"]["probes"].as_u64().unwrap() >= 2,
        "{suspect}"
    );
    assert!(suspect["silent_ms"].as_u64().unwrap() >= 950, "{suspect}");

    let eviction = wait_eviction(&proxy, Duration::from_secs(10));
    assert_eq!(eviction.reason, "probe_unanswered", "{}", eviction.json);
    let text = wait_for("the verdict in /metrics", Duration::from_secs(5), || {
        let text = call(lab.near(), "GET", "/metrics").body;
        let evicted = [
            ("listener", "lab"),
            ("leg", "upstream"),
            ("outcome", "evicted"),
        ];
        match sample(&text, "pulsegate_suspicions_total", &evicted) {
            Some(n) if n >= 1.0 => Ok(text),
            other => Err(other),
        }
    });
    let own = [("listener", "lab"), ("basis", "own")];
    assert_eq!(
        sample(&text, "pulsegate_verdict_corroboration_seconds_count", &own),
        Some(1.0),
        "{text}"
    );
    let backend = [("listener", "lab"), ("backend", "10.200.0.2:7000")];
    assert_eq!(
        sample(&text, "pulsegate_backend_verdict_exchanges", &backend),
        Some(4.0),
        "{text}"
    );
    let status = call(lab.near(), "GET", "/status").json();
    assert_eq!(
        status["listeners"][0]["under_suspicion"],
        serde_json::json!([]),
        "an evicted leg is no longer listed"
    );
    // The host answered throughout: no other session was touched.
    assert_eq!(evictions(&proxy).len(), 1);
}
