//! PostgreSQL: the installed server binaries, clusters made with `initdb`
//! in a directory of their own, copies of them and streaming replicas,
//! and the commands that start a postmaster. PostgreSQL refuses to run as
//! root, so as root every server program runs as the `postgres` account
//! (through util-linux's `setpriv`, which execs the program: the spawned
//! pid is the program's own, also behind `ip netns exec`).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{find_program, is_root, run_to_end, HostServer, ServerError};
use crate::lab::Lab;

/// The superuser of a cluster made with [`Login::Trust`].
pub const USER: &str = "postgres";
/// initdb takes a few seconds; a copy of its result less.
const INIT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a postmaster that listens may take to accept logins.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The server binaries, and the account to run them as (when root).
#[derive(Debug, Clone)]
pub struct Install {
    bin: PathBuf,
    account: Option<(u32, u32)>,
}

/// Who logs in to a new cluster, and how.
#[derive(Debug, Clone, Copy)]
pub enum Login<'a> {
    /// Everyone, as the superuser [`USER`], without a password.
    Trust,
    /// Over TCP the superuser `user` with `password` (`md5` in
    /// pg_hba.conf: a role whose password is stored as SCRAM logs in with
    /// SCRAM, one stored as md5 with md5); on the unix socket everyone.
    /// The password is also in `<dir>/pwfile`.
    Password { user: &'a str, password: &'a str },
}

/// One cluster: `data/` and the server's unix socket in its directory.
#[derive(Debug, Clone)]
pub struct Cluster {
    install: Install,
    dir: PathBuf,
}

impl Install {
    /// The newest `/usr/lib/postgresql/<version>/bin` with `initdb` and
    /// `postgres` (else the directory of the `initdb` on PATH), and as root
    /// the `postgres` account and util-linux's `setsid`/`setpriv`.
    pub fn find() -> Result<Install, ServerError> {
        let bin = match newest_bin() {
            Some(bin) => bin,
            None => server_bin_on_path()?,
        };
        if !is_root() {
            return Ok(Install { bin, account: None });
        }
        let account = postgres_account().ok_or_else(|| {
            ServerError::Missing(
                "there is no `postgres` account to run PostgreSQL as (it refuses root); \
                 the postgresql package creates it"
                    .into(),
            )
        })?;
        for program in ["setsid", "setpriv"] {
            find_program(program, "util-linux")?;
        }
        Ok(Install {
            bin,
            account: Some(account),
        })
    }

    /// A client program of this PostgreSQL (`psql`, `pgbench`,
    /// `pg_isready`): beside the server's, else on PATH.
    pub fn client(&self, name: &str) -> Result<PathBuf, ServerError> {
        // Debian ships pgbench with the server, the others with the client.
        let package = match name {
            "pgbench" => "postgresql",
            _ => "postgresql-client",
        };
        match self.bin.join(name) {
            beside if beside.is_file() => Ok(beside),
            _ => find_program(name, package),
        }
    }

    /// `initdb` into `<dir>/data` (creating `dir`, owned by the account
    /// the server runs as), without syncing to disk: the cluster is
    /// thrown away after the run. Its output goes to `<dir>/initdb.log`.
    pub fn init(&self, dir: &Path, login: Login) -> Result<Cluster, ServerError> {
        let cluster = Cluster {
            install: self.clone(),
            dir: dir.to_path_buf(),
        };
        cluster.create_dir()?;
        let mut initdb = Command::new(self.bin.join("initdb"));
        initdb.arg("-D").arg(cluster.data());
        match login {
            Login::Trust => {
                initdb.args(["--auth=trust", "-U", USER]);
            }
            Login::Password { user, password } => {
                let pwfile = dir.join("pwfile");
                cluster.write_owned(&pwfile, &format!("{password}\n"))?;
                initdb.args(["--auth-host=md5", "--auth-local=trust", "-U", user]);
                initdb.arg(format!("--pwfile={}", pwfile.display()));
            }
        }
        initdb
            .args(["--no-sync", "--no-instructions", "-E", "UTF8", "--locale=C"])
            .current_dir(dir);
        if let Some((uid, gid)) = self.account {
            initdb.uid(uid).gid(gid);
        }
        run_to_end(initdb, &dir.join("initdb.log"), INIT_TIMEOUT)?;
        Ok(cluster)
    }

