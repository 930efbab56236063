//! redis-server: nothing persisted, in the foreground, its files (a
//! replica's RDB) in a directory of its own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{find_program, HostServer, ServerError};

/// How to run a redis-server.
#[derive(Debug, Clone)]
pub struct Redis {
    pub program: PathBuf,
    /// Its working directory and `--dir`.
    pub dir: PathBuf,
    /// Starts as a replica of this server.
    pub replica_of: Option<SocketAddr>,
    /// More arguments (e.g. `--requirepass`), after the others.
    pub args: Vec<String>,
}

impl Redis {
    /// The installed `redis-server`, else [`ServerError::Missing`].
    pub fn find() -> Result<PathBuf, ServerError> {
        find_program("redis-server", "redis-server")
    }

    /// [`Redis::find`]'s redis-server with its files in `dir`.
    pub fn new(dir: &Path) -> Result<Redis, ServerError> {
        Ok(Redis {
            program: Redis::find()?,
            dir: dir.to_path_buf(),
            replica_of: None,
            args: Vec::new(),
        })
    }

    /// `redis-server --port P --bind IP` with no persistence, in the
    /// foreground, logging to stdout, answering clients from anywhere
    /// (`--protected-mode no`: a lab's clients are not on its loopback).
    pub fn command(&self, addr: SocketAddr) -> Command {
        let mut command = Command::new(&self.program);
        command.arg("--dir").arg(&self.dir);
        // Each its own dump file, should they share the directory.
        command.args(["--dbfilename", &format!("dump-{addr}.rdb")]);
        if let Some(primary) = self.replica_of {
            let (ip, port) = (primary.ip().to_string(), primary.port().to_string());
            command.args(["--replicaof", &ip, &port]);
        }
        command.args(["--port", &addr.port().to_string()]);
        command.args(["--bind", &addr.ip().to_string()]);
        command.args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        command.args(["--logfile", "", "--protected-mode", "no"]);
        command.args(&self.args);
        command.current_dir(&self.dir);
        command
    }

    /// Starts it on a free loopback port ([`HostServer`]), its log in
    /// [`Redis::dir`].
    pub fn start_on_host(&self) -> Result<HostServer, ServerError> {
        HostServer::start("redis-server", &self.dir, |addr| self.command(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_persists_nothing_and_follows_its_primary() {
        let redis = Redis {
            program: PathBuf::from("/usr/bin/redis-server"),
            dir: PathBuf::from("/tmp/r"),
            replica_of: Some("10.0.0.1:6379".parse().unwrap()),
            args: vec!["--enable-debug-command".into(), "yes".into()],
        };
        let command = redis.command("127.0.0.1:7001".parse().unwrap());
        let args: Vec<_> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("--replicaof 10.0.0.1 6379"), "{joined}");
        assert!(joined.contains("--port 7001 --bind 127.0.0.1"), "{joined}");
        assert!(joined.contains("--save  --appendonly no"), "{joined}");
        assert!(joined.ends_with("--enable-debug-command yes"), "{joined}");
    }
}
