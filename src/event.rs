//! The replication job: change types, their typed params, and the JSON
//! contract (`schemas/replication-event.v1.json`) decoded once at the edge.
//!
//! Decoding is hand-written over `serde_json::Value` rather than derived so that
//! every rejection names the offending field by its path (`params.prune`).

use serde_json::{Map, Value};
use std::fmt;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The kind of a job, as Praefect spells it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChangeType {
    Update,
    Create,
    Delete,
    DeleteReplica,
    Rename,
    GarbageCollect,
    RepackFull,
    RepackIncremental,
    Cleanup,
    PackRefs,
    WriteCommitGraph,
    MidxRepack,
    OptimizeRepository,
}

impl ChangeType {
    /// Every change type, in a stable order (metrics, docs, tests).
    pub const ALL: [ChangeType; 13] = [
        ChangeType::Update,
        ChangeType::Create,
        ChangeType::Delete,
        ChangeType::DeleteReplica,
        ChangeType::Rename,
        ChangeType::GarbageCollect,
        ChangeType::RepackFull,
        ChangeType::RepackIncremental,
        ChangeType::Cleanup,
        ChangeType::PackRefs,
        ChangeType::WriteCommitGraph,
        ChangeType::MidxRepack,
        ChangeType::OptimizeRepository,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Update => "update",
            ChangeType::Create => "create",
            ChangeType::Delete => "delete",
            ChangeType::DeleteReplica => "delete_replica",
            ChangeType::Rename => "rename",
            ChangeType::GarbageCollect => "gc",
            ChangeType::RepackFull => "repack_full",
            ChangeType::RepackIncremental => "repack_incremental",
            ChangeType::Cleanup => "cleanup",
            ChangeType::PackRefs => "pack_refs",
            ChangeType::WriteCommitGraph => "write_commit_graph",
            ChangeType::MidxRepack => "midx_repack",
            ChangeType::OptimizeRepository => "optimize_repository",
        }
    }

    /// Position in [`ChangeType::ALL`], for per-type tables.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn parse(s: &str) -> Option<ChangeType> {
        ChangeType::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// `update` and `create` copy data from a source replica; nothing else does.
    pub fn needs_source(self) -> bool {
        matches!(self, ChangeType::Update | ChangeType::Create)
    }

    /// Whether the job changes what a replica holds (and so takes effect in
    /// publish order), rather than only maintaining it.
    pub fn changes_state(self) -> bool {
        matches!(
            self,
            ChangeType::Update
                | ChangeType::Create
                | ChangeType::Delete
                | ChangeType::DeleteReplica
                | ChangeType::Rename
        )
    }
}

impl fmt::Display for ChangeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `WriteCommitGraph`'s split strategy; Gitaly's enum has one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitStrategy {
    #[default]
    SizeMultiple,
}

impl SplitStrategy {
    /// The enum number on the wire.
    pub fn as_i32(self) -> i32 {
        match self {
            SplitStrategy::SizeMultiple => 0,
        }
    }
}

/// A change type with its typed params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Update,
    Create,
    Delete,
    DeleteReplica,
    Rename { new_relative_path: String },
    GarbageCollect { create_bitmap: bool, prune: bool },
    RepackFull { create_bitmap: bool },
    RepackIncremental,
    Cleanup,
    PackRefs { all_refs: bool },
    WriteCommitGraph { split_strategy: SplitStrategy },
    MidxRepack,
    OptimizeRepository,
}

impl Change {
    pub fn change_type(&self) -> ChangeType {
        match self {
            Change::Update => ChangeType::Update,
            Change::Create => ChangeType::Create,
            Change::Delete => ChangeType::Delete,
            Change::DeleteReplica => ChangeType::DeleteReplica,
            Change::Rename { .. } => ChangeType::Rename,
            Change::GarbageCollect { .. } => ChangeType::GarbageCollect,
            Change::RepackFull { .. } => ChangeType::RepackFull,
            Change::RepackIncremental => ChangeType::RepackIncremental,
            Change::Cleanup => ChangeType::Cleanup,
            Change::PackRefs { .. } => ChangeType::PackRefs,
            Change::WriteCommitGraph { .. } => ChangeType::WriteCommitGraph,
            Change::MidxRepack => ChangeType::MidxRepack,
            Change::OptimizeRepository => ChangeType::OptimizeRepository,
        }
    }

