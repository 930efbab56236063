use proptest::prelude::*;

use super::*;
use crate::config::parse;

const LISTENER: &str =
    "[[listener]]\nname = \"pg\"\nbind = \"127.0.0.1:6432\"\nbackends = [\"127.0.0.1:5432\"]\n";

/// The problems of a refused config.
fn problems(text: &str) -> Vec<Problem> {
    match parse(text, "t.toml") {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Err(other) => panic!("expected problems, got {other}"),
        Ok(_) => panic!("expected problems, the config passed:\n{text}"),
    }
}

fn keys(problems: &[Problem]) -> Vec<&str> {
    problems.iter().map(|p| p.key.as_str()).collect()
}

#[test]
fn a_zero_where_nonzero_and_a_value_rule_are_reported_together() {
    let text =
        format!("{LISTENER}max_connections = 0\n[listener.liveness]\nprobe_interval = \"500ms\"\n");
    let found = problems(&text);
    assert_eq!(
        keys(&found),
        [
            "listener[0].max_connections",
            "listener[0].liveness.probe_interval"
        ]
    );
    assert_eq!(found[0].line, Some(5));
    assert!(found[0].message.contains("nonzero"), "{found:?}");
    assert_eq!(found[0].fix, "use a number of 1 or more");
    assert_eq!(found[1].line, Some(7));
}

#[test]
fn a_wrong_type_and_a_value_rule_are_reported_together() {
    let text = "[[listener]]\nname = \"pg\"\nbind = \"nowhere\"\nbackends = [\"127.0.0.1:5432\"]\n\
                [listener.liveness]\nprobe_interval = 500\n";
    let found = problems(text);
    assert_eq!(
        keys(&found),
        ["listener[0].bind", "listener[0].liveness.probe_interval"]
    );
    assert!(found[1].message.contains("invalid type"), "{found:?}");
    assert!(found[1].fix.contains("\"500ms\""), "{found:?}");
}

#[test]
fn an_unknown_key_and_a_wrong_type_are_reported_together() {
    let text = format!("{LISTENER}conect_timeout = \"2s\"\nmax_connections = \"lots\"\n");
    let found = problems(&text);
    assert_eq!(
        keys(&found),
        ["listener[0].conect_timeout", "listener[0].max_connections"]
    );
    assert!(found[0].message.contains("unknown field"), "{found:?}");
    assert_eq!((found[0].line, found[1].line), (Some(5), Some(6)));
}

#[test]
fn a_listener_without_bind_is_left_out_and_the_next_keeps_its_index() {
    let text = "[[listener]]\nname = \"a\"\nbackends = [\"127.0.0.1:5432\"]\n\
                [[listener]]\nname = \"b\"\nbind = \"127.0.0.1:6432\"\nbackends = [\"db\"]\n";
    let found = problems(text);
    // Not "no [[listener]] table": the listener is there, only unusable.
    assert_eq!(
        keys(&found),
        ["listener[0].bind", "listener[1].backends[0]"]
    );
    assert!(found[0].message.contains("`bind` is missing"), "{found:?}");
    assert_eq!(found[0].line, Some(1));
    assert_eq!(found[1].line, Some(7));
}

#[test]
fn a_required_key_of_the_wrong_type_is_one_problem() {
    let text = "[[listener]]\nname = \"a\"\nbind = 6432\nbackends = [\"127.0.0.1:5432\"]\n";
    let found = problems(text);
    assert_eq!(keys(&found), ["listener[0].bind"]);
    assert!(found[0].message.contains("invalid type"), "{found:?}");
    assert!(found[0].message.contains("`bind` is required"), "{found:?}");
}

#[test]
fn a_check_that_cannot_be_built_does_not_also_report_a_missing_check() {
    let text = format!(
        "{LISTENER}[listener.check]\nkind = \"oracle\"\n[listener.routing]\nrole = \"primary\"\n"
    );
    let found = problems(&text);
    assert_eq!(keys(&found), ["listener[0].check.kind"]);
    assert!(found[0].message.contains("unknown variant"), "{found:?}");
}

#[test]
fn indices_in_a_list_of_values_stay_those_of_the_file() {
    let text = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:6432\"\n\
                backends = [\"127.0.0.1:5432\", 5, \"db\"]\n";
    let found = problems(text);
    assert_eq!(
        keys(&found),
        ["listener[0].backends[1]", "listener[0].backends[2]"]
    );
}

#[test]
fn a_lone_bad_element_does_not_also_make_its_list_empty() {
    let text = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:6432\"\nbackends = [5]\n";
    assert_eq!(keys(&problems(text)), ["listener[0].backends[0]"]);
}

#[test]
fn problems_come_in_file_order() {
    let text = "[[listener]]\nname = \"\"\nbind = \"127.0.0.1:6432\"\nbackends = []\n\
                max_connections = 0\n";
    let lines: Vec<_> = problems(text).iter().map(|p| p.line).collect();
    assert_eq!(lines, [Some(2), Some(4), Some(5)]);
}

#[test]
fn a_syntax_error_stops_at_itself() {
    let err = parse("[[listener]]\nname = pg\n", "t.toml").unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { line: 2, .. }), "{err}");
}

#[test]
fn a_file_of_mistakes_is_bounded() {
    let mut text = String::from(LISTENER);
    for i in 0..(MAX_PASSES + 50) {
        text.push_str(&format!("unknown_{i} = 1\n"));
    }
    let found = problems(&text);
    assert_eq!(found.len(), MAX_PASSES + 1);
    assert!(found.iter().any(|p| p.key == "(file)"), "the limit is said");
}

