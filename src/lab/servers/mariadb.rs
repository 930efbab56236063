//! MariaDB: a data directory of its own made by `mariadb-install-db`, and
//! `mariadbd` on it with no option files read, its socket, pid file and
//! temporary files in that directory.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{find_program, is_root, run_to_end, HostServer, ServerError};

/// How long one client statement batch may take.
const SQL_TIMEOUT: Duration = Duration::from_secs(30);

/// A MariaDB data directory, ready to run a server on.
#[derive(Debug, Clone)]
pub struct MariaDb {
    pub server: PathBuf,
    /// Holds `data/`, `tmp/` and `init.sql`.
    pub dir: PathBuf,
    /// More `mariadbd` arguments (e.g. `--proxy-protocol-networks=...`),
    /// after the others.
    pub args: Vec<String>,
}

impl MariaDb {
    /// Runs `mariadb-install-db` into `dir/data` and writes `init_sql` (one
    /// statement per line) for the server to run at each start: users and
    /// grants, say. Root logs in from the socket only.
    pub fn install(dir: &Path, init_sql: &str) -> Result<MariaDb, ServerError> {
        let server = find_program("mariadbd", "mariadb-server")?;
        let install_db = find_program("mariadb-install-db", "mariadb-server")?;
        let data = dir.join("data");
        // Its own tmpdir: a starting server removes the temporary tables that
        // another one, bootstrapping beside it, is using in a shared /tmp.
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp)
            .map_err(ServerError::io(format!("cannot create {}", tmp.display())))?;
        let mut install = Command::new(install_db);
        install.arg("--no-defaults");
        install.arg(format!("--datadir={}", data.display()));
        install.arg(format!("--tmpdir={}", tmp.display()));
        install.args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if is_root() {
            install.arg("--user=root");
        }
        let installed = install
            .stdin(Stdio::null())
            .output()
            .map_err(ServerError::io("cannot run mariadb-install-db"))?;
        if !installed.status.success() {
            return Err(ServerError::Failed(format!(
                "mariadb-install-db failed ({}): {}{}",
                installed.status,
                String::from_utf8_lossy(&installed.stdout),
                String::from_utf8_lossy(&installed.stderr)
            )));
        }
        let init = dir.join("init.sql");
        fs::write(&init, init_sql)
            .map_err(ServerError::io(format!("cannot write {}", init.display())))?;
        Ok(MariaDb {
            server,
            dir: dir.to_path_buf(),
            args: Vec::new(),
        })
    }

    /// `mariadbd` listening on `addr`, running `init.sql` at start, with
    /// no binary log, no name resolution and a small buffer pool.
    pub fn command(&self, addr: SocketAddr) -> Command {
        let data = self.dir.join("data");
        let mut command = Command::new(&self.server);
        command.arg("--no-defaults");
        command.arg(format!("--datadir={}", data.display()));
        command.arg(format!("--socket={}", data.join("mysqld.sock").display()));
        command.arg(format!("--pid-file={}", data.join("mysqld.pid").display()));
        command.arg(format!("--port={}", addr.port()));
        command.arg(format!("--bind-address={}", addr.ip()));
        command.arg(format!("--tmpdir={}", self.dir.join("tmp").display()));
        command.arg(format!(
            "--init-file={}",
            self.dir.join("init.sql").display()
        ));
        command.args(["--skip-log-bin", "--skip-name-resolve"]);
        command.arg("--innodb-buffer-pool-size=16M");
        if is_root() {
            command.arg("--user=root");
        }
        command.args(&self.args);
        command
    }

    /// Runs `sql` as root through the server's socket with the `mariadb`
    /// client (tab-separated output, no column names); what it printed.
    pub fn sql(&self, sql: &str) -> Result<String, ServerError> {
        let client = find_program("mariadb", "mariadb-client")?;
        let mut command = Command::new(client);
        command.arg("--no-defaults");
        let socket = self.dir.join("data").join("mysqld.sock");
        command.arg(format!("--socket={}", socket.display()));
        command.args([
            "--user=root",
            "--batch",
            "--skip-column-names",
            "--execute",
            sql,
        ]);
        let log = self.dir.join("client.log");
        run_to_end(command, &log, SQL_TIMEOUT)?;
        fs::read_to_string(&log).map_err(ServerError::io(format!("cannot read {}", log.display())))
    }

    /// Starts it on a free loopback port ([`HostServer`], stopped with
    /// SIGTERM: mariadbd ignores SIGINT), its log in [`MariaDb::dir`].
    pub fn start_on_host(&self) -> Result<HostServer, ServerError> {
        HostServer::start("mariadb", &self.dir, |addr| self.command(addr))
            .map(|server| server.stop_with(nix::sys::signal::Signal::SIGTERM))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_reads_no_option_file_and_runs_the_init_file() {
        let mariadb = MariaDb {
            server: PathBuf::from("/usr/sbin/mariadbd"),
            dir: PathBuf::from("/tmp/m"),
            args: vec!["--proxy-protocol-networks=127.0.0.0/8".into()],
        };
        let command = mariadb.command("127.0.0.1:3307".parse().unwrap());
        let args: Vec<_> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[0], "--no-defaults", "{args:?}");
        assert!(args.contains(&"--port=3307".to_string()), "{args:?}");
        assert!(args.contains(&"--bind-address=127.0.0.1".to_string()));
        assert!(args.contains(&"--init-file=/tmp/m/init.sql".to_string()));
        assert_eq!(
            args.last().unwrap(),
            "--proxy-protocol-networks=127.0.0.0/8"
        );
    }
}
