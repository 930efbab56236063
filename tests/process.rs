//! The `pulsegate` binary as an operator runs it: signals (SIGTERM drains,
//! a second exits at once, SIGHUP reloads), a drain asked through the admin
//! API ending the process (or not, with `then=stay`), exit codes, refusal
//! logging, and surviving descriptor exhaustion (a per-process limit, so
//! only a process of its own can show it). The admin API's behaviour is
//! tested in-process in tests/admin.rs.
//!
//! Every config binds port 0; a test learns the ports from the JSON log
//! (`listening` and `admin server listening`), so none is guessed. The
//! admin server binds 127.0.0.2:0 (loopback too): the config refuses an
//! admin bind that reads the same as a listener's, port 0 included.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::admin;

const BIN: &str = env!("CARGO_BIN_EXE_pulsegate");

/// A pulsegate process with its stderr captured to a file.
struct Running {
    child: Child,
    /// The port its listener is bound to.
    port: u16,
    log: tempfile::NamedTempFile,
    config: tempfile::NamedTempFile,
}

impl Running {
    /// Starts `pulsegate run` with one listener on port 0; `shell_prefix`
    /// may set limits (e.g. `ulimit -n 48;`).
    fn start(backend: SocketAddr, extra: &str, shell_prefix: &str) -> Running {
        Running::start_config(&listener_config(backend, extra), shell_prefix)
    }

    /// Starts `pulsegate run` with `config`, whose one listener binds port
    /// 0, and waits until it listens.
    fn start_config(config_text: &str, shell_prefix: &str) -> Running {
        let mut config = tempfile::NamedTempFile::new().unwrap();
        config.write_all(config_text.as_bytes()).unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{shell_prefix} exec \"$0\" --log-format json run -c \"$1\" 2>\"$2\"",
            ))
            .arg(BIN)
            .arg(config.path())
            .arg(log.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut running = Running {
            child,
            port: 0,
            log,
            config,
        };
        running.port = running.logged_addr("listening", "bind").port();
        running
    }

    /// The address in field `field` of the first `message` event, waiting
    /// up to 10 s for it.
    fn logged_addr(&mut self, message: &str, field: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self.events().into_iter().find_map(|e| {
                (e["message"] == message).then(|| e[field].as_str().map(str::to_owned))?
            });
            if let Some(addr) = found {
                return addr
                    .parse()
                    .unwrap_or_else(|e| panic!("{field} {addr:?}: {e}"));
            }
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "pulsegate never logged {message:?} ({exited:?}): {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        read(self.log.path())
    }

    /// The complete JSON lines of the log.
    fn events(&self) -> Vec<serde_json::Value> {
        let log = self.log();
        let complete = log.rsplit_once('\n').map_or("", |(done, _)| done);
        complete
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn cpu_seconds(&self) -> f64 {
        let stat = read(format!("/proc/{}/stat", self.child.id()).as_ref());
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        (f[11] + f[12]) as f64 / 100.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One listener `t` on port 0 in front of `backend`, then `extra`.
fn listener_config(backend: SocketAddr, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n{extra}\n"
    )
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// An echo backend on a thread per connection; lives as long as the test.
fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn echo_once(c: &mut TcpStream) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"ping")?;
    let mut b = [0u8; 4];
    c.read_exact(&mut b)?;
    assert_eq!(&b, b"ping");
    Ok(())
}

#[test]
fn sigterm_drains_then_exits_zero() {
    let mut p = Running::start(echo_backend(), "drain_timeout = \"1s\"", "");
    let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    echo_once(&mut c).unwrap();
    p.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    // Still relaying during the drain...
    echo_once(&mut c).unwrap();
    // ...then the session is evicted with reason drain and the process exits 0.
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(0), "{}", p.log());
    let log = p.log();
    assert!(log.contains("\"reason\":\"drain\""), "{log}");
    let mut b = [0u8; 1];
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
}

#[test]
fn second_signal_exits_at_once() {
    let mut p = Running::start(echo_backend(), "drain_timeout = \"60s\"", "");
    let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    echo_once(&mut c).unwrap();
    p.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        p.wait_exit(Duration::from_millis(300)),
        None,
        "still draining"
    );
    p.signal(Signal::SIGINT);
    let code = p.wait_exit(Duration::from_secs(2));
    assert_eq!(
        code,
        Some(1),
        "second signal: immediate exit 1; log: {}",
        p.log()
    );
}