    fn params_json(&self) -> Option<Value> {
        let mut m = Map::new();
        match self {
            Change::Rename { new_relative_path } => {
                m.insert("new_relative_path".into(), new_relative_path.clone().into());
            }
            Change::GarbageCollect {
                create_bitmap,
                prune,
            } => {
                m.insert("create_bitmap".into(), (*create_bitmap).into());
                m.insert("prune".into(), (*prune).into());
            }
            Change::RepackFull { create_bitmap } => {
                m.insert("create_bitmap".into(), (*create_bitmap).into());
            }
            Change::PackRefs { all_refs } => {
                m.insert("all_refs".into(), (*all_refs).into());
            }
            Change::WriteCommitGraph { split_strategy } => {
                let s = match split_strategy {
                    SplitStrategy::SizeMultiple => "size_multiple",
                };
                m.insert("split_strategy".into(), s.into());
            }
            _ => return None,
        }
        Some(Value::Object(m))
    }
}

/// One replication job: one change for one repository, aimed at one target storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub change: Change,
    pub virtual_storage: String,
    pub relative_path: String,
    pub target_node_storage: String,
    /// Required for `update`/`create`; may be set on others (it then takes part
    /// in completion dedup, as in Praefect).
    pub source_node_storage: Option<String>,
    pub correlation_id: Option<String>,
    /// When the job was created; the consumer falls back to the stream's
    /// timestamp when absent.
    pub created_at: Option<OffsetDateTime>,
    /// Praefect's later job fields, carried through untouched.
    pub repository_id: Option<i64>,
    pub replica_path: Option<String>,
}

/// Why a payload is not a valid job. `field` is a JSON path such as `params.prune`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid replication event: {field}: {reason}")]
pub struct InvalidEvent {
    pub field: String,
    pub reason: String,
}

impl InvalidEvent {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        InvalidEvent {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

pub(crate) const TOP_LEVEL_FIELDS: [&str; 10] = [
    "change",
    "virtual_storage",
    "relative_path",
    "target_node_storage",
    "source_node_storage",
    "params",
    "correlation_id",
    "created_at",
    "repository_id",
    "replica_path",
];

/// The fields of Praefect's `ReplicationEvent` as Go's `encoding/json` writes
/// it (the struct has no JSON tags, so the keys are the Go field names).
pub(crate) const ENVELOPE_FIELDS: [&str; 8] = [
    "ID",
    "State",
    "Attempt",
    "LockID",
    "CreatedAt",
    "UpdatedAt",
    "Job",
    "Meta",
];

/// Each param of ours with Praefect's Go name for it (`ReplicationJob.Params`
/// is a free map read by these keys).
const PARAM_ALIASES: [(&str, &str); 5] = [
    ("create_bitmap", "CreateBitmap"),
    ("prune", "Prune"),
    ("all_refs", "AllRefs"),
    ("new_relative_path", "RelativePath"),
    ("split_strategy", "SplitStrategy"),
];

/// Longest accepted storage name, relative path or correlation id, in bytes.
pub const MAX_TEXT_LEN: usize = 4096;

impl Job {
    pub fn change_type(&self) -> ChangeType {
        self.change.change_type()
    }

    /// Decodes and validates one JSON payload.
    pub fn from_json(payload: &[u8]) -> Result<Job, InvalidEvent> {
        let value: Value = serde_json::from_slice(payload)
            .map_err(|e| InvalidEvent::new("$", format!("not valid JSON: {e}")))?;
        Job::from_value(&value)
    }

    /// Validates an already parsed JSON value: a job in our shape, a bare
    /// Praefect `ReplicationJob`, or Praefect's `ReplicationEvent` around one.
    pub fn from_value(value: &Value) -> Result<Job, InvalidEvent> {
        let obj = value
            .as_object()
            .ok_or_else(|| InvalidEvent::new("$", "expected a JSON object"))?;
        if obj.contains_key("Job") {
            return Job::from_envelope(obj);
        }
        Job::from_object(obj)
    }

