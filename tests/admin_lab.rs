//! The admin server in a private network namespace, with real packet drops:
//! a real eviction shows in `/metrics` (counter and detection histogram) and
//! in `/status` with its TCP_INFO evidence; `/readyz` turns 503 when the
//! only backend is blackholed and 200 again when it returns.
//!
//! pulsegate runs in this test process, on a runtime whose threads joined
//! the lab's namespace, so every socket it opens is the lab's. The tests
//! share the process's metrics recorder: each names its listener after
//! itself.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pulsegate::lab::{Lab, ProxyConfig};
use support::admin::{sample, wait_for, HttpReply};
use support::*;
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "127.0.0.1:9900";

fn admin_addr() -> SocketAddr {
    ADMIN.parse().unwrap()
}

/// pulsegate served in this process inside a lab's namespace. Declare it
/// after the lab: it must stop before the namespace goes.
struct InLab {
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<()>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl InLab {
    /// Serves `config` (the lab's one-listener config, its listener named
    /// `name`) with the admin server on [`ADMIN`], inside `lab`.
    fn start(lab: &Lab, config: &ProxyConfig, name: &str) -> InLab {
        let lab_toml = config.to_toml();
        assert!(lab_toml.contains("name = \"lab\""), "{lab_toml}");
        let toml = format!(
            "{}\n[admin]\nbind = \"{ADMIN}\"\n",
            lab_toml.replacen("name = \"lab\"", &format!("name = \"{name}\""), 1)
        );
        let config = pulsegate::config::parse(&toml, "admin_lab.toml").expect("a valid config");
        let admin = config
            .raw
            .admin
            .as_ref()
            .zip(config.admin_bind)
            .map(|(a, bind)| pulsegate::admin::AdminSettings::from_config(a, bind).unwrap());
        // Threads started on a thread that joined the namespace are in it
        // too: the runtime's workers, hence every socket the proxy opens.
        lab.enter(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let shutdown = CancellationToken::new();
            let bound = runtime
                .block_on(pulsegate::Bound::bind(config, admin))
                .expect("bind in the lab");
            let served = runtime.spawn(pulsegate::run(bound, None, shutdown.clone()));
            InLab {
                shutdown,
                served,
                runtime: Some(runtime),
            }
        })
        .expect("enter the lab")
    }
}

impl Drop for InLab {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.served.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// The evictions `/status` lists, newest first.
fn status_evictions(lab: &Lab) -> Vec<serde_json::Value> {
    let status = call(lab, "GET", "/status").json();
    status["recent_evictions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits (at most `timeout`) for exactly one eviction in `/status`.
fn wait_eviction_in_status(lab: &Lab, timeout: Duration) -> serde_json::Value {
    let found = wait_for("an eviction in /status", timeout, || {
        let found = status_evictions(lab);
        if found.is_empty() {
            Err(found)
        } else {
            Ok(found)
        }
    });
    assert_eq!(found.len(), 1, "one session, one eviction: {found:#?}");
    found[0].clone()
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
    let config = ProxyConfig::new(proxy_addr(), backend_addr());
    let _proxy = InLab::start(&lab, &config, "evicting");
    let mut client = connect(&lab, proxy_addr());
    exchange_line(&mut client);

    vanish(&lab, backend_addr().port(), &backend);
    let eviction = wait_eviction_in_status(&lab, Duration::from_secs(10));
    assert_eq!(eviction["reason"], "probe_unanswered", "{eviction}");

    let lab_listener = [("listener", "evicting")];
    let probe = [("listener", "evicting"), ("reason", "probe_unanswered")];
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
    let upstream_leg = [("listener", "evicting"), ("leg", "upstream")];
    assert!(get("pulsegate_probes_sent_total", &upstream_leg) >= 1.0);
    assert!(get("pulsegate_probes_unanswered_total", &upstream_leg) >= 1.0);
    assert_eq!(
        get("pulsegate_connections_accepted_total", &lab_listener),
        1.0
    );
    let bytes = [
        ("listener", "evicting"),
        ("direction", "client_to_upstream"),
    ];
    assert_eq!(get("pulsegate_bytes_total", &bytes), 6.0);

    let status = call(&lab, "GET", "/status").json();
    let event = &status["recent_evictions"][0];
    assert_eq!(event["reason"], "probe_unanswered", "{status:#}");
    assert_eq!(event["dead_leg"], "upstream");
    assert_eq!(event["listener"], "evicting");
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
    config.extra = "[listener.check]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\n\
         fall = 2\nrise = 2\n"
        .to_string();
    let _proxy = InLab::start(&lab, &config, "ready");
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
    let config = ProxyConfig::new(proxy_addr(), backend_at);
    let _proxy = InLab::start(lab.near(), &config, "suspecting");
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

    let eviction = wait_eviction_in_status(lab.near(), Duration::from_secs(10));
    assert_eq!(eviction["reason"], "probe_unanswered", "{eviction}");
    let text = wait_for("the verdict in /metrics", Duration::from_secs(5), || {
        let text = call(lab.near(), "GET", "/metrics").body;
        let evicted = [
            ("listener", "suspecting"),
            ("leg", "upstream"),
            ("outcome", "evicted"),
        ];
        match sample(&text, "pulsegate_suspicions_total", &evicted) {
            Some(n) if n >= 1.0 => Ok(text),
            other => Err(other),
        }
    });
    let own = [("listener", "suspecting"), ("basis", "own")];
    assert_eq!(
        sample(&text, "pulsegate_verdict_corroboration_seconds_count", &own),
        Some(1.0),
        "{text}"
    );
    let backend = [("listener", "suspecting"), ("backend", "10.200.0.2:7000")];
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
    assert_eq!(status_evictions(lab.near()).len(), 1);
}