#[test]
fn refusals_are_logged_once_per_burst_not_per_connection() {
    let p = Running::start(echo_backend(), "max_connections = 1", "");
    // Served within a few seconds of start (the one slot is free).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut first = loop {
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        if echo_once(&mut c).is_ok() {
            break c;
        }
        assert!(Instant::now() < deadline, "never served: {}", p.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut refused = 0;
    for _ in 0..50 {
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 1];
        if matches!(c.read(&mut b), Ok(0) | Err(_)) {
            refused += 1;
        }
    }
    assert_eq!(refused, 50);
    echo_once(&mut first).unwrap();
    let log = p.log();
    let lines = log.matches("max_connections reached").count();
    assert!(
        (1..=3).contains(&lines),
        "one line per burst, got {lines}:\n{log}"
    );
}

#[test]
fn accept_loop_survives_running_out_of_descriptors_without_spinning() {
    let backend = echo_backend();
    // Room for the runtime and a handful of sessions only.
    let p = Running::start(backend, "", "ulimit -n 40;");
    let mut clients: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(("127.0.0.1", p.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let cpu0 = p.cpu_seconds();
    std::thread::sleep(Duration::from_secs(2));
    let busy = p.cpu_seconds() - cpu0;
    // A loop retrying accept() on EMFILE would burn a whole core (~2 s).
    assert!(busy < 0.5, "the accept loop spins: {busy:.2} s CPU in 2 s");
    let log = p.log();
    let errors = log.matches("out of file descriptors").count();
    assert!(
        (1..=4).contains(&errors),
        "logged once per second at most, got {errors}:\n{log}"
    );
    // Clients caught at the limit were accepted but their upstream socket
    // could not be created: they must have been told at once (reset), not
    // left hanging. Either way none of them waits.
    clients.drain(..30);
    for c in clients.iter_mut() {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let outcome = echo_once(c);
        assert!(
            !matches!(&outcome, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a queued client hangs"
        );
    }
    drop(clients);
    // With descriptors free again, new clients are served.
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        echo_once(&mut c).expect("served again once descriptors are free");
    }
}

/// Running out of descriptors is our problem, not the backend's: the
/// health check that cannot open its socket (EMFILE) counts neither way,
/// so the backend is never marked down and no live session is evicted.
/// (Measured before: all 25 live sessions evicted as `backend_down`.)
#[test]
fn running_out_of_descriptors_marks_no_backend_down_and_evicts_no_session() {
    const LIMIT: usize = 64;
    let backend = echo_backend();
    let extra = "[listener.check]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\
         jitter = \"0s\"\nfall = 2\n\
         [admin]\nbind = \"127.0.0.2:0\"\nrequest_timeout = \"60s\"\n";
    let mut p = Running::start(backend, extra, &format!("ulimit -n {LIMIT};"));
    let admin = p.logged_addr("admin server listening", "address");
    let mut clients: Vec<TcpStream> = (0..60)
        .map(|_| TcpStream::connect(("127.0.0.1", p.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Asked side by side: a client still queued waits out its read timeout.
    let asked: Vec<_> = clients
        .drain(..)
        .map(|mut c| std::thread::spawn(move || echo_once(&mut c).ok().map(|()| c)))
        .collect();
    let mut live: Vec<TcpStream> = asked
        .into_iter()
        .filter_map(|t| t.join().unwrap())
        .collect();
    assert!(
        (5..60).contains(&live.len()),
        "the limit should leave some sessions live and refuse the rest: {} live",
        live.len()
    );
    // Take the descriptors the refused clients left free with idle admin
    // connections (one descriptor each) until a check finds none; the
    // log says when. (Counting /proc/<pid>/fd is not enough: a check
    // takes the last free descriptor and gives it back every interval.)
    let mut holders = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.log().contains("health check could not run on our side") {
        assert!(
            Instant::now() < deadline,
            "no check ever hit the descriptor limit ({} admin connections held):\n{}",
            holders.len(),
            p.log()
        );
        holders.extend(TcpStream::connect(admin).ok());
        std::thread::sleep(Duration::from_millis(100));
    }
    // More checks at the limit.
    std::thread::sleep(Duration::from_secs(2));
    for (i, c) in live.iter_mut().enumerate() {
        echo_once(c).unwrap_or_else(|e| panic!("live session {i} was lost: {e}\n{}", p.log()));
    }
    let log = p.log();
    assert!(
        log.contains("health check could not run on our side"),
        "the checks never hit the limit, so this test proves nothing:\n{log}"
    );
    assert!(
        !log.contains("\"to\":\"down\""),
        "the backend was marked down:\n{log}"
    );
    assert!(
        !log.contains("backend_down"),
        "sessions were evicted:\n{log}"
    );
    eprintln!(
        "{} live sessions kept, and the backend up, while its checks failed with EMFILE",
        live.len()
    );
    drop(holders);
}

/// A port nobody listens on, held (bound, never listening) so that no
/// other test can take it while the returned socket lives: connects to it
/// are refused.
fn closed_port() -> (SocketAddr, socket2::Socket) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (addr, socket)
}

/// SIGHUP re-reads the file: a backend that refused is replaced by one
/// that answers, on the same listening socket.
#[test]
fn sighup_reloads_the_config() {
    let (refusing, _held) = closed_port();
    let mut p = Running::start(refusing, "", "");
    let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    assert!(echo_once(&mut c).is_err(), "the refusing backend served");

    std::fs::write(p.config.path(), listener_config(echo_backend(), "")).unwrap();
    p.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.events().iter().any(|e| e["message"] == "config reloaded") {
        assert!(Instant::now() < deadline, "never reloaded: {}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    echo_once(&mut c).expect("the new backend answers");
    let events = p.events();
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "reloading the config" && e["signal"] == "SIGHUP"),
        "{}",
        p.log()
    );
    let reloaded = events
        .iter()
        .find(|e| e["message"] == "config reloaded")
        .unwrap();
    assert_eq!(reloaded["generation"], 2, "{reloaded}");
    assert!(p.running(), "a reload does not stop the process");
}

/// `POST /drain` (then exit, the default) ends the process once its last
/// session has ended, with exit code 0.
#[test]
fn an_admin_drain_ends_the_process_once_drained() {
    let mut p = Running::start(
        echo_backend(),
        "drain_timeout = \"10s\"\n[admin]\nbind = \"127.0.0.2:0\"\n",
        "",
    );
    let admin = p.logged_addr("admin server listening", "address");
    let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    echo_once(&mut c).unwrap();

    let r = admin::call(admin, "POST", "/drain", None);
    assert_eq!(r.status, 202, "{}", r.body);
    std::thread::sleep(Duration::from_millis(300));
    echo_once(&mut c).expect("the open session goes on while draining");
    assert!(p.running(), "exited before its session ended");
    drop(c);
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(0), "{}", p.log());
    let log = p.log();
    assert!(log.contains("all listeners drained"), "{log}");
    assert!(log.contains("\"exiting\""), "{log}");
}

/// `POST /drain?then=stay`: once drained the process stays up, its admin
/// server answering, until SIGTERM; then it exits 0.
#[test]
fn an_admin_drain_that_stays_lasts_until_sigterm() {
    let mut p = Running::start(echo_backend(), "[admin]\nbind = \"127.0.0.2:0\"\n", "");
    let admin = p.logged_addr("admin server listening", "address");
    let r = admin::call(admin, "POST", "/drain?then=stay", None);
    assert_eq!(r.status, 202, "{}", r.body);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.log().contains("staying up drained") {
        assert!(Instant::now() < deadline, "never drained: {}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(p.running(), "then=stay: the process stays up");
    assert_eq!(admin::call(admin, "GET", "/healthz", None).status, 200);

    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(0), "{}", p.log());
}

/// Runs `pulsegate run` on `config` to its exit (within 10 s): exit code
/// and stderr.
fn run_to_exit(config: &str) -> (Option<i32>, String) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(config.as_bytes()).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(file.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// An address already in use, a listener's or the admin server's, is a
/// runtime failure: exit 1, saying which.
#[test]
fn an_address_in_use_exits_1() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let backend = echo_backend();

    let listener =
        format!("[[listener]]\nname = \"t\"\nbind = \"{addr}\"\nbackends = [\"{backend}\"]\n");
    let (code, stderr) = run_to_exit(&listener);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("error: listener `t`: cannot bind {addr}")),
        "{stderr}"
    );

    let admin = listener_config(backend, &format!("[admin]\nbind = \"{addr}\"\n"));
    let (code, stderr) = run_to_exit(&admin);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("error: admin server: cannot bind {addr}")),
        "{stderr}"
    );
}