    /// Praefect's `ReplicationEvent`: `Job` is the job, `Meta.correlation_id`
    /// its correlation id and `CreatedAt` its created time. The queue's own
    /// bookkeeping (`ID`, `State`, `Attempt`, `LockID`, `UpdatedAt`) is
    /// ignored: here the stream's redelivery count rules.
    fn from_envelope(obj: &Map<String, Value>) -> Result<Job, InvalidEvent> {
        if let Some(unknown) = obj.keys().find(|k| !ENVELOPE_FIELDS.contains(&k.as_str())) {
            return Err(InvalidEvent::new(
                unknown.clone(),
                "unknown field of Praefect's ReplicationEvent",
            ));
        }
        let inner = match obj.get("Job") {
            Some(Value::Object(m)) => m,
            _ => return Err(InvalidEvent::new("Job", "expected an object")),
        };
        let mut job = Job::from_object(inner).map_err(|e| InvalidEvent {
            field: format!("Job.{}", e.field),
            reason: e.reason,
        })?;
        let correlation_id = match obj.get("Meta") {
            None | Some(Value::Null) => None,
            // Praefect's `Meta` is a free map; only the correlation id means
            // anything to a replica.
            Some(Value::Object(meta)) => match optional_str(meta, "correlation_id")
                .map_err(|e| InvalidEvent::new("Meta.correlation_id", e.reason))?
            {
                None | Some("") => None,
                Some(s) => Some(check_name("Meta.correlation_id", s)?.to_owned()),
            },
            Some(_) => return Err(InvalidEvent::new("Meta", "expected an object or null")),
        };
        let created_at = match optional_str(obj, "CreatedAt")? {
            None => None,
            Some(s) => Some(parse_rfc3339("CreatedAt", s)?),
        };
        job.correlation_id = agree(
            "Job.correlation_id",
            job.correlation_id,
            "Meta.correlation_id",
            correlation_id,
        )?;
        job.created_at = agree("Job.created_at", job.created_at, "CreatedAt", created_at)?;
        Ok(job)
    }

    /// A job object: ours, or Praefect's `ReplicationJob` (the same keys,
    /// with Go's zero values for what it does not know).
    fn from_object(obj: &Map<String, Value>) -> Result<Job, InvalidEvent> {
        if let Some(unknown) = obj.keys().find(|k| !TOP_LEVEL_FIELDS.contains(&k.as_str())) {
            return Err(InvalidEvent::new(unknown.clone(), "unknown field"));
        }
        let change_str = required_str(obj, "change")?;
        let change_type = ChangeType::parse(change_str).ok_or_else(|| {
            InvalidEvent::new(
                "change",
                format!(
                    "unknown change type {change_str:?}; expected one of {}",
                    all_names()
                ),
            )
        })?;
        let virtual_storage = name_field(obj, "virtual_storage")?;
        let relative_path = path_field(obj, "relative_path")?;
        let target = name_field(obj, "target_node_storage")?;
        let source = match optional_str(obj, "source_node_storage")? {
            None | Some("") => None,
            Some(s) => Some(check_name("source_node_storage", s)?.to_owned()),
        };
        if change_type.needs_source() {
            match &source {
                None => {
                    return Err(InvalidEvent::new(
                        "source_node_storage",
                        format!("required for change {change_type}"),
                    ));
                }
                Some(s) if *s == target => {
                    return Err(InvalidEvent::new(
                        "source_node_storage",
                        "must differ from target_node_storage",
                    ));
                }
                Some(_) => {}
            }
        }
        let change = decode_params(change_type, obj.get("params"))?;
        let correlation_id = match optional_str(obj, "correlation_id")? {
            None | Some("") => None,
            Some(s) => Some(check_name("correlation_id", s)?.to_owned()),
        };
        let created_at = match optional_str(obj, "created_at")? {
            None => None,
            Some(s) => Some(parse_rfc3339("created_at", s)?),
        };
        let repository_id = match obj.get("repository_id") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                // Praefect writes 0 for a job that relates to no known
                // repository (an orphaned replica's delete).
                Some(0) => None,
                Some(id) => Some(id),
                None => return Err(InvalidEvent::new("repository_id", "expected an integer")),
            },
        };
        let replica_path = match obj.get("replica_path") {
            None | Some(Value::Null) => None,
            Some(_) => Some(path_field(obj, "replica_path")?.to_owned()),
        };
        Ok(Job {
            change,
            virtual_storage: virtual_storage.to_owned(),
            relative_path: relative_path.to_owned(),
            target_node_storage: target.to_owned(),
            source_node_storage: source,
            correlation_id,
            created_at,
            repository_id,
            replica_path,
        })
    }

