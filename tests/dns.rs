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

// ------------------------------------------------ a name that flickers

const NAME: &str = "db.pulsegate.test";
const PRIMARY: &str = "127.0.0.2:6379";
const REPLICA: &str = "127.0.0.3:6379";
/// pulsegate's admin server inside the lab.
const ADMIN: &str = "127.0.0.1:9900";

/// A GET to pulsegate's admin server inside the lab.
fn admin_get(lab: &Lab, path: &str) -> support::admin::HttpReply {
    lab.enter(|| support::admin::request(ADMIN.parse().unwrap(), "GET", path, None, b""))
        .expect("enter the lab")
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// What writes got back.
#[derive(Debug, Default, Clone, Copy)]
struct Writes {
    ok: usize,
    read_only: usize,
    /// Connections refused, reset or silent.
    failed: usize,
}

impl std::ops::AddAssign for Writes {
    fn add_assign(&mut self, other: Writes) {
        self.ok += other.ok;
        self.read_only += other.read_only;
        self.failed += other.failed;
    }
}

/// The address the lab's hosts file gives `NAME` now: what a client that
/// resolves the name for each new connection (most drivers do) would use.
fn resolve_in(lab: &Lab) -> Option<SocketAddr> {
    let hosts = std::fs::read_to_string(lab.hosts_file()).ok()?;
    hosts
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some(NAME))
        .and_then(|line| line.split_whitespace().next())
        .and_then(|ip| format!("{ip}:6379").parse().ok())
}

fn point_name_at(lab: &Lab, addr: &str) {
    let ip = addr.split(':').next().unwrap();
    lab.set_hosts(&format!("127.0.0.1 localhost\n{ip} {NAME}\n"))
        .unwrap();
}

