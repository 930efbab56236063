//! The one place that checks a config: decode with serde (every key and
//! type problem, see `decode`), then validate every value and cross-field
//! rule, collecting all problems with their line, key and fix.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::decode;
use super::key_path::KeyLines;
use super::{
    bounds, AdminConfig, BackendAddr, CheckKind, Config, ConfigError, Listener, ListenerConfig,
    ListenerSettings, Problem, RoleWanted, SocketSettings, ValidConfig,
};

pub(super) fn parse_and_validate(text: &str, origin: &str) -> Result<ValidConfig, ConfigError> {
    let doc = decode::parse_toml(text, origin)?;
    let lines = KeyLines::new(text, &doc);
    let mut decoded = decode::decode(&doc, &lines);
    let Some(config) = decoded.config.take() else {
        return Err(invalid(origin, decoded.merge(Vec::new(), &lines)));
    };
    let mut problems = Vec::new();
    let listeners = validate(&config, &mut problems);
    let admin_bind = config
        .admin
        .as_ref()
        .and_then(|admin| check_admin(admin, &mut problems));
    if let Some(addr) = admin_bind {
        if let Some(l) = listeners.iter().find(|l| l.bind == addr) {
            problems.push(Problem {
                key: "admin.bind".into(),
                line: None,
                message: format!("{addr} is also the bind of listener `{}`", l.name),
                fix: "give the admin server its own port, e.g. 9900".into(),
            });
        }
    }
    let problems = decoded.merge(problems, &lines);
    if !problems.is_empty() {
        return Err(invalid(origin, problems));
    }
    let mut warnings = bounds::warnings(&listeners);
    if let (Some(admin), Some(bind)) = (&config.admin, admin_bind) {
        if open_to_others(admin, bind) {
            warnings.push(bounds::Warning {
                key: "admin.allow_unauthenticated".into(),
                message: format!(
                    "the admin server on {bind} has no token: anyone who reaches that port can \
                     drain (stop) or reload pulsegate. Set token_file or token_env unless only \
                     a trusted network can reach it."
                ),
            });
        }
    }
    Ok(ValidConfig {
        raw: config,
        listeners,
        admin_bind,
        warnings,
    })
}

fn invalid(origin: &str, problems: Vec<Problem>) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.to_string(),
        problems,
    }
}

/// A load balancer writes its PROXY header with the connection: a client
/// that takes longer only holds a session slot.
const MAX_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// `listen(2)` takes an int, and Linux keeps the accept queue's limit in
/// 32 bits; anything near this is a typo, not a queue.
const MAX_BACKLOG: u32 = 1 << 20;

struct Checker<'a> {
    problems: &'a mut Vec<Problem>,
    prefix: String,
}

impl Checker<'_> {
    fn problem(&mut self, key: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.problems.push(Problem {
            key: format!("{}.{key}", self.prefix),
            line: None,
            message: message.into(),
            fix: fix.into(),
        });
    }

    fn whole_seconds(&mut self, key: &str, value: Duration, min: u64, max: u64) {
        let ok = value.subsec_nanos() == 0 && (min..=max).contains(&value.as_secs());
        if !ok {
            self.problem(
                key,
                format!(
                    "{} is not a whole number of seconds from {min}s to {max}s",
                    humantime::format_duration(value)
                ),
                format!("the kernel's keepalive timer counts whole seconds; write e.g. \"{min}s\""),
            );
        }
    }

    fn socket(&mut self, table: &str, s: &SocketSettings, dead_after: Duration) {
        self.whole_seconds(
            &format!("{table}.keepalive_idle"),
            s.keepalive_idle,
            1,
            32767,
        );
        self.whole_seconds(
            &format!("{table}.keepalive_interval"),
            s.keepalive_interval,
            1,
            32767,
        );
        if !(1..=127).contains(&s.keepalive_count) {
            self.problem(
                &format!("{table}.keepalive_count"),
                format!("{} is outside 1..=127", s.keepalive_count),
                "use a small count such as 3",
            );
        }
        if s.user_timeout.is_zero() {
            self.problem(
                &format!("{table}.user_timeout"),
                "0 would disable the kernel backstop",
                "set it above dead_after and above the longest reader stall you tolerate, e.g. \"120s\"",
            );
        } else if s.user_timeout < dead_after {
            self.problem(
                &format!("{table}.user_timeout"),
                format!(
                    "{} is below liveness.dead_after ({}): the backstop would fire before the watcher decides",
                    humantime::format_duration(s.user_timeout),
                    humantime::format_duration(dead_after)
                ),
                "raise user_timeout (the default is \"120s\") or lower liveness.dead_after",
            );
        } else if s.user_timeout.as_millis() > u128::from(u32::MAX) {
            self.problem(
                &format!("{table}.user_timeout"),
                "longer than the kernel accepts (about 49 days)",
                "use a value such as \"120s\"",
            );
        }
    }
}

