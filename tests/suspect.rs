//! A failed health check makes a backend suspect, and pulsegate probes every
//! session to it at once: in a private network namespace, with a real
//! blackhole, an idle session is evicted within seconds even though its own
//! probe_interval is 30 s.

mod support;

use std::time::Duration;

use pulsegate::lab::ProxyConfig;
use support::*;

#[test]
fn suspect_backend_gets_all_its_sessions_probed_at_once() {
    let Some(lab) = lab_or_skip("suspect") else {
        return;
    };
    let backend = start_echo_backend(&lab, None);
    let mut config = ProxyConfig::new(proxy_addr(), backend_addr());
    // On its own the watcher would wait 30 s before probing this idle leg,
    // and on_down = "keep" rules out eviction by the down backend.
    config.probe_interval = Duration::from_secs(30);
    config.extra = "[listener.check]\nkind = \"tcp\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\n\
                    jitter = \"0s\"\nfall = 3\n[listener.routing]\non_down = \"keep\"\n"
        .to_string();
    let proxy = lab
        .start_pulsegate(&exe(), &config)
        .expect("start pulsegate");
    let mut client = connect(&lab, proxy_addr());
    exchange_line(&mut client);
    std::thread::sleep(Duration::from_millis(1500)); // the legs go quiet

    let fault = vanish(&lab, backend_addr().port(), &backend);
    let (end, at) = read_end(&mut client, Duration::from_secs(15));
    let detected = at - fault;
    eprintln!(
        "suspect probing: client saw {end:?} {:.2} s after the fault",
        detected.as_secs_f64()
    );
    assert!(
        matches!(end, ReadEnd::Error(_)),
        "the idle client is reset: {end:?}"
    );
    // check timeout 0.2 s + probe at once + retry 1 s + dead_after 1 s, with margin;
    // far below the 31.5 s the watcher alone would take at probe_interval 30 s.
    assert!(detected < Duration::from_secs(5), "{detected:?}");
    let eviction = wait_eviction(&proxy, Duration::from_secs(2));
    assert_eq!(eviction.reason, "probe_unanswered", "{:?}", eviction.json);
    assert_eq!(eviction.dead_leg, "upstream");
    let log = proxy.stderr();
    assert!(
        log.contains("backend suspect: probing all its sessions now"),
        "{log}"
    );
}
