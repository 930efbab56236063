//! Key paths such as `listener[0].liveness.dead_after`: how a problem names
//! the key it is about, and how to find that key's line in the file.

use std::fmt;

use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;

/// One step of a key path: a key of a table or an index into an array.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Step {
    Key(String),
    Index(usize),
}

/// A path from the top of the file to a value; empty is the whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct KeyPath(pub(super) Vec<Step>);

impl KeyPath {
    /// Reads what `Display` writes, for keys without dots or brackets
    /// (all that `validate` writes). Never fails: what is not an index is
    /// taken as a key.
    pub(super) fn parse(text: &str) -> KeyPath {
        let mut steps = Vec::new();
        for part in text.split('.') {
            let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
            if !key.is_empty() {
                steps.push(Step::Key(key.to_string()));
            }
            while let Some((index, after)) = rest
                .strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .and_then(|(i, after)| Some((i.parse().ok()?, after)))
            {
                steps.push(Step::Index(index));
                rest = after;
            }
            if !rest.is_empty() {
                steps.push(Step::Key(rest.to_string()));
            }
        }
        KeyPath(steps)
    }

    pub(super) fn child(&self, step: Step) -> KeyPath {
        let mut steps = self.0.clone();
        steps.push(step);
        KeyPath(steps)
    }

    /// The path without its last step; the whole file has none.
    pub(super) fn parent(&self) -> Option<KeyPath> {
        let (_, parent) = self.0.split_last()?;
        Some(KeyPath(parent.to_vec()))
    }

    /// Whether `self` is `other` or lies inside it.
    pub(super) fn within(&self, other: &KeyPath) -> bool {
        self.0.starts_with(&other.0)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, step) in self.0.iter().enumerate() {
            match step {
                Step::Index(index) => write!(f, "[{index}]")?,
                Step::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Finds the line of a key path in the original text; falls back to the
/// nearest enclosing table when the key itself is absent.
pub(super) struct KeyLines<'a, 't> {
    text: &'t str,
    doc: &'a Spanned<DeTable<'t>>,
}

impl<'a, 't> KeyLines<'a, 't> {
    pub(super) fn new(text: &'t str, doc: &'a Spanned<DeTable<'t>>) -> Self {
        KeyLines { text, doc }
    }

    pub(super) fn line_of(&self, path: &KeyPath) -> Option<usize> {
        let mut best = None;
        let mut table = Some(self.doc.get_ref());
        let mut array: Option<&DeArray<'_>> = None;
        for step in &path.0 {
            let found = match step {
                Step::Key(key) => table
                    .and_then(|t| t.iter().find(|(k, _)| k.get_ref() == key))
                    .map(|(k, v)| (k.span().start, v)),
                Step::Index(index) => array
                    .and_then(|a| a.get(*index))
                    .map(|v| (v.span().start, v)),
            };
            let Some((start, value)) = found else { break };
            best = Some(start);
            table = match value.get_ref() {
                DeValue::Table(t) => Some(t),
                _ => None,
            };
            array = match value.get_ref() {
                DeValue::Array(a) => Some(a),
                _ => None,
            };
        }
        best.map(|offset| line_at(self.text, offset))
    }

    /// The line holding byte `offset` of the file.
    pub(super) fn line_at(&self, offset: usize) -> usize {
        line_at(self.text, offset)
    }
}

/// The 1-based line holding byte `offset`.
pub(super) fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_and_print_alike() {
        for text in [
            "listener",
            "listener[0].bind",
            "listener[1].backends[2]",
            "listener[0].liveness.dead_after",
            "admin.bind",
        ] {
            assert_eq!(KeyPath::parse(text).to_string(), text);
        }
        assert_eq!(
            KeyPath::parse("listener[1].bind").0,
            vec![
                Step::Key("listener".into()),
                Step::Index(1),
                Step::Key("bind".into())
            ]
        );
        let odd = KeyPath(vec![Step::Key("a b".into()), Step::Key("c.d".into())]);
        assert_eq!(odd.to_string(), "\"a b\".\"c.d\"");
    }

    #[test]
    fn parse_takes_anything() {
        for text in [
            "",
            ".",
            "[",
            "a[",
            "a[x]",
            "a]",
            "[0]",
            "a[0",
            "a[99999999999999999999]",
        ] {
            let _ = KeyPath::parse(text).to_string();
        }
        assert_eq!(KeyPath::parse("[3]").0, vec![Step::Index(3)]);
    }

    #[test]
    fn within_parent_and_child() {
        let bind = KeyPath::parse("listener[0].bind");
        let listener = KeyPath::parse("listener[0]");
        assert!(bind.within(&listener));
        assert!(bind.within(&bind));
        assert!(!listener.within(&bind));
        assert!(!KeyPath::parse("listener[1].bind").within(&listener));
        assert_eq!(bind.parent(), Some(listener.clone()));
        assert_eq!(listener.child(Step::Key("bind".into())), bind);
        assert_eq!(KeyPath::default().parent(), None);
    }

    #[test]
    fn key_lines_point_at_keys_and_tables() {
        let text = "[[listener]]\nname = \"a\"\nbind = \"x\"\nbackends = []\n\n[[listener]]\nname = \"b\"\n[listener.liveness]\ndead_after = \"1ms\"\n";
        let doc = DeTable::parse(text).unwrap();
        let lines = KeyLines::new(text, &doc);
        let line = |key| lines.line_of(&KeyPath::parse(key));
        assert_eq!(line("listener[0].bind"), Some(3));
        assert_eq!(line("listener[1].liveness.dead_after"), Some(9));
        assert_eq!(line("listener[1].upstream.user_timeout"), Some(6));
        assert_eq!(line("nothing"), None);
    }

    #[test]
    fn line_at_counts_newlines_and_clamps() {
        assert_eq!(line_at("a\nb\nc", 0), 1);
        assert_eq!(line_at("a\nb\nc", 2), 2);
        assert_eq!(line_at("a\nb\nc", 99), 3);
    }
}