impl Checker<'_> {
    fn health(&mut self, l: &ListenerConfig) {
        let role_needs = match (&l.check, l.routing.role) {
            (_, RoleWanted::Any) => None,
            // Without a user the postgres check only sends an SSLRequest,
            // and the mysql check only reads the greeting.
            (Some(c), _)
                if matches!(c.kind, CheckKind::Postgres | CheckKind::Mysql) && c.user.is_none() =>
            {
                Some(format!(
                    "a `{}` check without `user` does not log in, so it reports no role",
                    format!("{:?}", c.kind).to_lowercase()
                ))
            }
            (Some(c), _)
                if matches!(
                    c.kind,
                    CheckKind::Postgres | CheckKind::Mysql | CheckKind::Redis
                ) =>
            {
                None
            }
            (Some(c), _) => Some(format!("a `{:?}` check reports no role", c.kind).to_lowercase()),
            (None, _) => Some("there is no [listener.check] to learn roles from".to_string()),
        };
        if let Some(why) = role_needs {
            self.problem(
                "routing.role",
                why,
                "add [listener.check] with kind = \"postgres\" or \"mysql\" (each with a `user`) \
                 or \"redis\", or set role = \"any\"",
            );
        }
        let Some(check) = &l.check else { return };
        if check.interval.is_zero() {
            self.problem("check.interval", "is zero", "use e.g. \"1s\"");
        }
        if check.timeout.is_zero() {
            self.problem("check.timeout", "is zero", "use e.g. \"800ms\"");
        }
        if check.jitter >= check.interval && !check.interval.is_zero() {
            self.problem(
                "check.jitter",
                "is not below interval",
                "use e.g. a tenth of interval",
            );
        }
        let sources = [
            check.password.is_some(),
            check.password_env.is_some(),
            check.password_file.is_some(),
        ];
        if sources.iter().filter(|&&s| s).count() > 1 {
            self.problem(
                "check.password",
                "password, password_env and password_file are exclusive",
                "keep only one of them (password_file or password_env keep it out of the config)",
            );
        }
        if check.kind == CheckKind::Http {
            if let Err(e) = super::parse_status_ranges(&check.expect_status) {
                self.problem(
                    "check.expect_status",
                    e,
                    "write e.g. \"200-399\" or \"200,204\"",
                );
            }
            if !check.path.starts_with('/') {
                self.problem("check.path", "must start with /", "write e.g. \"/healthz\"");
            }
        }
    }
}

fn check_admin(admin: &AdminConfig, problems: &mut Vec<Problem>) -> Option<SocketAddr> {
    let mut c = Checker {
        problems,
        prefix: "admin".to_string(),
    };
    if admin.token_file.is_some() && admin.token_env.is_some() {
        c.problem(
            "token_file",
            "token_file and token_env are exclusive",
            "keep only one of them",
        );
    }
    if admin
        .token_env
        .as_deref()
        .is_some_and(|v| v.trim().is_empty())
    {
        c.problem(
            "token_env",
            "is empty",
            "name an environment variable, e.g. \"PULSEGATE_ADMIN_TOKEN\"",
        );
    }
    if admin.request_timeout.is_zero() {
        c.problem("request_timeout", "is zero", "use e.g. \"5s\"");
    }
    if admin.recent_evictions > 10_000 {
        c.problem(
            "recent_evictions",
            format!(
                "{} would hold too many events in memory",
                admin.recent_evictions
            ),
            "use at most 10000 (the default is 100)",
        );
    }
    match admin.bind.parse::<SocketAddr>() {
        Ok(addr) => {
            if open_to_others(admin, addr) && !admin.allow_unauthenticated {
                c.problem(
                    "bind",
                    format!(
                        "{addr} can be reached from other hosts and no token is set: anyone who \
                         reaches it can POST /drain (which stops the proxy) or /reload"
                    ),
                    "set token_file or token_env, or bind to 127.0.0.1; to accept the risk \
                     (e.g. a port only a trusted network can reach), add allow_unauthenticated = true",
                );
            }
            Some(addr)
        }
        Err(_) => {
            c.problem(
                "bind",
                format!("`{}` is not an IP:port address", admin.bind),
                "write e.g. \"127.0.0.1:9900\" (loopback only unless a token is set)",
            );
            None
        }
    }
}

