//! From TOML text to a [`Config`], finding every key and type problem at
//! once. serde stops at the first value it cannot decode, so decoding runs
//! in passes: serde_path_to_error names the key a pass stopped at, the
//! problem is recorded with that key, and the next pass runs without it (its
//! default applies). A table that lacks a required key cannot be built: it
//! is left out, and the table holding it is not cross-checked, since its
//! rules would judge something the file does not say. Only a syntax error
//! stops everything: nothing after it can be read.

use std::collections::BTreeMap;

use serde_path_to_error::Segment;
use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;

use super::key_path::{line_at, KeyLines, KeyPath, Step};
use super::{Config, ConfigError, Problem};

/// Passes before giving up on a file: each pass removes one key, and this
/// bounds the work a file full of mistakes can cause.
const MAX_PASSES: usize = 200;

/// The file as a TOML document, or its syntax error.
pub(super) fn parse_toml<'t>(
    text: &'t str,
    origin: &str,
) -> Result<Spanned<DeTable<'t>>, ConfigError> {
    DeTable::parse(text).map_err(|e| syntax_error(text, origin, &e))
}

/// What decoding found.
#[derive(Default)]
pub(super) struct Decoded {
    /// The config without what could not be decoded; `None` when decoding
    /// had to stop.
    pub(super) config: Option<Config>,
    /// Each problem with its path in the file.
    problems: Vec<(KeyPath, Problem)>,
    /// For each array that lost elements, their indices in the file,
    /// ascending.
    removed: BTreeMap<KeyPath, Vec<usize>>,
    /// Tables left out of the cross-field checks: each held a table that
    /// could not be built.
    unchecked: Vec<KeyPath>,
}

/// Decodes `doc` into a [`Config`], pass after pass, each without the key
/// the pass before stopped at.
pub(super) fn decode(doc: &Spanned<DeTable<'_>>, lines: &KeyLines<'_, '_>) -> Decoded {
    let mut tree = doc.clone();
    let mut decoded = Decoded::default();
    for _ in 0..MAX_PASSES {
        let passed = serde_path_to_error::deserialize::<_, Config>(toml::de::Deserializer::from(
            tree.clone(),
        ));
        let err = match passed {
            Ok(config) => {
                decoded.config = Some(config);
                return decoded;
            }
            Err(err) => err,
        };
        let at = existing(tree.get_ref(), err.path());
        let message = err.inner().message().trim().to_string();
        let went_on = match missing_field(&message) {
            Some(field) => decoded.missing(&mut tree, &at, field, lines),
            None => {
                let line = err.inner().span().map(|s| lines.line_at(s.start));
                decoded.refused(&mut tree, &at, message, line, lines)
            }
        };
        if !went_on {
            return decoded;
        }
    }
    decoded.push(
        KeyPath::default(),
        None,
        format!("more than {MAX_PASSES} keys could not be decoded; the rest was not checked"),
        "correct these and check again",
    );
    decoded
}

impl Decoded {
    /// All problems in file order: decoding's, then `checked` (validate's,
    /// keyed in the decoded config) keyed in the file, less those about a
    /// key decoding already named or inside a table left unchecked.
    pub(super) fn merge(self, checked: Vec<Problem>, lines: &KeyLines<'_, '_>) -> Vec<Problem> {
        let mut kept = Vec::new();
        for mut problem in checked {
            let path = self.in_file(&KeyPath::parse(&problem.key));
            let repeats = self
                .problems
                .iter()
                .any(|(named, _)| named.within(&path) || path.within(named));
            let unchecked = self
                .unchecked
                .iter()
                .any(|table| !table.0.is_empty() && path.within(table));
            if repeats || unchecked {
                continue;
            }
            problem.key = path.to_string();
            problem.line = lines.line_of(&path);
            kept.push(problem);
        }
        let mut all: Vec<Problem> = self.problems.into_iter().map(|(_, p)| p).collect();
        all.extend(kept);
        all.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        all
    }

