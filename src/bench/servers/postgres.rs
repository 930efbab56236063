//! PostgreSQL for the bench: the installed server binaries, two data
//! directories made with `initdb` (trust authentication, superuser
//! `postgres`) inside the lab's work directory, and the command that
//! starts a postmaster in its own session. PostgreSQL refuses to run
//! as root, so as root everything runs as the `postgres` account.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::super::BenchError;
use crate::lab::Lab;

/// The superuser of the clusters made here.
pub(crate) const USER: &str = "postgres";
/// initdb takes a few seconds; a copy of its result less.
const INIT_TIMEOUT: Duration = Duration::from_secs(120);

/// The server binaries, and the account to run them as (when root).
#[derive(Debug, Clone)]
pub(crate) struct Install {
    bin: PathBuf,
    account: Option<(u32, u32)>,
}

/// One cluster: how to start a postmaster on it.
#[derive(Debug, Clone)]
pub(crate) struct Server {
    install: Install,
    /// Holds `data/` and the unix socket.
    dir: PathBuf,
    max_connections: u32,
}

impl Install {
    /// The newest `/usr/lib/postgresql/<version>/bin` with `initdb`, and as
    /// root the `postgres` account and util-linux's `setsid`/`setpriv`.
    pub fn find() -> Result<Install, BenchError> {
        let bin = newest_bin().ok_or_else(|| {
            BenchError::Missing(
                "PostgreSQL's server binaries (initdb, postgres) were not found under \
                 /usr/lib/postgresql/<version>/bin; install the postgresql package \
                 (e.g. `apt-get install postgresql-15`)"
                    .into(),
            )
        })?;
        if !is_root() {
            return Ok(Install { bin, account: None });
        }
        let account = postgres_account().ok_or_else(|| {
            BenchError::Missing(
                "there is no `postgres` account to run PostgreSQL as (it refuses root); \
                 the postgresql package creates it"
                    .into(),
            )
        })?;
        for program in ["setsid", "setpriv"] {
            super::find_program(program, "util-linux")?;
        }
        Ok(Install {
            bin,
            account: Some(account),
        })
    }

    /// `initdb` once into `<work>/pg-primary/data`, then a copy into
    /// `<work>/pg-secondary/data`: two independent clusters.
    pub fn init_two(&self, work: &Path, max_connections: u32) -> Result<[Server; 2], BenchError> {
        let [a, b] = ["pg-primary", "pg-secondary"].map(|name| work.join(name));
        for dir in [&a, &b] {
            std::fs::create_dir_all(dir)
                .map_err(BenchError::io(format!("cannot create {}", dir.display())))?;
            if let Some((uid, gid)) = self.account {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                    .map_err(BenchError::io(format!("cannot chown {}", dir.display())))?;
            }
        }
        let mut initdb = Command::new(self.bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(a.join("data"))
            .args(["--auth=trust", "-U", USER])
            .args(["--no-sync", "--no-instructions", "-E", "UTF8", "--locale=C"])
            .current_dir(&a);
        if let Some((uid, gid)) = self.account {
            initdb.uid(uid).gid(gid);
        }
        run_bounded(initdb, &a.join("initdb.log"))?;
        // initdb trusts loopback only; the clients, the proxies and a
        // replica reach these servers across the lab's link (a private
        // namespace: nothing else can).
        let hba = a.join("data").join("pg_hba.conf");
        let mut rules = std::fs::OpenOptions::new()
            .append(true)
            .open(&hba)
            .map_err(BenchError::io(format!("cannot open {}", hba.display())))?;
        std::io::Write::write_all(
            &mut rules,
            b"host all all 0.0.0.0/0 trust\nhost replication all 0.0.0.0/0 trust\n",
        )
        .map_err(BenchError::io(format!("cannot write {}", hba.display())))?;
        let mut copy = Command::new("cp");
        copy.arg("-a").arg(a.join("data")).arg(b.join("data"));
        run_bounded(copy, &b.join("cp.log"))?;
        Ok([a, b].map(|dir| Server {
            install: self.clone(),
            dir,
            max_connections,
        }))
    }
}

impl Server {
    /// Replaces this cluster's data with a streaming replica of the
    /// running server at `primary` (`pg_basebackup -R`), run inside `lab`
    /// so it reaches the primary across the link.
    pub fn replicate_from(&self, lab: &Lab, primary: SocketAddr) -> Result<(), BenchError> {
        let data = self.dir.join("data");
        std::fs::remove_dir_all(&data)
            .map_err(BenchError::io(format!("cannot remove {}", data.display())))?;
        let mut command = self.as_account(self.install.bin.join("pg_basebackup"));
        command.args([
            "-h",
            &primary.ip().to_string(),
            "-p",
            &primary.port().to_string(),
        ]);
        command.args([
            "-U",
            USER,
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
            "-D",
        ]);
        command.arg(&data);
        Ok(lab.run_to_end("pg_basebackup", command, INIT_TIMEOUT)?)
    }

