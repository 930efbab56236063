//! DNS following: a backend named by host name is re-resolved, and when the
//! name moves to another address new connections follow without a restart
//! and sessions to the old address are evicted. The name is controlled
//! through the namespace's own /etc/hosts (`ip netns exec` bind-mounts
//! /etc/netns/<ns>/hosts), rewritten in place by the test.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

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

#[test]
fn backend_name_moving_to_another_address_is_followed_without_restart() {
    let Some(lab) = lab_or_skip("dns") else {
        return;
    };
    let old: SocketAddr = "127.0.0.2:7000".parse().unwrap();
    let new: SocketAddr = "127.0.0.3:7000".parse().unwrap();
    tagged_server(listen(&lab, old), "old");
    tagged_server(listen(&lab, new), "new");
    lab.set_hosts("127.0.0.1 localhost\n127.0.0.2 db.pulsegate.test\n")
        .unwrap();
    let toml = format!(
        "[[listener]]\nname = \"dns\"\nbind = \"{}\"\nbackends = [\"db.pulsegate.test:7000\"]\n\
         resolve_interval = \"500ms\"\n",
        proxy_addr()
    );
    let proxy = lab
        .start_pulsegate_with(&exe(), proxy_addr(), &toml)
        .expect("start pulsegate");
    let mut pooled = connect(&lab, proxy_addr());
    assert_eq!(ask(&mut pooled).unwrap(), "old");

    lab.set_hosts("127.0.0.1 localhost\n127.0.0.3 db.pulsegate.test\n")
        .unwrap();
    let moved = Instant::now();
    loop {
        let mut c = connect(&lab, proxy_addr());
        if ask(&mut c).ok().as_deref() == Some("new") {
            break;
        }
        assert!(
            moved.elapsed() < Duration::from_secs(5),
            "never followed the name: {}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let followed = moved.elapsed();
    eprintln!(
        "new connections follow the name {:.2} s after it moved",
        followed.as_secs_f64()
    );
    assert!(
        followed < Duration::from_millis(1500),
        "resolve_interval 500ms: {followed:?}"
    );

    // The idle session to the address that left the set is evicted: the
    // watcher carries out the resolver's order at its next tick (tens of ms).
    let deadline = Instant::now() + Duration::from_secs(2);
    while !evictions(&proxy)
        .iter()
        .any(|e| e.reason == "address_removed")
    {
        assert!(
            Instant::now() < deadline,
            "no address_removed eviction: {}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = ask(&mut pooled);
    assert!(
        matches!(r.as_deref(), Err(_) | Ok("")),
        "the old session is evicted: {r:?}\n{}",
        proxy.stderr()
    );
}