    /// The JSON value of this job, in the shape `from_value` accepts.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("change".into(), self.change_type().as_str().into());
        m.insert(
            "virtual_storage".into(),
            self.virtual_storage.clone().into(),
        );
        m.insert("relative_path".into(), self.relative_path.clone().into());
        m.insert(
            "target_node_storage".into(),
            self.target_node_storage.clone().into(),
        );
        if let Some(s) = &self.source_node_storage {
            m.insert("source_node_storage".into(), s.clone().into());
        }
        if let Some(p) = self.change.params_json() {
            m.insert("params".into(), p);
        }
        if let Some(c) = &self.correlation_id {
            m.insert("correlation_id".into(), c.clone().into());
        }
        if let Some(t) = self.created_at
            && let Ok(s) = t.format(&Rfc3339)
        {
            m.insert("created_at".into(), s.into());
        }
        if let Some(id) = self.repository_id {
            m.insert("repository_id".into(), id.into());
        }
        if let Some(p) = &self.replica_path {
            m.insert("replica_path".into(), p.clone().into());
        }
        Value::Object(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a Value built from strings, bools and integers cannot fail.
        serde_json::to_vec(&self.to_value()).unwrap_or_default()
    }

    /// Where the repository lives on the storages: its replica path when the
    /// job names one (Praefect 14.5 and later), else its relative path.
    pub fn replica_path(&self) -> &str {
        self.replica_path.as_deref().unwrap_or(&self.relative_path)
    }

    /// The repository this job works on within the target: the key of the
    /// per-repository exclusion.
    pub fn repository_key(&self) -> (&str, &str, &str) {
        (
            &self.virtual_storage,
            &self.relative_path,
            &self.target_node_storage,
        )
    }
}

/// RFC 3339 as the schema's `date-time`: the `time` crate alone also takes
/// any byte between date and time, where RFC 3339 allows only `T` or `t`.
fn parse_rfc3339(key: &str, s: &str) -> Result<OffsetDateTime, InvalidEvent> {
    if !matches!(s.as_bytes().get(10), Some(b'T' | b't')) {
        return Err(InvalidEvent::new(
            key,
            "not an RFC 3339 time: date and time must be separated by `T`",
        ));
    }
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| InvalidEvent::new(key, format!("not an RFC 3339 time: {e}")))
}

fn all_names() -> String {
    ChangeType::ALL
        .iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn optional_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, InvalidEvent> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(InvalidEvent::new(key, "expected a string")),
    }
}

fn required_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, InvalidEvent> {
    match optional_str(obj, key)? {
        None => Err(InvalidEvent::new(key, "required")),
        Some("") => Err(InvalidEvent::new(key, "must not be empty")),
        Some(s) => Ok(s),
    }
}

fn check_name<'a>(key: &str, s: &'a str) -> Result<&'a str, InvalidEvent> {
    if s.len() > MAX_TEXT_LEN {
        return Err(InvalidEvent::new(key, "too long"));
    }
    if s.chars().any(char::is_control) {
        return Err(InvalidEvent::new(
            key,
            "must not contain control characters",
        ));
    }
    Ok(s)
}

fn name_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, InvalidEvent> {
    check_name(key, required_str(obj, key)?)
}

fn path_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, InvalidEvent> {
    let s = name_field(obj, key)?;
    check_relative_path(key, s)?;
    Ok(s)
}

/// A relative path stays inside its storage: not absolute, no `..` component.
pub fn check_relative_path(key: &str, s: &str) -> Result<(), InvalidEvent> {
    if s.starts_with('/') {
        return Err(InvalidEvent::new(key, "must be relative, not absolute"));
    }
    if s.split('/').any(|c| c == "..") {
        return Err(InvalidEvent::new(key, "must not contain a `..` component"));
    }
    Ok(())
}

/// The one value a field has when two places may give it: the same value
/// twice is fine, two different ones are a contradiction.
fn agree<T: PartialEq + fmt::Debug>(
    key: &str,
    value: Option<T>,
    other_key: &str,
    other: Option<T>,
) -> Result<Option<T>, InvalidEvent> {
    match (value, other) {
        (Some(a), Some(b)) if a != b => Err(InvalidEvent::new(
            key,
            format!("{key} ({a:?}) and {other_key} ({b:?}) disagree; give one"),
        )),
        (a, b) => Ok(a.or(b)),
    }
}