    /// Runs SQL statements (each its own `-c`) on this cluster's server at
    /// `addr` with psql, from inside `lab`; an error in any of them fails.
    pub fn sql(&self, lab: &Lab, addr: SocketAddr, statements: &[&str]) -> Result<(), BenchError> {
        let mut command = Command::new(self.install.bin.join("psql"));
        command.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()]);
        command.args([
            "-U",
            USER,
            "-d",
            "postgres",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
        ]);
        for statement in statements {
            command.args(["-c", statement]);
        }
        Ok(lab.run_to_end("psql", command, INIT_TIMEOUT)?)
    }

    /// `program` run as the `postgres` account when root.
    fn as_account(&self, program: PathBuf) -> Command {
        let Some((uid, gid)) = self.install.account else {
            return Command::new(program);
        };
        let mut command = Command::new("setpriv");
        command.args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
        ]);
        command.arg(program);
        command
    }

    /// `setsid [setpriv --reuid postgres ...] postgres -D DATA -p PORT ...`:
    /// each program execs the next, so the spawned pid is the postmaster's;
    /// in its own session, a Ctrl-C on the bench's terminal does not reach
    /// it (the bench stops it itself).
    pub fn command(&self, addr: SocketAddr) -> Command {
        let mut command = Command::new("setsid");
        if let Some((uid, gid)) = self.install.account {
            command.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "--",
            ]);
        }
        command.arg(self.install.bin.join("postgres"));
        command.arg("-D").arg(self.dir.join("data"));
        command.args(["-p", &addr.port().to_string()]);
        command.arg("-k").arg(&self.dir);
        let max_connections = format!("max_connections={}", self.max_connections);
        let listen = format!("listen_addresses={}", addr.ip());
        for setting in [
            listen.as_str(),
            max_connections.as_str(),
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
        ] {
            command.args(["-c", setting]);
        }
        command.current_dir(&self.dir);
        command
    }
}

/// Runs `command` with its output in `log`, killing it after
/// [`INIT_TIMEOUT`]; fails with the log when it does not succeed.
fn run_bounded(mut command: Command, log: &Path) -> Result<(), BenchError> {
    let shown = format!("{command:?}");
    let file =
        File::create(log).map_err(BenchError::io(format!("cannot create {}", log.display())))?;
    let err = file
        .try_clone()
        .map_err(BenchError::io(format!("cannot reopen {}", log.display())))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(BenchError::io(format!("cannot start {shown}")))?;
    let deadline = Instant::now() + INIT_TIMEOUT;
    let status: ExitStatus = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(BenchError::io(format!("cannot wait for {shown}")))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(BenchError::Setup(format!(
                "{shown} did not finish within {INIT_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.success() {
        return Ok(());
    }
    let output = std::fs::read_to_string(log).unwrap_or_default();
    Err(BenchError::Setup(format!(
        "{shown} failed ({status}): {}",
        output.trim()
    )))
}

/// True when this process runs as root (`/proc/self` belongs to its uid).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The newest installed PostgreSQL's `bin` directory (Debian's layout,
/// `/usr/lib/postgresql/<version>/bin`, holding `initdb` and `postgres`).
pub fn newest_bin() -> Option<PathBuf> {
    let mut bins: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .then_some((version, bin))
        })
        .collect();
    bins.sort();
    bins.pop().map(|(_, bin)| bin)
}

/// The uid and gid of the `postgres` account, from /etc/passwd.
pub fn postgres_account() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd_entry(&passwd, USER)
}

fn passwd_entry(passwd: &str, user: &str) -> Option<(u32, u32)> {
    let line = passwd.lines().find(|l| l.split(':').next() == Some(user))?;
    let mut fields = line.split(':').skip(2);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_account_in_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgresql:x:5:5::/:/bin/false\n\
                      postgres:x:104:110:PostgreSQL administrator:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(passwd_entry(passwd, "postgres"), Some((104, 110)));
        assert_eq!(passwd_entry(passwd, "nobody"), None);
    }

    #[test]
    fn the_command_runs_the_postmaster_in_its_own_session() {
        let server = Server {
            install: Install {
                bin: PathBuf::from("/usr/lib/postgresql/15/bin"),
                account: Some((104, 110)),
            },
            dir: PathBuf::from("/tmp/x/pg-primary"),
            max_connections: 148,
        };
        let command = server.command("127.0.0.1:5433".parse().unwrap());
        let args: Vec<_> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(command.get_program(), "setsid");
        assert_eq!(args[0], "setpriv");
        assert!(args.contains(&"--reuid=104".to_string()));
        assert!(args.contains(&"max_connections=148".to_string()));
        assert!(args.contains(&"listen_addresses=127.0.0.1".to_string()));
    }
}
