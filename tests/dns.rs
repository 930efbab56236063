//! DNS following: a backend named by host name is re-resolved, and when the
//! name moves to another address new connections follow without a restart.
//! Sessions to the old address are left alone while it answers (a name
//! that rotates its answers must not churn them); once the address has
//! been missing from several lookups they are probed, and those that stop
//! answering are evicted as `address_removed`. The name is controlled
//! through the namespace's own /etc/hosts (`ip netns exec` bind-mounts
//! /etc/netns/<ns>/hosts), rewritten in place by the test.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use pulsegate::lab::{Lab, LabProcess};
use support::*;

/// Serves every connection with its `tag` in answer to anything it reads.
fn tagged_server(listener: TcpListener, tag: &'static str) {
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(tag.as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn ask(s: &mut TcpStream) -> std::io::Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"who")?;
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Two servers answering "old" (127.0.0.2) and "new" (127.0.0.3) on port
/// 7000, the name `db.pulsegate.test` pointing at the old one, and
/// pulsegate in front of the name with `settings` added to its listener.
/// Returns pulsegate and a session that the old server answered.
fn proxy_in_front_of_the_name(lab: &Lab, settings: &str) -> (LabProcess, TcpStream) {
    tagged_server(listen(lab, "127.0.0.2:7000".parse().unwrap()), "old");
    tagged_server(listen(lab, "127.0.0.3:7000".parse().unwrap()), "new");
    lab.set_hosts("127.0.0.1 localhost\n127.0.0.2 db.pulsegate.test\n")
        .unwrap();
    let toml = format!(
        "[[listener]]\nname = \"dns\"\nbind = \"{}\"\nbackends = [\"db.pulsegate.test:7000\"]\n{settings}",
        proxy_addr()
    );
    let proxy = lab
        .start_pulsegate_with(&exe(), proxy_addr(), &toml)
        .expect("start pulsegate");
    let mut session = connect(lab, proxy_addr());
    assert_eq!(ask(&mut session).unwrap(), "old");
    (proxy, session)
}

/// Points the name at the new server.
fn move_the_name(lab: &Lab) {
    lab.set_hosts("127.0.0.1 localhost\n127.0.0.3 db.pulsegate.test\n")
        .unwrap();
}

/// Waits until a new connection through pulsegate reaches the new server;
/// how long that took from `since`.
fn followed_within(lab: &Lab, proxy: &LabProcess, since: Instant, within: Duration) -> Duration {
    loop {
        let mut c = connect(lab, proxy_addr());
        if ask(&mut c).ok().as_deref() == Some("new") {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < within,
            "never followed the name: {}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn backend_name_moving_to_another_address_is_followed_without_restart() {
    let Some(lab) = lab_or_skip("dns") else {
        return;
    };
    let (proxy, mut pooled) = proxy_in_front_of_the_name(&lab, "resolve_interval = \"500ms\"\n");
    move_the_name(&lab);
    let moved = Instant::now();
    let followed = followed_within(&lab, &proxy, moved, Duration::from_secs(5));
    eprintln!(
        "new connections follow the name {:.2} s after it moved",
        followed.as_secs_f64()
    );
    assert!(
        followed < Duration::from_millis(1500),
        "resolve_interval 500ms: {followed:?}"
    );

    // The old address left the answer, but its server still answers: the
    // session lives on. Three lookups later (1.5 s) it is probed.
    let deadline = Instant::now() + Duration::from_secs(4);
    while !proxy.stderr().contains("probing their sessions") {
        assert!(
            Instant::now() < deadline,
            "the removed address's sessions were never probed: {}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        ask(&mut pooled).unwrap(),
        "old",
        "a live session to a removed address was cut: {}",
        proxy.stderr()
    );
    assert!(evictions(&proxy).is_empty(), "{}", proxy.stderr());

    // The old server vanishes: the session is found dead like any other,
    // and the reason says why it was watched.
    lab.drop_host("127.0.0.2".parse().unwrap()).unwrap();
    let vanished = Instant::now();
    let deadline = vanished + Duration::from_secs(8);
    let eviction = loop {
        if let Some(e) = evictions(&proxy).first() {
            break e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no eviction of the dead old session: {}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "session to the removed, vanished address evicted after {:.2} s: {}",
        vanished.elapsed().as_secs_f64(),
        eviction.json
    );
    assert_eq!(eviction.reason, "address_removed", "{}", eviction.json);
}

#[test]
fn a_name_that_rotates_its_answers_does_not_churn_sessions() {
    let Some(lab) = lab_or_skip("dns-rotate") else {
        return;
    };
    let a: SocketAddr = "127.0.0.2:7000".parse().unwrap();
    let b: SocketAddr = "127.0.0.3:7000".parse().unwrap();
    tagged_server(listen(&lab, a), "a");
    tagged_server(listen(&lab, b), "b");
    let hosts = |ip: &str| format!("127.0.0.1 localhost\n{ip} db.pulsegate.test\n");
    lab.set_hosts(&hosts("127.0.0.2")).unwrap();
    let toml = format!(
        "[[listener]]\nname = \"dns\"\nbind = \"{}\"\nbackends = [\"db.pulsegate.test:7000\"]\n\
         resolve_interval = \"300ms\"\n",
        proxy_addr()
    );
    let proxy = lab
        .start_pulsegate_with(&exe(), proxy_addr(), &toml)
        .expect("start pulsegate");
    // A reader endpoint answering one address, then the other, then back:
    // sessions on both, every one of them kept.
    let mut sessions = Vec::new();
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(6) {
        lab.set_hosts(&hosts(if round % 2 == 0 {
            "127.0.0.3"
        } else {
            "127.0.0.2"
        }))
        .unwrap();
        round += 1;
        let mut s = connect(&lab, proxy_addr());
        ask(&mut s).expect("a new session is served");
        sessions.push(s);
        std::thread::sleep(Duration::from_millis(400));
    }
    let tags: Vec<String> = sessions
        .iter_mut()
        .enumerate()
        .map(|(i, s)| {
            ask(s).unwrap_or_else(|e| panic!("session {i} was cut: {e}\n{}", proxy.stderr()))
        })
        .collect();
    assert!(
        tags.iter().any(|t| t == "a") && tags.iter().any(|t| t == "b"),
        "the name should have sent sessions to both: {tags:?}"
    );
    assert!(evictions(&proxy).is_empty(), "{}", proxy.stderr());
    assert!(
        !proxy.stderr().contains("probing their sessions"),
        "{}",
        proxy.stderr()
    );
}

/// A session to a backend named by host name found dead makes the backend
/// suspect, and the name is looked up at once, not at the next
/// `resolve_interval` (here a minute): a managed database that failed over
/// by moving its name is followed as soon as the old host is seen gone.
#[test]
fn a_dead_session_has_its_backends_name_looked_up_at_once() {
    let Some(lab) = lab_or_skip("dns-suspect") else {
        return;
    };
    let (proxy, _session) = proxy_in_front_of_the_name(
        &lab,
        "resolve_interval = \"60s\"\nconnect_timeout = \"500ms\"\n\
         [listener.liveness]\nprobe_interval = \"1s\"\ndead_after = \"1s\"\n",
    );
    // The name moves and the old host vanishes; no lookup is due for a
    // minute.
    move_the_name(&lab);
    lab.drop_host("127.0.0.2".parse().unwrap()).unwrap();
    let vanished = Instant::now();
    let followed = followed_within(&lab, &proxy, vanished, Duration::from_secs(10));
    eprintln!(
        "new connections follow the moved name {:.2} s after the old host vanished",
        followed.as_secs_f64()
    );
    let log = proxy.stderr();
    assert!(log.contains("a session to it was found dead"), "{log}");
}