/// An admin server anyone else can reach and drive: a bind other than
/// loopback, and no token.
pub(super) fn open_to_others(admin: &AdminConfig, bind: SocketAddr) -> bool {
    !bind.ip().is_loopback() && admin.token_file.is_none() && admin.token_env.is_none()
}

fn validate(config: &Config, problems: &mut Vec<Problem>) -> Vec<Listener> {
    if config.listeners.is_empty() {
        problems.push(Problem {
            key: "listener".into(),
            line: None,
            message: "no [[listener]] table: pulsegate would proxy nothing".into(),
            fix: "add a [[listener]] with name, bind and backends (see config/pulsegate.toml)"
                .into(),
        });
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut binds: HashMap<SocketAddr, usize> = HashMap::new();
    let mut listeners = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let mut c = Checker {
            problems,
            prefix: format!("listener[{i}]"),
        };
        if let Some(listener) = check_listener(&mut c, i, l, &mut names, &mut binds) {
            listeners.push(listener);
        }
    }
    listeners
}

fn check_listener<'a>(
    c: &mut Checker<'_>,
    i: usize,
    l: &'a ListenerConfig,
    names: &mut HashMap<&'a str, usize>,
    binds: &mut HashMap<SocketAddr, usize>,
) -> Option<Listener> {
    let before = c.problems.len();
    if l.name.trim().is_empty() {
        c.problem(
            "name",
            "is empty",
            "give the listener a short name, e.g. \"postgres\"",
        );
    } else if let Some(first) = names.insert(&l.name, i) {
        c.problem(
            "name",
            format!("\"{}\" is already used by listener[{first}]", l.name),
            "names label logs and metrics; make each one unique",
        );
    }
    let bind = match l.bind.parse::<SocketAddr>() {
        Ok(addr) => {
            if let Some(first) = binds.insert(addr, i) {
                c.problem(
                    "bind",
                    format!("{addr} is already bound by listener[{first}]"),
                    "give each listener its own address or port",
                );
            }
            Some(addr)
        }
        Err(_) => {
            c.problem(
                "bind",
                format!("`{}` is not an IP address with a port", l.bind),
                "write e.g. \"127.0.0.1:6432\" or \"[::]:6432\"",
            );
            None
        }
    };
    if l.backends.is_empty() {
        c.problem(
            "backends",
            "is empty: connections would have nowhere to go",
            "list at least one backend, e.g. [\"10.0.0.5:5432\"]",
        );
    }
    let mut backends = Vec::new();
    for (j, b) in l.backends.iter().enumerate() {
        match b.parse::<BackendAddr>() {
            Ok(addr) if backends.contains(&addr) => c.problem(
                &format!("backends[{j}]"),
                format!("{addr} is listed twice"),
                "list each backend once, in failover order",
            ),
            Ok(addr) => backends.push(addr),
            Err(e) => c.problem(
                &format!("backends[{j}]"),
                e,
                "write host:port, e.g. \"10.0.0.5:5432\", \"[::1]:6379\" or \"db.internal:5432\"",
            ),
        }
    }
    if l.connect_timeout.is_zero() {
        c.problem("connect_timeout", "is zero", "use e.g. \"2s\"");
    }
    if l.pool.min_idle > 0 && l.pool.max_idle_age.is_zero() {
        c.problem(
            "pool.max_idle_age",
            "is zero",
            "use e.g. \"30s\" (below the backend's handshake timeout)",
        );
    }
    if l.pool.min_idle > l.max_connections.get() {
        c.problem(
            "pool.min_idle",
            format!(
                "{} is above max_connections ({})",
                l.pool.min_idle, l.max_connections
            ),
            "keep a few spares per backend, e.g. 4",
        );
    }
    if l.backlog == 0 || l.backlog > MAX_BACKLOG {
        c.problem(
            "backlog",
            format!("{} is not between 1 and {MAX_BACKLOG}", l.backlog),
            "keep the default 4096, or size it to the largest reconnect burst expected",
        );
    }
    if l.proxy_header_timeout.is_zero() || l.proxy_header_timeout > MAX_PROXY_HEADER_TIMEOUT {
        c.problem(
            "proxy_header_timeout",
            format!(
                "{} is not above 0 and at most {}",
                humantime::format_duration(l.proxy_header_timeout),
                humantime::format_duration(MAX_PROXY_HEADER_TIMEOUT)
            ),
            "a load balancer sends its header at once; use e.g. \"3s\"",
        );
    }
    if l.resolve_interval.is_zero() {
        c.problem("resolve_interval", "is zero", "use e.g. \"5s\"");
    }
    if l.drain_timeout.is_zero() {
        c.problem(
            "drain_timeout",
            "is zero: sessions would be cut at once on SIGTERM",
            "use e.g. \"30s\"",
        );
    }
    let lv = &l.liveness;
    c.whole_seconds("liveness.probe_interval", lv.probe_interval, 1, 32767);
    if lv.dead_after < Duration::from_secs(1) {
        c.problem(
            "liveness.dead_after",
            format!(
                "{} is too short: a live peer answers window probes only every ~0.5-0.9 s",
                humantime::format_duration(lv.dead_after)
            ),
            "use at least \"1s\"; \"3s\" is the default",
        );
    }
    c.socket("upstream", &l.upstream, lv.dead_after);
    c.socket("client", &l.client, lv.dead_after);
    c.health(l);
    if c.problems.len() > before {
        return None;
    }
    Some(Listener {
        name: l.name.clone(),
        bind: bind?,
        backends,
        settings: ListenerSettings::of(l),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_validated_listener_is_written_as_its_table() {
        let config = crate::config::parse(
            "[[listener]]\nname = \"a\"\nbind = \"[::1]:6432\"\n\
             backends = [\"127.0.0.1:5432\", \"db.example:5433\"]\n\
             accept_proxy = true\nproxy_header_timeout = \"1s\"\nsend_proxy = \"v2\"\n\
             [listener.routing]\nrole = \"primary\"\n[listener.check]\nkind = \"redis\"\n",
            "test",
        )
        .expect("valid");
        assert_eq!(config.listeners[0].written(), config.raw.listeners[0]);
        let settings = &config.listeners[0].settings;
        assert!(settings.accept_proxy);
        assert_eq!(settings.send_proxy, Some(crate::config::ProxyVersion::V2));
    }

    /// One listener with `more` keys after its required ones.
    fn listener(more: &str) -> String {
        format!(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:3307\"\n\
             backends = [\"127.0.0.1:3306\"]\n{more}\n"
        )
    }

    #[test]
    fn proxy_protocol_keys_are_checked() {
        let defaults = crate::config::parse(&listener(""), "test").expect("valid");
        let settings = &defaults.listeners[0].settings;
        assert!(!settings.accept_proxy);
        assert_eq!(settings.send_proxy, None);
        assert_eq!(settings.proxy_header_timeout, Duration::from_secs(3));
        let refused = |more: &str| {
            crate::config::parse(&listener(more), "test")
                .expect_err(more)
                .to_string()
        };
        let version = refused("send_proxy = \"v3\"");
        assert!(version.contains("send_proxy"), "{version}");
        assert!(
            version.contains("v3") && version.contains("`v1`") && version.contains("`v2`"),
            "{version}"
        );
        for timeout in ["0s", "61s"] {
            let e = refused(&format!("proxy_header_timeout = \"{timeout}\""));
            assert!(e.contains("proxy_header_timeout"), "{e}");
        }
    }

    #[test]
    fn backlog_defaults_to_4096_and_is_checked() {
        let defaults = crate::config::parse(&listener(""), "test").expect("valid");
        assert_eq!(defaults.listeners[0].settings.backlog, 4096);
        let set = crate::config::parse(&listener("backlog = 16384"), "test").expect("valid");
        assert_eq!(set.listeners[0].settings.backlog, 16384);
        for bad in ["0", "1048577"] {
            let e = crate::config::parse(&listener(&format!("backlog = {bad}")), "test")
                .expect_err(bad)
                .to_string();
            assert!(e.contains("backlog") && e.contains(bad), "{e}");
        }
        let negative = crate::config::parse(&listener("backlog = -1"), "test")
            .expect_err("negative")
            .to_string();
        assert!(negative.contains("backlog"), "{negative}");
    }

    #[test]
    fn backend_addresses() {
        assert!(matches!("10.0.0.5:5432".parse(), Ok(BackendAddr::Ip(_))));
        assert!(matches!("[::1]:6379".parse(), Ok(BackendAddr::Ip(_))));
        assert!(matches!(
            "DB-1.internal:5432".parse::<BackendAddr>(),
            Ok(BackendAddr::Dns { ref host, port: 5432 }) if host == "db-1.internal"
        ));
        for bad in [
            "db.internal",
            "db:0",
            "db:99999",
            "::1:5432",
            "bad_host!:1",
            ":5432",
        ] {
            assert!(
                bad.parse::<BackendAddr>().is_err(),
                "{bad} should be refused"
            );
        }
    }
}