/// Sends `SET`s on connections of `per_connection` writes each, to
/// whatever `target()` names at each new connection, until `until`.
fn write_until(
    lab: &Lab,
    target: impl Fn() -> Option<SocketAddr>,
    per_connection: usize,
    until: Instant,
) -> Writes {
    let mut writes = Writes::default();
    while Instant::now() < until {
        let Some(addr) = target() else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let stream = lab
            .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
            .expect("enter the lab");
        let Ok(mut s) = stream else {
            writes.failed += 1;
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        for _ in 0..per_connection {
            let reply = s
                .write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
                .and_then(|_| {
                    let mut buf = [0u8; 256];
                    let n = s.read(&mut buf)?;
                    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
                });
            match reply.as_deref() {
                Ok("+OK\r\n") => writes.ok += 1,
                Ok(r) if r.starts_with("-READONLY") => writes.read_only += 1,
                _ => {
                    writes.failed += 1;
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    writes
}

/// A redis master on 127.0.0.2 and its replica on 127.0.0.3 in `lab`,
/// `NAME` pointing at the master, and pulsegate in front of the name,
/// routing to the primary, checking every `interval` and looking the name
/// up every 500 ms.
fn primary_and_replica_behind_a_name(
    lab: &Lab,
    interval: Duration,
) -> Option<(Vec<LabProcess>, LabProcess)> {
    let program = or_skip(pulsegate::lab::servers::redis::Redis::find())?;
    let mut servers = Vec::new();
    for (label, addr, replica_of) in [
        ("redis-primary", PRIMARY, None),
        ("redis-replica", REPLICA, Some(PRIMARY)),
    ] {
        let redis = pulsegate::lab::servers::redis::Redis {
            program: program.clone(),
            dir: lab.dir().to_path_buf(),
            replica_of: replica_of.map(|a| a.parse().unwrap()),
            args: Vec::new(),
        };
        let addr: SocketAddr = addr.parse().unwrap();
        let process = lab
            .spawn_as(label, redis.command(addr))
            .expect("start redis-server");
        lab.wait_ready(&process, addr, Duration::from_secs(10))
            .expect("redis-server listens");
        servers.push(process);
    }
    point_name_at(lab, PRIMARY);
    let toml = format!(
        "[[listener]]\nname = \"flicker\"\nbind = \"{}\"\nbackends = [\"{NAME}:6379\"]\n\
         resolve_interval = \"500ms\"\n\
         [listener.check]\nkind = \"redis\"\ninterval = \"{}ms\"\ntimeout = \"400ms\"\n\
         jitter = \"0s\"\n[listener.routing]\nrole = \"primary\"\n\
         [admin]\nbind = \"{ADMIN}\"\n",
        proxy_addr(),
        interval.as_millis()
    );
    let proxy = lab
        .start_pulsegate_with(&exe(), proxy_addr(), &toml)
        .expect("start pulsegate");
    let ready = Instant::now() + Duration::from_secs(10);
    // One write, once the check has verified the primary.
    let once = || Instant::now() + Duration::from_millis(1);
    while write_until(lab, || Some(proxy_addr()), 1, once()).ok == 0 {
        assert!(
            Instant::now() < ready,
            "no write through pulsegate: {}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some((servers, proxy))
}

/// The name flips between the primary and its replica every 2 s for 30 s
/// (a managed database's DNS after a failover, or a misconfigured
/// record), under load. Through pulsegate no write is answered read-only
/// and no session is cut; clients that resolve the name themselves write
/// to the replica half the time.
#[test]
fn a_flickering_name_never_sends_a_write_to_the_replica() {
    let Some(lab) = lab_or_skip("dns-flicker") else {
        return;
    };
    let Some((_servers, proxy)) =
        primary_and_replica_behind_a_name(&lab, Duration::from_millis(500))
    else {
        return;
    };
    let start = Instant::now();
    let until = start + Duration::from_secs(30);
    let (through, direct) = std::thread::scope(|scope| {
        let flipper = scope.spawn(|| {
            let mut flips = 0;
            while Instant::now() < until {
                std::thread::sleep(Duration::from_secs(2));
                flips += 1;
                point_name_at(&lab, if flips % 2 == 1 { REPLICA } else { PRIMARY });
            }
            flips
        });
        let through: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| write_until(&lab, || Some(proxy_addr()), 20, until)))
            .collect();
        let direct: Vec<_> = (0..2)
            .map(|_| scope.spawn(|| write_until(&lab, || resolve_in(&lab), 20, until)))
            .collect();
        let sum = |handles: Vec<std::thread::ScopedJoinHandle<'_, Writes>>| {
            let mut total = Writes::default();
            for h in handles {
                total += h.join().unwrap();
            }
            total
        };
        let (t, d) = (sum(through), sum(direct));
        assert!(flipper.join().unwrap() >= 14, "the name flipped too rarely");
        (t, d)
    });
    eprintln!("30 s of a flickering name: through pulsegate {through:?}; direct {direct:?}");
    assert!(
        direct.read_only > 0,
        "the flicker never reached a client: {direct:?}"
    );
    assert!(through.ok > 1000, "too little load: {through:?}");
    assert_eq!(
        through.read_only,
        0,
        "writes answered read-only through pulsegate: {through:?}\n{}",
        proxy.stderr()
    );
    assert_eq!(
        through.failed,
        0,
        "sessions cut or refused through pulsegate: {through:?}\n{}",
        proxy.stderr()
    );
}

/// Sends one redis command (RESP array of `args`) to `addr` in the lab;
/// the first line of the reply.
fn redis_command(lab: &Lab, addr: &str, args: &[&str]) -> String {
    let mut command = format!("*{}\r\n", args.len());
    for arg in args {
        command.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    let mut s = connect(lab, addr.parse().unwrap());
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(command.as_bytes()).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
}

/// The name flickers; then the roles really flip (the primary demoted,
/// the replica promoted) while it still does. New connections through
/// pulsegate write to the new primary within one check interval (500 ms
/// here, plus the check's own time), whatever the name says at that
/// moment.
#[test]
fn a_real_failover_behind_a_flickering_name_is_followed_within_one_check_interval() {
    let Some(lab) = lab_or_skip("dns-failover") else {
        return;
    };
    let Some((_servers, proxy)) =
        primary_and_replica_behind_a_name(&lab, Duration::from_millis(500))
    else {
        return;
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let followed = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut flips = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                flips += 1;
                point_name_at(&lab, if flips % 2 == 1 { REPLICA } else { PRIMARY });
            }
        });
        std::thread::sleep(Duration::from_secs(4));
        // Fenced first, then promoted: from here a write that succeeds went
        // to the new primary.
        let (ip, port) = ("127.0.0.3", "6379");
        assert_eq!(
            redis_command(&lab, PRIMARY, &["REPLICAOF", ip, port]),
            "+OK"
        );
        assert_eq!(
            redis_command(&lab, REPLICA, &["REPLICAOF", "NO", "ONE"]),
            "+OK"
        );
        let flipped = Instant::now();
        let once = || Instant::now() + Duration::from_millis(1);
        loop {
            let writes = write_until(&lab, || Some(proxy_addr()), 1, once());
            if writes.ok == 1 {
                break;
            }
            assert!(
                flipped.elapsed() < Duration::from_secs(5),
                "never followed the new primary: {}",
                proxy.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let followed = flipped.elapsed();
        // And it stays there while the name goes on flickering.
        let after = write_until(
            &lab,
            || Some(proxy_addr()),
            20,
            Instant::now() + Duration::from_secs(3),
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            (after.read_only, after.failed),
            (0, 0),
            "{after:?}: {}",
            proxy.stderr()
        );
        followed
    });
    eprintln!(
        "new connections write to the new primary {:.3} s after the roles flipped",
        followed.as_secs_f64()
    );
    assert!(
        followed < Duration::from_millis(1000),
        "check interval 500ms: followed after {followed:?}: {}",
        proxy.stderr()
    );
}

/// The name returns both servers; the primary is fenced (made a replica)
/// and the replica promoted only once pulsegate has seen that no address
/// is primary. With a check interval of 2 s, the backend is then checked
/// every quarter interval: new connections write to the new primary
/// within about 0.5 s of the promotion, not up to 2 s.
#[test]
fn a_late_promotion_is_seen_within_a_quarter_interval() {
    let Some(lab) = lab_or_skip("dns-promote") else {
        return;
    };
    let Some((_servers, proxy)) = primary_and_replica_behind_a_name(&lab, Duration::from_secs(2))
    else {
        return;
    };
    let both = format!(
        "127.0.0.1 localhost\n{} {NAME}\n{} {NAME}\n",
        PRIMARY.split(':').next().unwrap(),
        REPLICA.split(':').next().unwrap()
    );
    lab.set_hosts(&both).unwrap();
    // Both addresses in the answer (a lookup every 500 ms) and checked:
    // the replica is held back, in /status and in the metrics.
    std::thread::sleep(Duration::from_millis(2500));
    let status = admin_get(&lab, "/status").json();
    let backend = &status["listeners"][0]["backends"][0];
    assert_eq!(
        backend["addresses"],
        serde_json::json!([PRIMARY]),
        "{backend}"
    );
    assert_eq!(
        backend["held_back"],
        serde_json::json!([REPLICA]),
        "{backend}"
    );
    let metrics = admin_get(&lab, "/metrics").body;
    let addresses = |used: &str| {
        support::admin::sample(&metrics, "pulsegate_backend_addresses", &[("use", used)])
    };
    assert_eq!(addresses("serving"), Some(1.0), "{metrics}");
    assert_eq!(addresses("held_back"), Some(1.0), "{metrics}");
    assert_eq!(
        redis_command(&lab, PRIMARY, &["REPLICAOF", "127.0.0.3", "6379"]),
        "+OK"
    );
    let fenced = Instant::now();
    const LOST: &str = "no address of the backend is verified in the wanted role";
    while !proxy.stderr().contains(LOST) {
        assert!(
            fenced.elapsed() < Duration::from_secs(5),
            "the fenced primary was never seen: {}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        redis_command(&lab, REPLICA, &["REPLICAOF", "NO", "ONE"]),
        "+OK"
    );
    let promoted = Instant::now();
    let once = || Instant::now() + Duration::from_millis(1);
    while write_until(&lab, || Some(proxy_addr()), 1, once()).ok == 0 {
        assert!(
            promoted.elapsed() < Duration::from_secs(5),
            "never followed the promotion: {}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let followed = promoted.elapsed();
    eprintln!(
        "new connections write to the promoted server {:.3} s after the promotion (interval 2 s)",
        followed.as_secs_f64()
    );
    assert!(
        followed < Duration::from_millis(1000),
        "followed {followed:?} after the promotion; quarter interval 500 ms: {}",
        proxy.stderr()
    );
}