    /// `setpriv --reuid … --regid … --clear-groups --` when the programs
    /// run as the account, else nothing.
    fn as_account(&self) -> Vec<OsString> {
        let Some((uid, gid)) = self.account else {
            return Vec::new();
        };
        [
            "setpriv".to_string(),
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".into(),
            "--".into(),
        ]
        .map(OsString::from)
        .into()
    }
}

impl Cluster {
    /// Holds `data/`, the unix socket and the logs of the setup steps.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn install(&self) -> &Install {
        &self.install
    }

    /// Lets every host log in without a password, as a user or for
    /// replication: initdb trusts loopback only, and a lab's clients,
    /// proxies and replicas come across its link (a private namespace:
    /// nothing else can).
    pub fn trust_remote_hosts(&self) -> Result<(), ServerError> {
        let hba = self.data().join("pg_hba.conf");
        let mut rules = std::fs::OpenOptions::new()
            .append(true)
            .open(&hba)
            .map_err(ServerError::io(format!("cannot open {}", hba.display())))?;
        std::io::Write::write_all(
            &mut rules,
            b"host all all 0.0.0.0/0 trust\nhost replication all 0.0.0.0/0 trust\n",
        )
        .map_err(ServerError::io(format!("cannot write {}", hba.display())))
    }

    /// A copy of this (stopped) cluster's data in `<dir>/data`: an
    /// independent cluster without a second initdb.
    pub fn copy_to(&self, dir: &Path) -> Result<Cluster, ServerError> {
        let copy = Cluster {
            install: self.install.clone(),
            dir: dir.to_path_buf(),
        };
        copy.create_dir()?;
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(self.data()).arg(copy.data());
        run_to_end(cp, &dir.join("cp.log"), INIT_TIMEOUT)?;
        Ok(copy)
    }

    /// Starts the cluster as a standby from now on (`standby.signal`):
    /// with no primary to follow, a hot standby where
    /// `pg_is_in_recovery()` is true.
    pub fn make_standby(&self) -> Result<(), ServerError> {
        self.write_owned(&self.data().join("standby.signal"), "")
    }

    /// Replaces this cluster's data with a streaming replica of the
    /// running server at `primary` (`pg_basebackup -R`), run inside `lab`
    /// so it reaches the primary across the link.
    pub fn replicate_from(&self, lab: &Lab, primary: SocketAddr) -> Result<(), ServerError> {
        let data = self.data();
        std::fs::remove_dir_all(&data)
            .map_err(ServerError::io(format!("cannot remove {}", data.display())))?;
        let mut command = self.command(self.install.bin.join("pg_basebackup"));
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

    /// Runs SQL statements (each its own `-c`) as [`USER`] on this
    /// cluster's server at `addr` with psql, from inside `lab`; an error in
    /// any of them fails.
    pub fn sql(&self, lab: &Lab, addr: SocketAddr, statements: &[&str]) -> Result<(), ServerError> {
        let mut command = Command::new(self.install.client("psql")?);
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

    /// `[setpriv --reuid postgres …] postgres -D DATA -p PORT -k DIR
    /// -c listen_addresses=IP …` with durability off (the data is thrown
    /// away) and `settings` (e.g. `max_connections=30`) as more `-c`.
    /// The spawned pid is the postmaster's, in the caller's session: a
    /// Ctrl-C on the terminal reaches it too (SIGINT is its fast
    /// shutdown).
    pub fn postmaster(&self, addr: SocketAddr, settings: &[&str]) -> Command {
        let mut command = self.command(self.install.bin.join("postgres"));
        command.arg("-D").arg(self.data());
        command.args(["-p", &addr.port().to_string()]);
        command.arg("-k").arg(&self.dir);
        let listen = format!("listen_addresses={}", addr.ip());
        let fixed = [
            listen.as_str(),
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
        ];
        for setting in fixed.iter().chain(settings) {
            command.args(["-c", setting]);
        }
        command
    }

    /// [`Cluster::postmaster`] behind `setsid`, which execs it: in a
    /// session of its own and the leader of its process group, so a Ctrl-C
    /// on the terminal does not reach it (its owner stops it) and
    /// [`kill_group`](super::kill_group) reaches it whole.
    pub fn postmaster_in_own_session(&self, addr: SocketAddr, settings: &[&str]) -> Command {
        let postmaster = self.postmaster(addr, settings);
        let mut command = Command::new("setsid");
        command.arg(postmaster.get_program());
        command.args(postmaster.get_args());
        command.current_dir(&self.dir);
        command
    }

    /// Starts the cluster on a free loopback port ([`HostServer`], its log
    /// `<dir>/postgres.log`) and waits until it accepts logins.
    pub fn start_on_host(&self, settings: &[&str]) -> Result<HostServer, ServerError> {
        let server = HostServer::start("postgres", &self.dir, |addr| {
            self.postmaster(addr, settings)
        })?;
        self.wait_ready(&server)?;
        Ok(server)
    }

    /// Listening is not ready: until its startup ends, a login gets "the
    /// database system is starting up". Waits for `pg_isready`.
    fn wait_ready(&self, server: &HostServer) -> Result<(), ServerError> {
        let pg_isready = self.install.client("pg_isready")?;
        let addr = server.addr();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            server.check_running()?;
            let ready = Command::new(&pg_isready)
                .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
                .args(["-t", "2"])
                .output()
                .map_err(ServerError::io(format!(
                    "cannot run {}",
                    pg_isready.display()
                )))?;
            if ready.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ServerError::Failed(format!(
                    "PostgreSQL on {addr} does not accept logins after {READY_TIMEOUT:?}: {}\n{}",
                    String::from_utf8_lossy(&ready.stdout).trim(),
                    server.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `program` in the cluster's directory, as the account when root.
    fn command(&self, program: PathBuf) -> Command {
        let mut argv = self.install.as_account();
        argv.push(program.into());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        command.current_dir(&self.dir);
        command
    }

    /// Creates the directory, owned by the account.
    fn create_dir(&self) -> Result<(), ServerError> {
        let dir = &self.dir;
        std::fs::create_dir_all(dir)
            .map_err(ServerError::io(format!("cannot create {}", dir.display())))?;
        self.chown(dir)
    }

    /// Writes `path`, owned by the account.
    fn write_owned(&self, path: &Path, contents: &str) -> Result<(), ServerError> {
        std::fs::write(path, contents)
            .map_err(ServerError::io(format!("cannot write {}", path.display())))?;
        self.chown(path)
    }

    fn chown(&self, path: &Path) -> Result<(), ServerError> {
        let Some((uid, gid)) = self.install.account else {
            return Ok(());
        };
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(ServerError::io(format!("cannot chown {}", path.display())))
    }
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

/// The directory of the `initdb` on PATH (symlinks resolved), when
/// `postgres` is beside it: other layouts than Debian's.
fn server_bin_on_path() -> Result<PathBuf, ServerError> {
    let missing = || {
        ServerError::Missing(
            "PostgreSQL's server binaries (initdb, postgres) were not found under \
             /usr/lib/postgresql/<version>/bin or on PATH; install the postgresql package \
             (e.g. `apt-get install postgresql-15`)"
                .into(),
        )
    };
    let initdb = find_program("initdb", "postgresql").map_err(|_| missing())?;
    let real = std::fs::canonicalize(&initdb).map_err(|_| missing())?;
    match real.parent() {
        Some(bin) if bin.join("postgres").is_file() => Ok(bin.to_path_buf()),
        _ => Err(missing()),
    }
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

    fn cluster(account: Option<(u32, u32)>) -> Cluster {
        Cluster {
            install: Install {
                bin: PathBuf::from("/usr/lib/postgresql/15/bin"),
                account,
            },
            dir: PathBuf::from("/tmp/x/pg-primary"),
        }
    }

    fn argv(command: &Command) -> Vec<String> {
        std::iter::once(command.get_program())
            .chain(command.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

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
        let command = cluster(Some((104, 110)))
            .postmaster_in_own_session("127.0.0.1:5433".parse().unwrap(), &["max_connections=148"]);
        let args = argv(&command);
        assert_eq!(args[0], "setsid");
        assert_eq!(args[1], "setpriv");
        assert!(args.contains(&"--reuid=104".to_string()));
        assert!(args.contains(&"max_connections=148".to_string()));
        assert!(args.contains(&"listen_addresses=127.0.0.1".to_string()));
        assert_eq!(
            command.get_current_dir(),
            Some(Path::new("/tmp/x/pg-primary"))
        );
    }

    #[test]
    fn without_an_account_the_postmaster_is_the_program_itself() {
        let command = cluster(None).postmaster("127.0.0.1:5433".parse().unwrap(), &[]);
        let args = argv(&command);
        assert_eq!(args[0], "/usr/lib/postgresql/15/bin/postgres");
        assert_eq!(args[1..5], ["-D", "/tmp/x/pg-primary/data", "-p", "5433"]);
        assert!(args.contains(&"fsync=off".to_string()));
    }
}
