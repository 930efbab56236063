//! The warm pool, in a private network namespace: clients are served from
//! pre-connected spares; when the backend is blackholed while the pool is
//! idle, or closes the spares itself, no client is ever handed a spare that
//! failed its last probe or was closed (200 acquisitions each).

mod support;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use pulsegate::lab::{Lab, LabProcess, TcpState};
use support::*;

const MIN_IDLE: usize = 4;

/// Spare connections pulsegate holds to the backend right now.
fn spares(lab: &Lab) -> usize {
    spare_ports(lab).len()
}

fn spare_ports(lab: &Lab) -> Vec<u16> {
    lab.tcp_sockets()
        .unwrap()
        .iter()
        .filter(|s| s.remote == backend_addr() && s.state == TcpState::Established)
        .map(|s| s.local.port())
        .collect()
}

fn pooled_sessions(proxy: &LabProcess) -> usize {
    proxy.stderr().matches("\"pooled\":true").count()
}

/// 200 clients at once; returns how many got a working echo.
fn acquire_200(lab: &Lab) -> usize {
    // A refused client may already be reset by the time connect() returns.
    let clients: Vec<TcpStream> = (0..200)
        .filter_map(|_| {
            lab.enter(|| TcpStream::connect_timeout(&proxy_addr(), Duration::from_secs(3)))
                .expect("enter the lab")
                .ok()
        })
        .collect();
    let workers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                use std::io::{Read, Write};
                let mut b = [0u8; 4];
                c.write_all(b"ping").is_ok() && c.read_exact(&mut b).is_ok() && &b == b"ping"
            })
        })
        .collect();
    workers
        .into_iter()
        .map(|w| usize::from(w.join().unwrap()))
        .sum()
}

fn start(lab: &Lab) -> LabProcess {
    start_aged(lab, "30s")
}

fn start_aged(lab: &Lab, max_idle_age: &str) -> LabProcess {
    let toml = format!(
        "[[listener]]\nname = \"pool\"\nbind = \"{}\"\nbackends = [\"{}\"]\nconnect_timeout = \"300ms\"\n\
         [listener.liveness]\nprobe_interval = \"1s\"\ndead_after = \"1s\"\n\
         [listener.pool]\nmin_idle = {MIN_IDLE}\nmax_idle_age = \"{max_idle_age}\"\n",
        proxy_addr(),
        backend_addr()
    );
    lab.start_pulsegate_logging(&exe(), proxy_addr(), &toml, "info,pulsegate::session=debug")
        .expect("start pulsegate")
}

fn wait_for_spares(lab: &Lab, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while spares(lab) < n {
        assert!(
            Instant::now() < deadline,
            "the pool never filled: {} spares",
            spares(lab)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn clients_are_served_from_the_pool_and_never_get_a_dead_spare() {
    let Some(lab) = lab_or_skip("pool") else {
        return;
    };
    let _backend = start_echo_backend(&lab, None);
    let proxy = start(&lab);
    wait_for_spares(&lab, MIN_IDLE);
    let mut c = connect(&lab, proxy_addr());
    exchange_line(&mut c);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(2);
    while pooled_sessions(&proxy) == 0 {
        assert!(
            Instant::now() < deadline,
            "no session was served from the pool:\n{}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for_spares(&lab, MIN_IDLE);

    // Blackhole the backend while the spares sit idle; their next probe
    // (within probe_interval) goes unanswered.
    lab.drop_port(backend_addr().port()).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let before = pooled_sessions(&proxy);
    let served = acquire_200(&lab);
    let after = pooled_sessions(&proxy);
    eprintln!(
        "blackholed backend: {served}/200 served, {} handed a spare",
        after - before
    );
    assert_eq!(
        after,
        before,
        "a spare that failed its probe was handed out:\n{}",
        proxy.stderr()
    );
    assert_eq!(served, 0, "nothing can be served by a blackholed backend");
}

#[test]
fn spares_closed_by_the_backend_are_never_handed_out() {
    let Some(lab) = lab_or_skip("poolclose") else {
        return;
    };
    let backend = start_echo_backend(&lab, None);
    let proxy = start(&lab);
    wait_for_spares(&lab, MIN_IDLE);
    // The backend goes away cleanly: its kernel closes every spare.
    backend.kill().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = pooled_sessions(&proxy);
    let served = acquire_200(&lab);
    let after = pooled_sessions(&proxy);
    eprintln!(
        "closed spares: {served}/200 served, {} handed a spare",
        after - before
    );
    assert_eq!(
        after,
        before,
        "a closed spare was handed out:\n{}",
        proxy.stderr()
    );
}

#[test]
fn spares_are_recycled_at_max_idle_age() {
    let Some(lab) = lab_or_skip("poolage") else {
        return;
    };
    let _backend = start_echo_backend(&lab, None);
    let _proxy = start_aged(&lab, "1s");
    wait_for_spares(&lab, MIN_IDLE);
    let first = spare_ports(&lab);
    std::thread::sleep(Duration::from_millis(2000));
    wait_for_spares(&lab, MIN_IDLE);
    let later = spare_ports(&lab);
    assert!(
        first.iter().all(|p| !later.contains(p)),
        "every spare older than max_idle_age was replaced: {first:?} -> {later:?}"
    );
}