/// Praefect's Go name for one of our params.
fn praefects_name(ours: &str) -> &'static str {
    PARAM_ALIASES
        .iter()
        .find(|(o, _)| *o == ours)
        .map_or("", |(_, go)| go)
}

/// One param, decoded from each spelling present; both must mean the same.
fn param<T: PartialEq + fmt::Debug>(
    p: &Map<String, Value>,
    key: &str,
    decode: impl Fn(&str, &Value) -> Result<T, InvalidEvent>,
) -> Result<Option<T>, InvalidEvent> {
    let read = |k: &str| match p.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => decode(&format!("params.{k}"), v).map(Some),
    };
    let go = praefects_name(key);
    agree(
        &format!("params.{key}"),
        read(key)?,
        &format!("params.{go}"),
        read(go)?,
    )
}

fn required<T>(change_type: ChangeType, key: &str, v: Option<T>) -> Result<T, InvalidEvent> {
    v.ok_or_else(|| {
        InvalidEvent::new(
            format!("params.{key}"),
            format!(
                "required for change {change_type} (Praefect's name: {})",
                praefects_name(key)
            ),
        )
    })
}

/// Reads `params` for a change type, in our spelling or Praefect's (see
/// [`PARAM_ALIASES`]). Types without params accept none, `null` or `{}`.
fn decode_params(change_type: ChangeType, params: Option<&Value>) -> Result<Change, InvalidEvent> {
    let empty = Map::new();
    let p = match params {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return Err(InvalidEvent::new("params", "expected an object or null")),
    };
    let ours: &[&str] = match change_type {
        ChangeType::Rename => &["new_relative_path"],
        ChangeType::GarbageCollect => &["create_bitmap", "prune"],
        ChangeType::RepackFull => &["create_bitmap"],
        ChangeType::PackRefs => &["all_refs"],
        ChangeType::WriteCommitGraph => &["split_strategy"],
        _ => &[],
    };
    let allowed = |k: &str| ours.iter().any(|o| *o == k || praefects_name(o) == k);
    if let Some(k) = p.keys().find(|k| !allowed(k)) {
        return Err(InvalidEvent::new(
            format!("params.{k}"),
            format!("not a param of change {change_type}"),
        ));
    }
    let needed_bool = |key: &str| required(change_type, key, param(p, key, decode_bool)?);
    Ok(match change_type {
        ChangeType::Update => Change::Update,
        ChangeType::Create => Change::Create,
        ChangeType::Delete => Change::Delete,
        ChangeType::DeleteReplica => Change::DeleteReplica,
        ChangeType::Rename => Change::Rename {
            new_relative_path: required(
                change_type,
                "new_relative_path",
                param(p, "new_relative_path", decode_path)?,
            )?,
        },
        ChangeType::GarbageCollect => Change::GarbageCollect {
            create_bitmap: needed_bool("create_bitmap")?,
            prune: needed_bool("prune")?,
        },
        ChangeType::RepackFull => Change::RepackFull {
            create_bitmap: needed_bool("create_bitmap")?,
        },
        ChangeType::RepackIncremental => Change::RepackIncremental,
        ChangeType::Cleanup => Change::Cleanup,
        ChangeType::PackRefs => Change::PackRefs {
            all_refs: param(p, "all_refs", decode_bool)?.unwrap_or(false),
        },
        ChangeType::WriteCommitGraph => Change::WriteCommitGraph {
            split_strategy: param(p, "split_strategy", decode_split_strategy)?.unwrap_or_default(),
        },
        ChangeType::MidxRepack => Change::MidxRepack,
        ChangeType::OptimizeRepository => Change::OptimizeRepository,
    })
}

fn decode_bool(key: &str, v: &Value) -> Result<bool, InvalidEvent> {
    v.as_bool()
        .ok_or_else(|| InvalidEvent::new(key, "expected a boolean"))
}

fn decode_path(key: &str, v: &Value) -> Result<String, InvalidEvent> {
    let s = match v {
        Value::String(s) if s.is_empty() => {
            return Err(InvalidEvent::new(key, "must not be empty"));
        }
        Value::String(s) => s,
        _ => return Err(InvalidEvent::new(key, "expected a string")),
    };
    check_name(key, s)?;
    check_relative_path(key, s)?;
    Ok(s.clone())
}

