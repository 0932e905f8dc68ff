//! The replication event contract: `schemas/replication-event.v1.json` (what
//! publishers are told) and `gitaly_replicator::Job::from_json` (what the
//! consumer enforces) must agree on every example under `tests/data/events/`.
//!
//! - `valid/*.json` pass both, and so does `Job::to_json()` of each.
//! - `invalid/*.json` fail both, and the decoder names the field recorded in
//!   `invalid/expected-fields.json`. The only exceptions are the two short lists
//!   below, and each entry is asserted to still be an exception, so neither list
//!   can silently go stale.

use gitaly_replicator::{ChangeType, Job, MAX_TEXT_LEN};
use jsonschema::{Draft, Validator};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::sync::LazyLock;

const SCHEMA_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/schemas/replication-event.v1.json"
);
const VALID_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/events/valid");
const INVALID_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/events/invalid");
const EXPECTED_FIELDS: &str = "expected-fields.json";
/// Jobs as Praefect v14.x and 15.x write them (Go's encoding/json of its
/// `ReplicationJob` and `ReplicationEvent`), each with its twin in our shape
/// under `ours/`.
const PRAEFECT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/events/praefect");
const TWINS_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/events/praefect/ours"
);

/// Invalid examples that break a rule JSON Schema cannot express (the rules are
/// listed in the schema's top-level `description`). The decoder must reject them
/// and the schema must accept them; if the schema ever rejects one, take it off
/// this list.
const SCHEMA_INEXPRESSIBLE: &[(&str, &str)] = &[
    (
        "update-source-equals-target.json",
        "source_node_storage must differ from target_node_storage",
    ),
    (
        "create-source-equals-target.json",
        "source_node_storage must differ from target_node_storage",
    ),
    (
        "virtual-storage-too-long-in-bytes.json",
        "maxLength counts characters; the decoder counts UTF-8 bytes",
    ),
    (
        "repository-id-float.json",
        "JSON Schema's integer includes 1.0; serde_json's i64 does not",
    ),
    (
        "write-commit-graph-split-strategy-float-zero.json",
        "JSON Schema's enum equates 0.0 with 0; the decoder wants the integer 0",
    ),
    (
        "gc-both-spellings-disagree.json",
        "a param in both spellings must agree; the schema lists each spelling separately",
    ),
    (
        "created-at-leap-second-mid-month.json",
        "format date-time allows :60 at 23:59 UTC on any day; the time crate only on a month's last day",
    ),
];

/// Invalid examples (the schema rejects them) that the decoder still accepts: a
/// known leniency of event.rs, not part of the contract. When event.rs starts
/// rejecting one, take it off this list.
const DECODER_LENIENT: &[(&str, &str)] = &[];

static SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    let text = fs::read_to_string(SCHEMA_PATH).expect("read the schema");
    serde_json::from_str(&text).expect("the schema is JSON")
});

/// Compiled once. Formats are asserted (`created_at` is `format: date-time`), and
/// nothing is fetched: the schema has no remote `$ref`, and jsonschema is built
/// without its resolver features.
static VALIDATOR: LazyLock<Validator> = LazyLock::new(|| {
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(true)
        .build(&SCHEMA)
        .expect("the schema compiles")
});

struct Example {
    name: String,
    bytes: Vec<u8>,
}