    /// A value serde refused: recorded, then removed so its default applies.
    fn refused(
        &mut self,
        tree: &mut Spanned<DeTable<'_>>,
        at: &KeyPath,
        message: String,
        line: Option<usize>,
        lines: &KeyLines<'_, '_>,
    ) -> bool {
        let path = self.in_file(at);
        let fix = fix_for(&message);
        self.push(path.clone(), lines.line_of(&path).or(line), message, fix);
        if !remove(tree.get_mut(), at) {
            return false;
        }
        self.record_removal(&path);
        true
    }

    /// The table at `at` lacks `field`, which has no default: it cannot be
    /// built, so it is removed and the table holding it is not cross-checked.
    fn missing(
        &mut self,
        tree: &mut Spanned<DeTable<'_>>,
        at: &KeyPath,
        field: &str,
        lines: &KeyLines<'_, '_>,
    ) -> bool {
        let table = self.in_file(at);
        let key = table.child(Step::Key(field.to_string()));
        let unchecked = match table.0.last() {
            Some(Step::Key(_)) => table.parent().unwrap_or_default(),
            _ => table.clone(),
        };
        let whole = if unchecked.0.is_empty() {
            "the file".to_string()
        } else {
            unchecked.to_string()
        };
        match self.problems.iter_mut().find(|(path, _)| *path == key) {
            // Its value was refused (and removed) in an earlier pass.
            Some((_, problem)) => {
                problem.message = format!(
                    "{}; `{field}` is required, so {whole} is checked further once this is fixed",
                    problem.message
                );
            }
            None => self.push(
                key.clone(),
                lines.line_of(&key),
                format!("required key `{field}` is missing; {whole} is checked further once it is there"),
                format!("add `{field}` to this table (README.md, section Configuration, lists every key)"),
            ),
        }
        self.unchecked.push(unchecked);
        if at.0.is_empty() || !remove(tree.get_mut(), at) {
            return false;
        }
        self.record_removal(&table);
        true
    }

    fn push(
        &mut self,
        path: KeyPath,
        line: Option<usize>,
        message: String,
        fix: impl Into<String>,
    ) {
        let key = if path.0.is_empty() {
            "(file)".to_string()
        } else {
            path.to_string()
        };
        let problem = Problem {
            key,
            line,
            message,
            fix: fix.into(),
        };
        self.problems.push((path, problem));
    }

    /// The file's path for a path in the tree being decoded, whose arrays
    /// may have lost elements.
    fn in_file(&self, current: &KeyPath) -> KeyPath {
        let mut steps = Vec::with_capacity(current.0.len());
        for step in &current.0 {
            let step = match step {
                Step::Index(index) => {
                    let removed = self.removed.get(&KeyPath(steps.clone()));
                    Step::Index(file_index(removed.map_or(&[], Vec::as_slice), *index))
                }
                Step::Key(key) => Step::Key(key.clone()),
            };
            steps.push(step);
        }
        KeyPath(steps)
    }

    /// Notes that the element at `path` (in the file) left its array.
    fn record_removal(&mut self, path: &KeyPath) {
        let Some((Step::Index(index), array)) = path.0.split_last() else {
            return;
        };
        let removed = self.removed.entry(KeyPath(array.to_vec())).or_default();
        if let Err(at) = removed.binary_search(index) {
            removed.insert(at, *index);
        }
    }
}

/// The index in the file of element `current` of an array that lost the
/// elements at `removed` (file indices, ascending).
fn file_index(removed: &[usize], current: usize) -> usize {
    let mut index = current;
    for &gone in removed {
        if gone > index {
            break;
        }
        index += 1;
    }
    index
}

