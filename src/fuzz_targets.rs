//! Fuzz targets for what reads outside input: the job decoder (every
//! payload on the work subjects), the subject parser (every subject a
//! message arrives on, and a dead letter's original subject), and the
//! config loader (a file and environment an operator writes). Each must
//! answer every input with a value or an error, never a panic.
//!
//! Plain proptest on stable Rust, so they run with the unit tests:
//! `FUZZ_CASES` inputs per target (default 2,000, the short mode CI runs);
//! `FUZZ_CASES=1000000 cargo test --release --lib fuzz_` is the long mode.
//! Inputs are both raw bytes and structured ones near the valid shape
//! (known keys with values of any type), which reach the deeper checks that
//! random bytes never do.

use crate::config::Config;
use crate::event::{ChangeType, Job, TOP_LEVEL_FIELDS};
use crate::subject::{escape_token, job_subject, parse_job_subject, unescape_token};
use proptest::prelude::*;
use proptest::test_runner::Config as RunnerConfig;
use serde_json::{Map, Value};

fn runner() -> RunnerConfig {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    RunnerConfig {
        cases,
        // A found input is printed; nothing is written into the source tree.
        failure_persistence: None,
        ..RunnerConfig::default()
    }
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
        Just(Value::String("x".repeat(70_000))),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Plausible values for a job's fields: valid ones, near misses and
/// anything at all.
fn field_value(key: &'static str) -> BoxedStrategy<Value> {
    let plausible: BoxedStrategy<Value> = match key {
        "change" => prop::sample::select(ChangeType::ALL.to_vec())
            .prop_map(|c| Value::from(c.as_str()))
            .boxed(),
        "virtual_storage" | "target_node_storage" | "source_node_storage" => {
            prop::sample::select(vec![
                "default", "gitaly-1", "gitaly.2", "", " ", "a>b", "a*",
            ])
            .prop_map(Value::from)
            .boxed()
        }
        "relative_path" | "replica_path" => prop::sample::select(vec![
            "@hashed/aa/bb/x.git",
            "../x.git",
            "/abs.git",
            "a/./b.git",
            "@cluster/repositories/1/2/3",
            "",
        ])
        .prop_map(Value::from)
        .boxed(),
        "repository_id" => {
            prop_oneof![any::<i64>().prop_map(Value::from), Just(Value::from(1.5))].boxed()
        }
        "created_at" => prop::sample::select(vec![
            "2026-12-01T10:00:00Z",
            "2026-12-01T10:00:00.123456789+01:00",
            "yesterday",
            "",
        ])
        .prop_map(Value::from)
        .boxed(),
        "params" => prop::collection::btree_map(
            prop::sample::select(vec![
                "create_bitmap",
                "prune",
                "all_refs",
                "relative_path",
                "split_strategy",
                "CreateBitmap",
                "Prune",
                "AllRefs",
                "RelativePath",
                "SplitStrategy",
                "other",
            ])
            .prop_map(str::to_owned),
            prop_oneof![
                any::<bool>().prop_map(Value::from),
                (0i64..4).prop_map(Value::from),
                Just(Value::from(2.0)),
                Just(Value::from("new/path.git")),
                any_json(),
            ],
            0..4,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect()))
        .boxed(),
        _ => any_json().boxed(),
    };
    prop_oneof![4 => plausible, 1 => any_json()].boxed()
}