/// Ours: `"size_multiple"` or the enum number 0. Praefect's `SplitStrategy`
/// is the enum number, which its Postgres queue hands back as a JSON float,
/// so `0.0` means 0 there. Gitaly knows no other strategy, so a job asking
/// for one could never succeed.
fn decode_split_strategy(key: &str, v: &Value) -> Result<SplitStrategy, InvalidEvent> {
    let praefects = key == "params.SplitStrategy";
    let number = match v {
        Value::String(s) if s == "size_multiple" && !praefects => {
            return Ok(SplitStrategy::SizeMultiple);
        }
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| praefects && f.fract() == 0.0 && f.abs() < 1e15)
                // Integral and far inside i64: the cast is exact.
                .map(|f| f as i64)
        }),
        _ => None,
    };
    match number {
        Some(0) => Ok(SplitStrategy::SizeMultiple),
        Some(n) => Err(InvalidEvent::new(
            key,
            format!("unknown split strategy {n}: Gitaly has only 0 (SizeMultiple)"),
        )),
        None if praefects => Err(InvalidEvent::new(key, "expected the integer 0")),
        None => Err(InvalidEvent::new(key, "expected \"size_multiple\" or 0")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base(change: &str) -> Value {
        json!({
            "change": change,
            "virtual_storage": "default",
            "relative_path": "@hashed/aa/bb/aabb.git",
            "target_node_storage": "gitaly-2",
            "source_node_storage": "gitaly-1",
        })
    }

    #[test]
    fn every_change_type_round_trips_through_json() {
        for ct in ChangeType::ALL {
            let mut v = base(ct.as_str());
            let params = match ct {
                ChangeType::Rename => json!({"new_relative_path": "@hashed/new.git"}),
                ChangeType::GarbageCollect => json!({"create_bitmap": true, "prune": false}),
                ChangeType::RepackFull => json!({"create_bitmap": true}),
                ChangeType::PackRefs => json!({"all_refs": true}),
                ChangeType::WriteCommitGraph => json!({"split_strategy": "size_multiple"}),
                _ => Value::Null,
            };
            v["params"] = params;
            v["created_at"] = json!("2026-11-25T08:00:00Z");
            let job = Job::from_value(&v).unwrap();
            assert_eq!(job.change_type(), ct);
            let again = Job::from_json(&job.to_json()).unwrap();
            assert_eq!(again, job);
        }
    }

    #[test]
    fn errors_name_the_offending_field() {
        let mut v = base("gc");
        v["params"] = json!({"create_bitmap": true, "prune": "yes"});
        assert_eq!(Job::from_value(&v).unwrap_err().field, "params.prune");
        let mut v = base("update");
        v.as_object_mut().unwrap().remove("source_node_storage");
        assert_eq!(
            Job::from_value(&v).unwrap_err().field,
            "source_node_storage"
        );
        let mut v = base("update");
        v["relative_path"] = json!("../etc/passwd");
        assert_eq!(Job::from_value(&v).unwrap_err().field, "relative_path");
        let mut v = base("update");
        v["colour"] = json!("red");
        assert_eq!(Job::from_value(&v).unwrap_err().field, "colour");
        let mut v = base("frobnicate");
        v["change"] = json!("frobnicate");
        assert_eq!(Job::from_value(&v).unwrap_err().field, "change");
    }

    #[test]
    fn praefect_numeric_split_strategy_is_accepted() {
        let mut v = base("write_commit_graph");
        v["params"] = json!({"split_strategy": 0});
        let job = Job::from_value(&v).unwrap();
        assert_eq!(
            job.change,
            Change::WriteCommitGraph {
                split_strategy: SplitStrategy::SizeMultiple
            }
        );
    }

    #[test]
    fn praefects_param_names_mean_ours() {
        let cases = [
            (
                "gc",
                json!({"CreateBitmap": true, "Prune": false}),
                Change::GarbageCollect {
                    create_bitmap: true,
                    prune: false,
                },
            ),
            (
                "gc",
                json!({"CreateBitmap": true, "prune": true}),
                Change::GarbageCollect {
                    create_bitmap: true,
                    prune: true,
                },
            ),
            (
                "repack_full",
                json!({"CreateBitmap": true}),
                Change::RepackFull {
                    create_bitmap: true,
                },
            ),
            (
                "pack_refs",
                json!({"AllRefs": true}),
                Change::PackRefs { all_refs: true },
            ),
            (
                "rename",
                json!({"RelativePath": "@hashed/new.git"}),
                Change::Rename {
                    new_relative_path: "@hashed/new.git".into(),
                },
            ),
            (
                "write_commit_graph",
                json!({"SplitStrategy": 0}),
                Change::WriteCommitGraph {
                    split_strategy: SplitStrategy::SizeMultiple,
                },
            ),
            (
                "write_commit_graph",
                json!({"SplitStrategy": 0.0}),
                Change::WriteCommitGraph {
                    split_strategy: SplitStrategy::SizeMultiple,
                },
            ),
            // Both spellings with one meaning.
            (
                "gc",
                json!({"CreateBitmap": true, "create_bitmap": true, "Prune": false}),
                Change::GarbageCollect {
                    create_bitmap: true,
                    prune: false,
                },
            ),
            (
                "write_commit_graph",
                json!({"SplitStrategy": 0.0, "split_strategy": "size_multiple"}),
                Change::WriteCommitGraph {
                    split_strategy: SplitStrategy::SizeMultiple,
                },
            ),
        ];
        for (change, params, want) in cases {
            let mut v = base(change);
            v["params"] = params.clone();
            assert_eq!(
                Job::from_value(&v).unwrap().change,
                want,
                "{change} {params}"
            );
        }
    }

    #[test]
    fn a_param_given_twice_with_two_values_names_both_keys() {
        let mut v = base("gc");
        v["params"] = json!({"create_bitmap": true, "CreateBitmap": false, "prune": false});
        let e = Job::from_value(&v).unwrap_err();
        assert_eq!(e.field, "params.create_bitmap");
        assert!(
            e.reason.contains("params.create_bitmap") && e.reason.contains("params.CreateBitmap"),
            "{e}"
        );
        let mut v = base("gc");
        v["params"] = json!({"CreateBitmap": true});
        let e = Job::from_value(&v).unwrap_err();
        assert_eq!(e.field, "params.prune");
        assert!(e.reason.contains("Prune"), "{e}");
        let mut v = base("write_commit_graph");
        v["params"] = json!({"SplitStrategy": 2.0});
        let e = Job::from_value(&v).unwrap_err();
        assert_eq!(e.field, "params.SplitStrategy");
        assert!(e.reason.contains("unknown split strategy 2"), "{e}");
        let mut v = base("write_commit_graph");
        v["params"] = json!({"SplitStrategy": 0.5});
        assert_eq!(
            Job::from_value(&v).unwrap_err().field,
            "params.SplitStrategy"
        );
    }

    #[test]
    fn praefects_replication_event_carries_the_job_its_correlation_id_and_created_time() {
        let mut inner = base("update");
        inner["repository_id"] = json!(0);
        inner["params"] = Value::Null;
        let envelope = json!({
            "ID": 9, "State": "failed", "Attempt": 1, "LockID": "default|gitaly-2|x",
            "CreatedAt": "2026-11-30T10:15:02.123456789Z", "UpdatedAt": null,
            "Job": inner, "Meta": {"correlation_id": "c-9", "other": 1},
        });
        let job = Job::from_value(&envelope).unwrap();
        assert_eq!(job.change, Change::Update);
        assert_eq!(job.correlation_id.as_deref(), Some("c-9"));
        assert_eq!(
            job.created_at.unwrap().unix_timestamp_nanos(),
            1_796_033_702_123_456_789
        );
        // Praefect's 0: no known repository.
        assert_eq!(job.repository_id, None);
        // Encoded in our shape, it decodes to the same job.
        assert_eq!(Job::from_json(&job.to_json()).unwrap(), job);

        let mut bad = envelope.clone();
        bad["Job"]["change"] = json!("frobnicate");
        assert_eq!(Job::from_value(&bad).unwrap_err().field, "Job.change");
        let mut bad = envelope.clone();
        bad["Job"]["correlation_id"] = json!("c-other");
        let e = Job::from_value(&bad).unwrap_err();
        assert!(e.reason.contains("Meta.correlation_id"), "{e}");
    }
}