/// The part of serde's path that leads to a value in `tree` (serde may name
/// a step below a value, such as a date-time's inner field).
fn existing(tree: &DeTable<'_>, path: &serde_path_to_error::Path) -> KeyPath {
    let mut steps = Vec::new();
    for segment in path.iter() {
        let step = match segment {
            Segment::Map { key } => Step::Key(key.clone()),
            Segment::Seq { index } => Step::Index(*index),
            _ => break,
        };
        steps.push(step);
        if lookup(tree, &steps).is_none() {
            steps.pop();
            break;
        }
    }
    KeyPath(steps)
}

fn lookup<'v, 'i>(tree: &'v DeTable<'i>, path: &[Step]) -> Option<&'v DeValue<'i>> {
    let (Step::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let mut value = tree.get(first.as_str())?.get_ref();
    for step in rest {
        value = match (step, value) {
            (Step::Key(key), DeValue::Table(t)) => t.get(key.as_str())?.get_ref(),
            (Step::Index(index), DeValue::Array(a)) => a.get(*index)?.get_ref(),
            _ => return None,
        };
    }
    Some(value)
}

fn lookup_mut<'v, 'i>(tree: &'v mut DeTable<'i>, path: &[Step]) -> Option<&'v mut DeValue<'i>> {
    let (Step::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let mut value = tree.get_mut(first.as_str())?.get_mut();
    for step in rest {
        value = match (step, value) {
            (Step::Key(key), DeValue::Table(t)) => t.get_mut(key.as_str())?.get_mut(),
            (Step::Index(index), DeValue::Array(a)) => a.get_mut(*index)?.get_mut(),
            _ => return None,
        };
    }
    Some(value)
}

/// Removes the value at `path`; false if there is none (or it is the file).
fn remove(tree: &mut DeTable<'_>, path: &KeyPath) -> bool {
    let Some((last, holder)) = path.0.split_last() else {
        return false;
    };
    if holder.is_empty() {
        return matches!(last, Step::Key(key) if tree.remove(key.as_str()).is_some());
    }
    match (last, lookup_mut(tree, holder)) {
        (Step::Key(key), Some(DeValue::Table(t))) => t.remove(key.as_str()).is_some(),
        (Step::Index(index), Some(DeValue::Array(a))) if *index < a.len() => {
            let kept: DeArray<'_> = a
                .iter()
                .enumerate()
                .filter(|(i, _)| i != index)
                .map(|(_, v)| v.clone())
                .collect();
            *a = kept;
            true
        }
        _ => false,
    }
}

/// The field named by serde's "missing field `x`".
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .split_once('`')
        .map(|(field, _)| field)
}

/// A one-line fix for what serde or the TOML parser said.
fn fix_for(message: &str) -> &'static str {
    if message.contains("unknown field") {
        "remove this key or correct its spelling (the keys each table accepts are listed in README.md, section Configuration)"
    } else if message.contains("duration") || message.contains("time unit") {
        "write durations as a number with a unit, e.g. \"500ms\", \"3s\", \"2m\""
    } else if message.contains("unknown variant") {
        "use one of the values listed in the message"
    } else if message.contains("nonzero") {
        "use a number of 1 or more"
    } else if message.contains("invalid type") {
        "give the value the type shown in README.md (durations and addresses are quoted strings)"
    } else {
        "correct the TOML at this line (strings need quotes, tables are [[listener]] / [listener.liveness])"
    }
}

fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| line_at(text, s.start)).unwrap_or(1);
    let mut message = e.message().trim().to_string();
    if let Some(key) = e.span().and_then(|s| key_on_line(text, s.start)) {
        if !message.contains(&format!("`{key}`")) {
            message = format!("key `{key}`: {message}");
        }
    }
    let fix = fix_for(&message).to_string();
    ConfigError::Syntax {
        origin: origin.to_string(),
        line,
        message,
        fix,
    }
}

/// The key assigned on the line holding `offset`, if that line is `key = ...`.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset.min(text.len()))?;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    plain.then(|| key.to_string())
}

#[cfg(test)]
mod tests;