/// An object with a random subset of the job's fields.
fn job_like() -> impl Strategy<Value = Value> {
    // The job's fields, and one it does not have.
    let fields: Vec<BoxedStrategy<Option<(&'static str, Value)>>> = TOP_LEVEL_FIELDS
        .iter()
        .chain(&["unknown_field"])
        .map(|&k| {
            let present = if k == "unknown_field" { 0.05 } else { 0.85 };
            prop::option::weighted(present, field_value(k).prop_map(move |v| (k, v))).boxed()
        })
        .collect();
    fields.prop_map(|pairs| {
        let m: Map<String, Value> = pairs
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        Value::Object(m)
    })
}

/// A valid job's bytes with a few bytes changed, cut or repeated.
fn mutated_job() -> impl Strategy<Value = Vec<u8>> {
    let valid = br#"{"change":"update","virtual_storage":"default","relative_path":"@hashed/aa/bb/x.git","target_node_storage":"gitaly-2","source_node_storage":"gitaly-1","params":{"create_bitmap":true},"correlation_id":"c-1","repository_id":7}"#.to_vec();
    let len = valid.len();
    prop::collection::vec((0..len, any::<u8>(), 0u8..3), 1..6).prop_map(move |edits| {
        let mut bytes = valid.clone();
        for (at, byte, kind) in edits {
            let at = at.min(bytes.len().saturating_sub(1));
            match kind {
                0 => bytes[at] = byte,
                1 => bytes.truncate(at),
                _ => bytes.insert(at, byte),
            }
            if bytes.is_empty() {
                break;
            }
        }
        bytes
    })
}

/// Decoding must end in a job or an error naming the field; a job decoded
/// once decodes again to the same job from its own encoding.
fn check_job(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(job) = Job::from_json(bytes) {
        let again = Job::from_json(&job.to_json());
        prop_assert!(
            again.is_ok(),
            "a decoded job does not decode from its own JSON"
        );
        prop_assert_eq!(again.ok(), Some(job));
    }
    Ok(())
}

proptest! {
    #![proptest_config(runner())]

    #[test]
    fn fuzz_job_decoder_raw_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_job(&bytes)?;
    }

    #[test]
    fn fuzz_job_decoder_job_like_objects(value in job_like()) {
        check_job(&serde_json::to_vec(&value).unwrap_or_default())?;
    }

    #[test]
    fn fuzz_job_decoder_mutated_jobs(bytes in mutated_job()) {
        check_job(&bytes)?;
    }

    #[test]
    fn fuzz_subject_parser(
        prefix in prop::sample::select(vec!["gitaly.replication", "t1.replication", "a"]),
        subject in "[a-z.%0-9A-F*> -]{0,60}",
        vs in ".{0,20}",
        target in ".{0,20}",
    ) {
        let _ = parse_job_subject(prefix, &subject);
        let _ = unescape_token(&subject);
        // Any pair of names survives the trip through a subject.
        if !vs.is_empty() && !target.is_empty() {
            let built = job_subject(prefix, &vs, &target);
            prop_assert_eq!(parse_job_subject(prefix, &built).ok(), Some((vs.clone(), target.clone())));
            prop_assert_eq!(unescape_token(&escape_token(&vs)).ok(), Some(vs));
        }
    }

    #[test]
    fn fuzz_config_loader_raw_text(text in "(?s).{0,400}") {
        let _ = Config::from_toml_str(&text);
    }

    #[test]
    fn fuzz_config_loader_mutated_example(edits in prop::collection::vec((any::<prop::sample::Index>(), toml_value(), 0u8..3), 1..6)) {
        let _ = Config::from_toml_str(&mutated_example(&edits));
    }

    #[test]
    fn fuzz_config_loader_environment(
        key in prop::sample::select(ENV_KEYS.to_vec()),
        value in "(?s).{0,40}",
    ) {
        let env = [(format!("GITALY_REPLICATOR_{key}"), value)];
        let _ = Config::from_toml_str_with_env(EXAMPLE, env);
    }
}

const EXAMPLE: &str = include_str!("../config.example.toml");

/// Override names from the environment, valid and not.
const ENV_KEYS: [&str; 10] = [
    "NATS__URL",
    "NATS__PASSWORD",
    "DATABASE__URL",
    "REPLICATION__BATCH_SIZE",
    "REPLICATION__RETRY_DELAY",
    "GRACEFUL_STOP_TIMEOUT",
    "STARTUP_TIMEOUT",
    "LOGGING__FORMAT",
    "VIRTUAL_STORAGE__0__NODE__0__TOKEN",
    "NO_SUCH_KEY",
];

fn toml_value() -> impl Strategy<Value = toml::Value> {
    prop_oneof![
        ".{0,20}".prop_map(toml::Value::String),
        any::<i64>().prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        prop::sample::select(vec![
            "1s",
            "0s",
            "-1s",
            "5m",
            "1h30m",
            "999999999999h",
            "",
            "tcp://x",
            "unix:/s"
        ])
        .prop_map(|s| toml::Value::String(s.to_owned())),
        Just(toml::Value::Array(vec![toml::Value::Integer(1)])),
        Just(toml::Value::Table(toml::Table::new())),
    ]
}

/// The example config with values replaced, keys removed or added, at the
/// places `edits` pick among every key of the file.
fn mutated_example(edits: &[(prop::sample::Index, toml::Value, u8)]) -> String {
    let Ok(mut table) = EXAMPLE.parse::<toml::Table>() else {
        return EXAMPLE.to_owned();
    };
    for (at, value, kind) in edits {
        let mut paths = Vec::new();
        key_paths(
            &toml::Value::Table(table.clone()),
            &mut Vec::new(),
            &mut paths,
        );
        if paths.is_empty() {
            break;
        }
        let path = at.get(&paths).clone();
        let Some((last, parents)) = path.split_last() else {
            continue;
        };
        if let Some(parent) = lookup_mut(&mut table, parents) {
            match kind {
                0 => {
                    parent.insert(last.clone(), value.clone());
                }
                1 => {
                    parent.remove(last);
                }
                _ => {
                    parent.insert(format!("{last}_extra"), value.clone());
                }
            }
        }
    }
    toml::to_string(&table).unwrap_or_default()
}

/// Every key's path; array elements are named by their index.
fn key_paths(value: &toml::Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                prefix.push(k.clone());
                out.push(prefix.clone());
                key_paths(v, prefix, out);
                prefix.pop();
            }
        }
        toml::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                if v.is_table() {
                    prefix.push(i.to_string());
                    key_paths(v, prefix, out);
                    prefix.pop();
                }
            }
        }
        _ => {}
    }
}

/// The table at `path` (array elements by index).
fn lookup_mut<'a>(table: &'a mut toml::Table, path: &[String]) -> Option<&'a mut toml::Table> {
    let Some((head, tail)) = path.split_first() else {
        return Some(table);
    };
    match table.get_mut(head)? {
        toml::Value::Table(t) => lookup_mut(t, tail),
        toml::Value::Array(items) => {
            let (index, after) = tail.split_first()?;
            match items.get_mut(index.parse::<usize>().ok()?)? {
                toml::Value::Table(t) => lookup_mut(t, after),
                _ => None,
            }
        }
        _ => None,
    }
}