fn corpus(dir: &str) -> Vec<Example> {
    let mut out: Vec<Example> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter(|p| p.file_name().is_some_and(|n| n != EXPECTED_FIELDS))
        .map(|p| Example {
            name: file_name(&p),
            bytes: fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .and_then(|n| n.to_str())
        .expect("UTF-8 file name")
        .to_owned()
}

fn expected_fields() -> BTreeMap<String, String> {
    let path = Path::new(INVALID_DIR).join(EXPECTED_FIELDS);
    let text = fs::read_to_string(&path).expect("read expected-fields.json");
    serde_json::from_str(&text).expect("expected-fields.json maps file names to field paths")
}

/// The schema's complaints about a payload; empty means it validates. A payload
/// that is not JSON cannot validate against any schema.
fn schema_errors(bytes: &[u8]) -> Vec<String> {
    match serde_json::from_slice::<Value>(bytes) {
        Err(e) => vec![format!("not JSON: {e}")],
        Ok(value) => schema_errors_of(&value),
    }
}

fn schema_errors_of(value: &Value) -> Vec<String> {
    VALIDATOR
        .iter_errors(value)
        .map(|e| {
            let mut msg = format!("{} (at `{}`, rule `{}`)", e, e.instance_path, e.schema_path);
            if msg.len() > 300 {
                let cut = (0..=300)
                    .rev()
                    .find(|&i| msg.is_char_boundary(i))
                    .unwrap_or(0);
                msg.truncate(cut);
                msg.push('…');
            }
            msg
        })
        .collect()
}

fn listed(list: &[(&str, &str)], name: &str) -> bool {
    list.iter().any(|(n, _)| *n == name)
}

fn report(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} contract violation(s):\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[test]
fn schema_is_a_draft_2020_12_schema_with_id_title_and_examples() {
    jsonschema::meta::validate(&SCHEMA).expect("the schema is valid against its meta-schema");
    assert_eq!(
        SCHEMA["$schema"], "https://json-schema.org/draft/2020-12/schema",
        "draft 2020-12"
    );
    for key in ["$id", "title", "description"] {
        assert!(
            SCHEMA[key].as_str().is_some_and(|s| !s.is_empty()),
            "the schema needs a non-empty {key}"
        );
    }
    assert!(
        SCHEMA["examples"].as_array().is_some_and(|a| !a.is_empty()),
        "the schema needs examples"
    );
    LazyLock::force(&VALIDATOR);
}

#[test]
fn schema_documents_every_property_and_params() {
    let mut missing = Vec::new();
    let properties = job_schema()["properties"].as_object().expect("properties");
    let envelope = SCHEMA["$defs"]["praefectEvent"]["properties"]
        .as_object()
        .expect("$defs/praefectEvent/properties");
    for (name, prop) in properties.iter().chain(envelope) {
        if !has_description(prop) {
            missing.push(name.clone());
        }
    }
    for (def, params) in params_defs() {
        for (name, prop) in params["properties"].as_object().into_iter().flatten() {
            if !has_description(prop) {
                missing.push(format!("$defs/{def}/{name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "properties without a description: {missing:?}"
    );
}

#[test]
fn schema_change_enum_is_change_type_all() {
    let in_schema: Vec<&str> = job_schema()["properties"]["change"]["enum"]
        .as_array()
        .expect("properties.change.enum")
        .iter()
        .map(|v| v.as_str().expect("change names are strings"))
        .collect();
    let in_rust: Vec<&str> = ChangeType::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        in_schema, in_rust,
        "the schema's change enum drifted from ChangeType::ALL"
    );
}

#[test]
fn schema_length_limits_are_the_decoders() {
    fn walk(v: &Value, path: &str, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    if k == "examples" {
                        continue;
                    }
                    if k == "maxLength" {
                        out.push((path.to_owned(), child.clone()));
                    }
                    walk(child, &format!("{path}/{k}"), out);
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    walk(child, &format!("{path}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let mut limits = Vec::new();
    walk(&SCHEMA, "#", &mut limits);
    assert!(!limits.is_empty(), "expected maxLength on $defs/text");
    for (path, limit) in limits {
        assert_eq!(
            limit.as_u64(),
            Some(MAX_TEXT_LEN as u64),
            "maxLength at {path} is not event::MAX_TEXT_LEN"
        );
    }
}

#[test]
fn schema_examples_are_valid_jobs() {
    let mut failures = Vec::new();
    for (i, example) in SCHEMA["examples"]
        .as_array()
        .expect("examples")
        .iter()
        .enumerate()
    {
        let errors = schema_errors_of(example);
        if !errors.is_empty() {
            failures.push(format!("examples[{i}]: schema rejects it: {errors:?}"));
        }
        if let Err(e) = Job::from_value(example) {
            failures.push(format!("examples[{i}]: decoder rejects it: {e}"));
        }
    }
    report(failures);
}

#[test]
fn valid_examples_pass_schema_and_decoder() {
    let examples = corpus(VALID_DIR);
    assert!(
        examples.len() >= 25,
        "only {} valid examples",
        examples.len()
    );
    let mut failures = Vec::new();
    for Example { name, bytes } in &examples {
        let errors = schema_errors(bytes);
        if !errors.is_empty() {
            failures.push(format!("{name}: schema rejects it: {errors:?}"));
        }
        let job = match Job::from_json(bytes) {
            Ok(job) => job,
            Err(e) => {
                failures.push(format!("{name}: decoder rejects it: {e}"));
                continue;
            }
        };
        let encoded = job.to_json();
        let errors = schema_errors(&encoded);
        if !errors.is_empty() {
            failures.push(format!(
                "{name}: schema rejects Job::to_json() {}: {errors:?}",
                String::from_utf8_lossy(&encoded)
            ));
        }
        match Job::from_json(&encoded) {
            Ok(again) if again == job => {}
            Ok(again) => failures.push(format!(
                "{name}: to_json/from_json changed the job: {job:?} became {again:?}"
            )),
            Err(e) => failures.push(format!("{name}: decoder rejects its own to_json(): {e}")),
        }
    }
    report(failures);
}

#[test]
fn invalid_examples_fail_schema_and_decoder_naming_the_field() {
    let examples = corpus(INVALID_DIR);
    assert!(
        examples.len() >= 30,
        "only {} invalid examples",
        examples.len()
    );
    let expected = expected_fields();
    let mut failures = Vec::new();
    for Example { name, bytes } in &examples {
        let Some(field) = expected.get(name) else {
            failures.push(format!("{name}: no entry in {EXPECTED_FIELDS}"));
            continue;
        };
        let errors = schema_errors(bytes);
        let decoded = Job::from_json(bytes);

        if listed(DECODER_LENIENT, name) {
            if errors.is_empty() {
                failures.push(format!(
                    "{name}: listed in DECODER_LENIENT but the schema accepts it"
                ));
            }
            if let Err(e) = decoded {
                failures.push(format!(
                    "{name}: the decoder now rejects it ({e}); take it off DECODER_LENIENT"
                ));
            }
            continue;
        }

        if listed(SCHEMA_INEXPRESSIBLE, name) {
            if !errors.is_empty() {
                failures.push(format!(
                    "{name}: the schema now rejects it; take it off SCHEMA_INEXPRESSIBLE: {errors:?}"
                ));
            }
        } else if errors.is_empty() {
            failures.push(format!("{name}: the schema accepts an invalid event"));
        }

        match decoded {
            Ok(job) => failures.push(format!(
                "{name}: the decoder accepts an invalid event: {job:?}"
            )),
            Err(e) if e.field != *field => failures.push(format!(
                "{name}: the decoder blames `{}`, expected `{field}` ({e})",
                e.field
            )),
            Err(_) => {}
        }
    }
    report(failures);
}

#[test]
fn expected_fields_and_exception_lists_match_the_corpus() {
    let files: BTreeSet<String> = corpus(INVALID_DIR).into_iter().map(|e| e.name).collect();
    let expected = expected_fields();
    let listed_files: BTreeSet<String> = expected.keys().cloned().collect();
    let stale: Vec<_> = listed_files.difference(&files).collect();
    assert!(
        stale.is_empty(),
        "{EXPECTED_FIELDS} names missing files: {stale:?}"
    );
    let unlisted: Vec<_> = files.difference(&listed_files).collect();
    assert!(
        unlisted.is_empty(),
        "invalid examples missing from {EXPECTED_FIELDS}: {unlisted:?}"
    );
    let blank: Vec<_> = expected.iter().filter(|(_, f)| f.is_empty()).collect();
    assert!(blank.is_empty(), "empty expected fields: {blank:?}");

    let mut seen = BTreeSet::new();
    for (name, why) in SCHEMA_INEXPRESSIBLE.iter().chain(DECODER_LENIENT) {
        assert!(
            files.contains(*name),
            "exception {name} is not an invalid example"
        );
        assert!(seen.insert(*name), "exception {name} is listed twice");
        assert!(!why.is_empty(), "exception {name} needs a reason");
    }
}

#[test]
fn corpus_covers_every_change_type() {
    let valid: BTreeSet<ChangeType> = corpus(VALID_DIR)
        .iter()
        .filter_map(|e| Job::from_json(&e.bytes).ok())
        .map(|job| job.change_type())
        .collect();
    let missing: Vec<_> = ChangeType::ALL
        .iter()
        .filter(|c| !valid.contains(c))
        .map(|c| c.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "no valid example for change types {missing:?}"
    );

    // A params error for every change type keeps one params rule per type in the schema.
    let expected = expected_fields();
    let params_errors: BTreeSet<ChangeType> = corpus(INVALID_DIR)
        .iter()
        .filter(|e| {
            expected
                .get(&e.name)
                .is_some_and(|f| f.starts_with("params"))
        })
        .filter_map(|e| serde_json::from_slice::<Value>(&e.bytes).ok())
        .filter_map(|v| v["change"].as_str().and_then(ChangeType::parse))
        .collect();
    let missing: Vec<_> = ChangeType::ALL
        .iter()
        .filter(|c| !params_errors.contains(c))
        .map(|c| c.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "no invalid params example for change types {missing:?}"
    );
}

#[test]
fn praefect_shaped_files_pass_the_schema_and_decode_as_their_twins_in_our_shape() {
    let files = corpus(PRAEFECT_DIR);
    let mut failures = Vec::new();
    let mut changes = BTreeSet::new();
    let mut envelopes = 0;
    for Example { name, bytes } in &files {
        // Go's json.Marshal writes one compact line and no newline.
        if bytes.contains(&b'\n') || bytes.contains(&b' ') {
            failures.push(format!("{name}: not compact as Go writes it"));
        }
        let twin_bytes = fs::read(Path::new(TWINS_DIR).join(name))
            .unwrap_or_else(|e| panic!("{name}: its twin under ours/: {e}"));
        for (what, b) in [("it", bytes), ("its twin", &twin_bytes)] {
            let errors = schema_errors(b);
            if !errors.is_empty() {
                failures.push(format!("{name}: the schema rejects {what}: {errors:?}"));
            }
        }
        let twin_value: Value = serde_json::from_slice(&twin_bytes).expect("twins are JSON");
        if twin_value.get("Job").is_some()
            || twin_value["params"].as_object().is_some_and(|p| {
                p.keys()
                    .any(|k| k.starts_with(|c: char| c.is_ascii_uppercase()))
            })
        {
            failures.push(format!("{name}: its twin is not in our shape"));
        }
        let value: Value = serde_json::from_slice(bytes).expect("Praefect files are JSON");
        if value.get("Job").is_some() {
            envelopes += 1;
        }
        match (Job::from_json(bytes), Job::from_json(&twin_bytes)) {
            (Ok(job), Ok(twin)) if job == twin => {
                changes.insert(job.change_type());
            }
            (Ok(job), Ok(twin)) => {
                failures.push(format!("{name}: decodes as {job:?}, its twin as {twin:?}"))
            }
            (job, twin) => failures.push(format!("{name}: {job:?} / twin {twin:?}")),
        }
    }
    let missing: Vec<_> = ChangeType::ALL
        .iter()
        .filter(|c| !changes.contains(c))
        .collect();
    assert!(missing.is_empty(), "no Praefect-shaped job for {missing:?}");
    assert!(envelopes >= 1, "no ReplicationEvent envelope");
    report(failures);
}

/// The valid examples and the Praefect-shaped jobs (an envelope's `Job`).
fn every_valid_job_value() -> Vec<Value> {
    corpus(VALID_DIR)
        .iter()
        .chain(&corpus(PRAEFECT_DIR))
        .map(|e| serde_json::from_slice::<Value>(&e.bytes).expect("valid examples are JSON"))
        .map(|v| match v.get("Job") {
            Some(job) => job.clone(),
            None => v,
        })
        .collect()
}

#[test]
fn every_field_the_schema_documents_appears_in_a_valid_example() {
    let valid = every_valid_job_value();
    let top: BTreeSet<&str> = valid
        .iter()
        .flat_map(|v| v.as_object().into_iter().flatten().map(|(k, _)| k.as_str()))
        .collect();
    let params: BTreeSet<&str> = valid
        .iter()
        .flat_map(|v| {
            v["params"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k.as_str())
        })
        .collect();
    let mut missing = Vec::new();
    for name in job_schema()["properties"]
        .as_object()
        .expect("properties")
        .keys()
    {
        if !top.contains(name.as_str()) {
            missing.push(name.clone());
        }
    }
    for (def, schema) in params_defs() {
        for name in schema["properties"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            if !params.contains(name.as_str()) {
                missing.push(format!("$defs/{def}/{name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "documented but never shown valid: {missing:?}"
    );
}

fn has_description(schema: &Value) -> bool {
    schema["description"]
        .as_str()
        .is_some_and(|d| !d.is_empty())
}

/// The `$defs` that describe a change type's params (`gcParams`, …).
/// Our job's shape (Praefect's `ReplicationJob` shares it).
fn job_schema() -> &'static Value {
    &SCHEMA["$defs"]["job"]
}

fn params_defs() -> Vec<(&'static String, &'static Value)> {
    let defs = SCHEMA["$defs"].as_object().expect("$defs");
    let out: Vec<_> = defs.iter().filter(|(k, _)| k.ends_with("Params")).collect();
    assert!(
        out.len() >= 5,
        "expected one $defs/*Params per change type with params"
    );
    out
}