#[test]
fn file_index_skips_removed_elements() {
    assert_eq!(file_index(&[], 3), 3);
    assert_eq!(file_index(&[0], 0), 1);
    assert_eq!(file_index(&[1, 2], 1), 3);
    assert_eq!(file_index(&[1, 3], 2), 4);
    assert_eq!(file_index(&[5], 2), 2);
}

#[test]
fn in_file_follows_every_removal() {
    let mut decoded = Decoded::default();
    decoded.record_removal(&KeyPath::parse("listener[0]"));
    // The file's listener[2] was the tree's listener[1] once [0] was gone.
    decoded.record_removal(&KeyPath::parse("listener[2]"));
    decoded.record_removal(&KeyPath::parse("listener[1].backends[0]"));
    decoded.record_removal(&KeyPath::parse("listener[1].backends[0]"));
    decoded.record_removal(&KeyPath::parse("admin.bind"));
    assert_eq!(decoded.removed.len(), 2, "keys of tables are not indices");
    let in_file = |p: &str| decoded.in_file(&KeyPath::parse(p)).to_string();
    assert_eq!(
        in_file("listener[0].backends[0]"),
        "listener[1].backends[1]"
    );
    assert_eq!(in_file("listener[1].bind"), "listener[3].bind");
    assert_eq!(in_file("admin.bind"), "admin.bind");
}

#[test]
fn remove_and_lookup_walk_tables_and_arrays() {
    let text = "a = 1\n[t]\nlist = [1, 2, 3]\n[[arr]]\nx = 1\n[[arr]]\nx = 2\n";
    let mut doc = DeTable::parse(text).unwrap().into_inner();
    let path = |p: &str| KeyPath::parse(p);
    assert!(lookup(&doc, &path("arr[1].x").0).is_some());
    assert!(lookup(&doc, &path("arr[2]").0).is_none());
    assert!(lookup(&doc, &path("a.b").0).is_none());
    assert!(remove(&mut doc, &path("t.list[1]")));
    let Some(DeValue::Array(list)) = lookup(&doc, &path("t.list").0) else {
        panic!("t.list is gone")
    };
    assert_eq!(list.len(), 2);
    assert!(remove(&mut doc, &path("arr[0]")));
    assert!(matches!(
        lookup(&doc, &path("arr[0].x").0),
        Some(DeValue::Integer(i)) if i.as_str() == "2"
    ));
    assert!(remove(&mut doc, &path("a")));
    assert!(!remove(&mut doc, &path("a")));
    assert!(!remove(&mut doc, &path("t.list[9]")));
    assert!(!remove(&mut doc, &path("t.list.x")));
    assert!(!remove(&mut doc, &KeyPath::default()));
}

#[test]
fn missing_field_reads_serdes_message() {
    assert_eq!(missing_field("missing field `bind`"), Some("bind"));
    assert_eq!(missing_field("unknown field `bind`"), None);
    assert_eq!(missing_field("missing field `bind"), None);
}

#[test]
fn fixes_fit_the_message() {
    assert!(fix_for("unknown field `x`, expected one of `a`").contains("spelling"));
    assert!(fix_for("invalid type: integer `500`, expected a duration").contains("\"3s\""));
    assert!(fix_for("unknown variant `x`, expected `a`").contains("listed"));
    assert!(fix_for("invalid value: integer `0`, expected a nonzero u32").contains("1 or more"));
    assert!(fix_for("invalid type: string \"x\", expected u32").contains("type"));
    assert!(fix_for("expected `=`").contains("TOML"));
}

#[test]
fn key_on_line_names_a_plain_key_only() {
    assert_eq!(key_on_line("a = 1\nb.c = x\n", 8), Some("b.c".into()));
    assert_eq!(key_on_line("[t]\n", 1), None);
    assert_eq!(key_on_line("é = x", 1), None, "inside a character");
    assert_eq!(key_on_line("a = 1", 99), Some("a".into()));
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("99999999999".to_string()),
        Just("1.5".to_string()),
        Just("true".to_string()),
        Just("\"\"".to_string()),
        Just("\"3s\"".to_string()),
        Just("\"500ms\"".to_string()),
        Just("\"127.0.0.1:7000\"".to_string()),
        Just("\"tcp\"".to_string()),
        Just("1979-05-27".to_string()),
        Just("[]".to_string()),
        Just("[5, \"x\"]".to_string()),
        Just("{}".to_string()),
        Just("{ kind = \"redis\" }".to_string()),
        Just("{ a = 1 }".to_string()),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("name"),
        Just("bind"),
        Just("backends"),
        Just("max_connections"),
        Just("on_evict"),
        Just("liveness"),
        Just("check"),
        Just("routing"),
        Just("pool"),
        Just("upstream"),
        Just("liveness.probe_interval"),
        Just("liveness.dead_after"),
        Just("check.kind"),
        Just("routing.role"),
        Just("upstream.user_timeout"),
        Just("nonsense"),
    ]
    .prop_map(str::to_string)
}

proptest! {
    #[test]
    fn any_mix_of_keys_and_values_never_panics(
        listeners in proptest::collection::vec(
            proptest::collection::btree_map(key(), value(), 0..8), 0..4),
        admin in proptest::option::of(value()),
    ) {
        let mut text = String::new();
        if let Some(bind) = admin {
            text.push_str(&format!("admin = {{ bind = {bind} }}\n"));
        }
        for entries in listeners {
            text.push_str("[[listener]]\n");
            for (k, v) in entries {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        match parse(&text, "t.toml") {
            Ok(_) | Err(ConfigError::Syntax { .. }) => {}
            Err(ConfigError::Invalid { problems, .. }) => {
                prop_assert!(!problems.is_empty());
                for p in problems {
                    prop_assert!(!p.key.is_empty() && !p.fix.is_empty(), "{p:?}");
                }
            }
            Err(other) => prop_assert!(false, "{other}"),
        }
    }
}
