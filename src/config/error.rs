//! Why a config was refused: a syntax error (alone: nothing after it can be
//! read), or every problem found, each with its key, line and fix.

use std::fmt;
use std::path::PathBuf;

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A TOML syntax error: nothing after it can be read, so it is the only
    /// problem reported.
    #[error("{origin}:{line}: {message}\n  fix: {fix}")]
    Syntax {
        origin: String,
        line: usize,
        message: String,
        fix: String,
    },
    /// Every problem found (unknown keys, wrong types, refused values,
    /// cross-field rules), reported together.
    #[error("{origin}: {} problem(s) in the config:\n{}", .problems.len(), render(origin, problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

/// One refused value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `listener[0].liveness.dead_after`.
    pub key: String,
    /// 1-based line of the key (or of its table when the key is absent).
    pub line: Option<usize>,
    pub message: String,
    pub fix: String,
}

fn render(origin: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.render(origin))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Problem {
    fn render(&self, origin: &str) -> String {
        let at = match self.line {
            Some(line) => format!("{origin}:{line}"),
            None => origin.to_string(),
        };
        format!(
            "  {at}: {}: {}\n    fix: {}",
            self.key, self.message, self.fix
        )
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render("config"))
    }
}
