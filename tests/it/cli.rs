//! The operator commands as processes: setup, publish, status, dead.

use crate::common::cluster::{Cluster, nats_url};
use gitaly_replicator::dead_letters::headers;
use serde_json::json;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use testkit::recording_gitaly::Behaviour;

pub(crate) fn cli(toml: &str, args: &[&str], stdin: Option<&str>) -> Output {
    cli_with_env(toml, args, stdin, &[])
}

/// Runs the binary with `toml` as its config and `env` set; `RUST_LOG` only
/// when `env` sets it, so the caller's shell does not change what is logged.
pub(crate) fn cli_with_env(
    toml: &str,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gitaly-replicator"))
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .arg("--config")
        .arg(&path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub(crate) fn all(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// The lines of stderr that are JSON objects: log lines in the JSON format.
fn json_log_lines(o: &Output) -> Vec<serde_json::Value> {
    stderr(o)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(serde_json::Value::is_object)
        .collect()
}

/// Puts one job for `relative_path` into the dead-letter stream: gitaly-2
/// refuses its Cleanup, and the consumer that tried is stopped again.
async fn one_dead_letter(c: &Cluster, relative_path: &str) {
    c.node(2).respond(
        "Cleanup",
        Behaviour::fail(tonic::Code::InvalidArgument, "refused"),
    );
    let consumer = c.consumer().await;
    c.publish(&c.job(
        json!({"change": "cleanup", "relative_path": relative_path, "target_node_storage": "gitaly-2"}),
    ))
    .await;
    assert!(
        c.eventually(Duration::from_secs(10), || async {
            c.dead_letters().await.len() == 1
        })
        .await
    );
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn setup_is_idempotent_and_reports_what_it_changed() {
    let c = Cluster::start(2).await;
    let o = cli(&c.toml, &["setup"], None);
    assert!(o.status.success(), "{}", all(&o));
    assert!(
        stdout(&o).lines().all(|l| l.starts_with("unchanged")),
        "{}",
        all(&o)
    );
    let changed = c.toml.replace("ack_wait = \"5s\"", "ack_wait = \"7s\"");
    let o = cli(&changed, &["setup"], None);
    assert!(o.status.success(), "{}", all(&o));
    assert!(stdout(&o).contains("ack_wait 5s -> 7s"), "{}", all(&o));
    let o = cli(&changed, &["setup"], None);
    assert!(
        stdout(&o).lines().all(|l| l.starts_with("unchanged")),
        "{}",
        all(&o)
    );
}

#[tokio::test]
async fn setup_moves_consumers_from_their_old_names_and_keeps_their_jobs() {
    let storages = ["gitaly-1", "gitaly.3"].map(String::from);
    let c = Cluster::start_named(&storages, nats_url(), |_| {}).await;
    let renamed = c.rename_consumers_to_old_names().await;
    for storage in &storages {
        for n in 0..2 {
            c.publish(&c.job(json!({"change": "cleanup", "relative_path": format!("p{n}.git"), "target_node_storage": storage})))
                .await;
        }
    }
    let o = cli(&c.toml, &["setup"], None);
    assert!(o.status.success(), "{}", all(&o));
    let out = stdout(&o);
    for (old, new) in &renamed {
        assert!(
            out.contains(&format!("moved consumer {old} to {new} on ")),
            "{old}: {out}"
        );
        assert!(
            out.contains(&format!("created consumer {new} on ")),
            "{out}"
        );
    }
    let work = c.js.get_stream(&c.layout.stream).await.unwrap();
    for spec in &c.layout.consumers {
        let info = work.consumer_info(&spec.durable_name).await.unwrap();
        assert_eq!(
            info.num_pending, 2,
            "{}: the jobs wait for it",
            spec.durable_name
        );
    }
    let o = cli(&c.toml, &["setup"], None);
    assert!(
        stdout(&o).lines().all(|l| l.starts_with("unchanged")),
        "{}",
        all(&o)
    );
}

/// The line of `setup`'s output that starts with `prefix`.
fn line_of<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in\n{out}"))
}

#[tokio::test]
async fn setup_reports_every_setting_that_differs_from_the_config_and_updates_it() {
    let c = Cluster::start(2).await;
    let changed = c
        .toml
        .replace(
            "[nats]\n",
            "[nats]\nmax_messages = 1234\nmax_ack_pending = 77\nmax_deliver = 5\ndead_letter_max_age = \"48h\"\n",
        )
        .replace("duplicate_window = \"1m\"", "duplicate_window = \"90s\"")
        .replace("ack_wait = \"5s\"", "ack_wait = \"7s\"")
        .replace("[replication]\n", "[replication]\nattempts = 5\n");
    let o = cli(&changed, &["setup"], None);
    assert!(o.status.success(), "{}", all(&o));
    let out = stdout(&o);
    let work = line_of(&out, &format!("updated stream {}:", c.layout.stream));
    for change in [
        "max_messages 10000000 -> 1234",
        "duplicate_window 60s -> 90s",
    ] {
        assert!(work.contains(change), "{change}: {out}");
    }
    let dead = line_of(
        &out,
        &format!("updated stream {}:", c.layout.dead_letter_stream),
    );
    for change in ["max_age 2592000s -> 172800s", "duplicate_window 60s -> 90s"] {
        assert!(dead.contains(change), "{change}: {out}");
    }
    for spec in &c.layout.consumers {
        let consumer = line_of(&out, &format!("updated consumer {} ", spec.durable_name));
        for change in [
            "ack_wait 5s -> 7s",
            "max_deliver 50 -> 5",
            "max_ack_pending 1000 -> 77",
        ] {
            assert!(consumer.contains(change), "{change}: {out}");
        }
    }
    assert!(!out.contains("cannot update"), "{out}");

    let mut work = c.js.get_stream(&c.layout.stream).await.unwrap();
    let config = work.info().await.unwrap().config.clone();
    assert_eq!(config.max_messages, 1234);
    assert_eq!(config.duplicate_window, Duration::from_secs(90));
    let mut dead = c.js.get_stream(&c.layout.dead_letter_stream).await.unwrap();
    let config = dead.info().await.unwrap().config.clone();
    assert_eq!(config.max_age, Duration::from_secs(48 * 3600));
    for spec in &c.layout.consumers {
        let config = work.consumer_info(&spec.durable_name).await.unwrap().config;
        assert_eq!(
            (config.ack_wait, config.max_deliver, config.max_ack_pending),
            (Duration::from_secs(7), 5, 77),
            "{}",
            spec.durable_name
        );
    }
    let o = cli(&changed, &["setup"], None);
    assert!(
        stdout(&o).lines().all(|l| l.starts_with("unchanged")),
        "{}",
        all(&o)
    );
}

#[tokio::test]
async fn setup_names_the_settings_jetstream_cannot_change_updates_the_rest_and_fails() {
    use async_nats::jetstream::consumer::ReplayPolicy;
    use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
    let c = Cluster::start(2).await;
    // Someone made the dead-letter stream a work queue in memory by hand,
    // with a shorter age, and one consumer replay jobs at their original pace.
    c.js.delete_stream(&c.layout.dead_letter_stream)
        .await
        .unwrap();
    let mut wrong = c.layout.dead_letter_stream_config();
    wrong.retention = RetentionPolicy::WorkQueue;
    wrong.storage = StorageType::Memory;
    wrong.max_age = Duration::from_secs(3600);
    c.js.create_stream(wrong).await.unwrap();
    let spec = &c.layout.consumers[1];
    let work = c.js.get_stream(&c.layout.stream).await.unwrap();
    work.delete_consumer(&spec.durable_name).await.unwrap();
    let mut consumer = c.layout.consumer_config(spec);
    consumer.replay_policy = ReplayPolicy::Original;
    consumer.ack_wait = Duration::from_secs(3);
    work.create_consumer(consumer).await.unwrap();

    let o = cli(&c.toml, &["setup"], None);
    assert_eq!(o.status.code(), Some(1), "{}", all(&o));
    let out = stdout(&o);
    let dead = &c.layout.dead_letter_stream;
    let refused = line_of(&out, &format!("cannot update stream {dead}:"));
    for difference in ["retention WorkQueue -> Limits", "storage Memory -> File"] {
        assert!(refused.contains(difference), "{difference}: {out}");
    }
    assert!(
        line_of(&out, &format!("updated stream {dead}:")).contains("max_age 3600s -> 2592000s"),
        "{out}"
    );
    let name = &spec.durable_name;
    assert!(
        line_of(&out, &format!("cannot update consumer {name} "))
            .contains("replay_policy Original -> Instant"),
        "{out}"
    );
    assert!(
        line_of(&out, &format!("updated consumer {name} ")).contains("ack_wait 3s -> 5s"),
        "{out}"
    );
    let err = stderr(&o);
    assert!(
        err.contains(&format!("cannot update stream {dead}")) && err.contains("retention"),
        "{err}"
    );
    assert!(
        err.contains(&format!("cannot update consumer {name}")),
        "{err}"
    );

    let mut stream = c.js.get_stream(dead).await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(
        (config.retention, config.storage, config.max_age),
        (
            RetentionPolicy::WorkQueue,
            StorageType::Memory,
            Duration::from_secs(30 * 24 * 3600)
        ),
        "kept what cannot change, updated the rest"
    );
    let config = work.consumer_info(name).await.unwrap().config;
    assert_eq!(
        (config.replay_policy, config.ack_wait),
        (ReplayPolicy::Original, Duration::from_secs(5))
    );
}

#[tokio::test]
async fn publish_from_flags_and_stdin_validates_first_and_sets_a_message_id() {
    let c = Cluster::start(2).await;
    let vs = c.vs().to_owned();
    let o = cli(
        &c.toml,
        &[
            "publish",
            "--virtual-storage",
            &vs,
            "--change",
            "gc",
            "--relative-path",
            "a.git",
            "--target",
            "gitaly-2",
            "--param",
            "create_bitmap=true",
            "--param",
            "prune=false",
        ],
        None,
    );
    assert!(o.status.success(), "{}", all(&o));
    assert!(stdout(&o).contains("published sequence=1"), "{}", all(&o));
    // Two identical updates are two jobs: ids are per publish, not payload hashes.
    let line = json!({"change": "update", "virtual_storage": vs, "relative_path": "b.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}).to_string();
    let bad = json!({"change": "gc", "virtual_storage": vs, "relative_path": "c.git", "target_node_storage": "gitaly-2", "params": {"prune": true}}).to_string();
    let unknown = json!({"change": "cleanup", "virtual_storage": vs, "relative_path": "d.git", "target_node_storage": "gitaly-7"}).to_string();
    let o = cli(
        &c.toml,
        &["publish", "--stdin"],
        Some(&format!("{line}\n{line}\n{bad}\n{unknown}\n")),
    );
    assert!(!o.status.success(), "bad lines must fail the command");
    let out = all(&o);
    assert_eq!(out.matches("published sequence=").count(), 2, "{out}");
    assert!(out.contains("params.create_bitmap"), "{out}");
    assert!(out.contains("gitaly-7"), "{out}");
    assert!(out.contains("2 job(s) not published"), "{out}");
    assert_eq!(c.work_messages().await, 3);
    // The same idempotency key twice is one job.
    for _ in 0..2 {
        let o = cli(
            &c.toml,
            &[
                "publish",
                "--virtual-storage",
                &vs,
                "--change",
                "cleanup",
                "--relative-path",
                "e.git",
                "--target",
                "gitaly-2",
                "--message-id",
                "key-1",
            ],
            None,
        );
        assert!(o.status.success(), "{}", all(&o));
    }
    assert_eq!(c.work_messages().await, 4);
}

#[tokio::test]
async fn publish_to_a_full_stream_fails_loudly_and_drops_nothing() {
    let c = Cluster::start_with(2, |t| {
        *t = t.replace("[nats]\n", "[nats]\nmax_messages = 5\n");
    })
    .await;
    let vs = c.vs().to_owned();
    let mut published = 0;
    let mut refused = None;
    for i in 0..20 {
        let o = cli(
            &c.toml,
            &[
                "publish",
                "--virtual-storage",
                &vs,
                "--change",
                "cleanup",
                "--relative-path",
                &format!("f{i}.git"),
                "--target",
                "gitaly-2",
            ],
            None,
        );
        if o.status.success() {
            published += 1;
        } else {
            refused = Some(all(&o));
            break;
        }
    }
    let err = refused.expect("the stream never filled up");
    assert!(
        err.contains("full") && err.contains("maximum messages"),
        "{err}"
    );
    assert_eq!(published, 5);
    assert!(published > 0);
    assert_eq!(
        c.work_messages().await,
        published,
        "an accepted job was dropped"
    );
}

#[tokio::test]
async fn status_shows_pending_in_flight_and_dead_per_target() {
    let c = Cluster::start(3).await;
    one_dead_letter(&c, "x.git").await;
    for i in 0..4 {
        c.publish(&c.job(json!({"change": "cleanup", "relative_path": format!("p{i}.git"), "target_node_storage": "gitaly-3"}))).await;
    }
    let o = cli(&c.toml, &["status"], None);
    assert!(o.status.success(), "{}", all(&o));
    let out = stdout(&o);
    let row = |target: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(target))
            .unwrap_or_else(|| panic!("no row for {target} in\n{out}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(row("gitaly-2")[2..], ["0", "0", "0", "1"]);
    assert_eq!(row("gitaly-3")[2..], ["4", "0", "0", "0"]);
    assert_eq!(row("gitaly-1")[2..], ["0", "0", "0", "0"]);
}

#[tokio::test]
async fn dead_list_replay_and_purge_handle_the_dead_letters() {
    let c = Cluster::start(2).await;
    c.node(2).respond(
        "Cleanup",
        Behaviour::fail(tonic::Code::InvalidArgument, "refused").times(2),
    );
    let consumer = c.consumer().await;
    for p in ["one.git", "two.git"] {
        c.publish(&c.job(
            json!({"change": "cleanup", "relative_path": p, "target_node_storage": "gitaly-2"}),
        ))
        .await;
    }
    assert!(
        c.eventually(Duration::from_secs(10), || async {
            c.dead_letters().await.len() == 2
        })
        .await
    );
    let o = cli(&c.toml, &["dead", "list"], None);
    assert!(o.status.success(), "{}", all(&o));
    let out = stdout(&o);
    assert!(
        out.contains("one.git") && out.contains("two.git") && out.contains("reason=invalid"),
        "{out}"
    );
    let o = cli(&c.toml, &["dead", "list", "--json"], None);
    let first: serde_json::Value =
        serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert!(first["error"].as_str().unwrap().contains("refused"));
    let seq = first["sequence"].as_u64().unwrap().to_string();
    let replayed_path = if stdout(&o).lines().next().unwrap().contains("one.git") {
        "one.git"
    } else {
        "two.git"
    };
    // Replay one: it goes back to work and now succeeds.
    let o = cli(&c.toml, &["dead", "replay", &seq], None);
    assert!(o.status.success(), "{}", all(&o));
    assert!(
        c.eventually(Duration::from_secs(10), || async {
            c.node(2)
                .calls_to("Cleanup")
                .iter()
                .filter(|x| x.relative_path == replayed_path)
                .count()
                == 2
        })
        .await
    );
    assert!(
        c.eventually(Duration::from_secs(10), || async {
            c.work_messages().await == 0
        })
        .await
    );
    assert_eq!(c.dead_letters().await.len(), 1);
    assert!(c.dead_letters().await[0].header(headers::REASON).is_some());
    let o = cli(&c.toml, &["dead", "replay", "999999"], None);
    assert!(!o.status.success());
    let o = cli(&c.toml, &["dead", "purge", "--all"], None);
    assert!(o.status.success(), "{}", all(&o));
    assert!(stdout(&o).contains("purged 1"));
    assert!(c.dead_letters().await.is_empty());
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn check_config_masks_every_secret() {
    let c = Cluster::start(2).await;
    let o = cli(&c.toml, &["check-config"], None);
    assert!(o.status.success(), "{}", all(&o));
    let out = all(&o);
    assert!(out.contains("[masked]"));
    assert!(
        !out.contains("token-1") && !out.contains("token-2"),
        "{out}"
    );
}

#[tokio::test]
async fn setup_refuses_a_byte_limit_that_this_nats_server_would_enforce_by_dropping_jobs() {
    let c = Cluster::start(2).await;
    let version = c.client.server_info().version;
    let with_limit = c.toml.replace("[nats]\n", "[nats]\nmax_bytes = 100000\n");
    let o = cli(&with_limit, &["setup"], None);
    if gitaly_replicator::byte_limit_is_safe(&version) {
        assert!(o.status.success(), "{}", all(&o));
    } else {
        assert!(!o.status.success());
        assert!(all(&o).contains("nats-server#4771"), "{}", all(&o));
    }
}

#[test]
fn usage_errors_exit_64_and_help_and_version_exit_0() {
    for args in [
        &["--no-such-flag", "status"][..],
        &["status", "--no-such-flag"],
        &["dead", "list", "--limit"],
        &["dead", "list", "--limit", "many"],
        &["--log-format", "xml", "status"],
        &["dead"],
        &[],
    ] {
        let o = cli("", args, None);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", all(&o));
        assert!(
            o.stdout.is_empty() && !o.stderr.is_empty(),
            "{args:?}: {}",
            all(&o)
        );
    }
    for args in [["--help"], ["--version"]] {
        let o = cli("", &args, None);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", all(&o));
        assert!(!o.stdout.is_empty() && o.stderr.is_empty(), "{args:?}");
    }
}

#[test]
fn publish_refuses_an_unknown_change_type_as_a_usage_error_naming_the_valid_ones() {
    let o = cli(
        "",
        &[
            "publish",
            "--change",
            "garbage_collect",
            "--relative-path",
            "a.git",
            "--target",
            "gitaly-2",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(64), "{}", all(&o));
    let err = stderr(&o);
    assert!(err.contains("garbage_collect"), "{err}");
    for change in gitaly_replicator::ChangeType::ALL {
        assert!(err.contains(change.as_str()), "{change}: {err}");
    }
}

#[test]
fn publish_help_lists_every_change_type_as_the_contract_spells_it() {
    let o = cli("", &["publish", "--help"], None);
    assert!(o.status.success(), "{}", all(&o));
    let help = stdout(&o);
    let listed: Vec<&str> = help
        .split_once("[possible values: ")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(values, _)| values.split(", ").map(str::trim).collect())
        .unwrap_or_else(|| panic!("no possible values in\n{help}"));
    let contract: Vec<&str> = gitaly_replicator::ChangeType::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(listed, contract, "{help}");
}

#[tokio::test]
async fn status_logs_readable_warnings_by_default_and_json_when_asked() {
    let c = Cluster::start(1).await;
    let o = cli(&c.toml, &["status"], None);
    assert!(o.status.success(), "{}", all(&o));
    assert!(json_log_lines(&o).is_empty(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("connected to NATS"), "{}", stderr(&o));

    // RUST_LOG still sets the level; the format stays readable.
    let info = [("RUST_LOG", "info")];
    let o = cli_with_env(&c.toml, &["status"], None, &info);
    assert!(stderr(&o).contains("connected to NATS"), "{}", stderr(&o));
    assert!(json_log_lines(&o).is_empty(), "{}", stderr(&o));
    // Colour only on a terminal: stderr here is a pipe.
    assert!(!stderr(&o).contains('\u{1b}'), "{:?}", stderr(&o));
    let o = cli_with_env(&c.toml, &["status", "--log-format", "json"], None, &info);
    assert!(
        json_log_lines(&o)
            .iter()
            .any(|l| l["message"] == "connected to NATS"),
        "{}",
        stderr(&o)
    );

    // An unreachable NATS: the failure is logged as text, or as JSON when asked.
    let unreachable = c.toml.replace(&nats_url(), "nats://127.0.0.1:1");
    let o = cli(&unreachable, &["status"], None);
    assert_eq!(o.status.code(), Some(69), "{}", all(&o));
    assert!(stderr(&o).contains("cannot connect to NATS"), "{}", all(&o));
    assert!(json_log_lines(&o).is_empty(), "{}", stderr(&o));
    let o = cli(&unreachable, &["--log-format", "json", "status"], None);
    assert_eq!(o.status.code(), Some(69), "{}", all(&o));
    assert!(
        json_log_lines(&o).iter().any(|l| l["level"] == "ERROR"),
        "{}",
        stderr(&o)
    );

    // A format set in the config is honoured, and the flag wins over it.
    let json_in_file = format!("{unreachable}\n[logging]\nformat = \"json\"\n");
    let o = cli(&json_in_file, &["status"], None);
    assert!(!json_log_lines(&o).is_empty(), "{}", stderr(&o));
    let o = cli(&json_in_file, &["status", "--log-format", "text"], None);
    assert!(json_log_lines(&o).is_empty(), "{}", stderr(&o));
    let o = cli_with_env(
        &unreachable,
        &["status"],
        None,
        &[("GITALY_REPLICATOR_LOGGING__FORMAT", "json")],
    );
    assert!(!json_log_lines(&o).is_empty(), "{}", stderr(&o));
}

#[tokio::test]
async fn dead_purge_or_replay_without_a_selection_is_a_usage_error_and_touches_nothing() {
    let c = Cluster::start(2).await;
    one_dead_letter(&c, "kept.git").await;
    for command in ["purge", "replay"] {
        let o = cli(&c.toml, &["dead", command], None);
        assert_eq!(o.status.code(), Some(64), "{command}: {}", all(&o));
        let err = stderr(&o);
        assert!(err.contains("SEQUENCE") && err.contains("--all"), "{err}");
    }
    assert_eq!(c.dead_letters().await.len(), 1, "a dead letter was touched");
    assert_eq!(c.work_messages().await, 0, "a dead letter was replayed");
}

#[tokio::test]
async fn dead_replay_publishes_only_to_this_deployments_work_subjects() {
    let c = Cluster::start(2).await;
    one_dead_letter(&c, "real.git").await;
    // Forged dead letters: anyone who may publish into the dead-letter
    // subjects can write one, naming any subject to replay to.
    let dead_subject = c.dead_letters().await[0].subject.clone();
    let victim = format!("{}_VICTIM", c.names.stream);
    c.js.create_stream(async_nats::jetstream::stream::Config {
        name: victim.clone(),
        subjects: vec![format!("{victim}.x")],
        ..Default::default()
    })
    .await
    .unwrap();
    let payload = json!({"change": "cleanup", "virtual_storage": c.vs(), "relative_path": "forged.git", "target_node_storage": "gitaly-2"}).to_string();
    for forged in [
        format!("$JS.API.STREAM.DELETE.{victim}"),
        format!("{}.{}.gitaly-9", c.names.subject_prefix, c.vs()),
        "elsewhere.subject".to_owned(),
    ] {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::ORIGINAL_SUBJECT, forged.as_str());
        h.insert(headers::REASON, "dead");
        c.js.publish_with_headers(dead_subject.clone(), h, payload.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    assert_eq!(c.dead_letters().await.len(), 4);
    c.node(2).respond("Cleanup", Behaviour::ok());
    let o = cli(&c.toml, &["dead", "replay", "--all"], None);
    assert!(!o.status.success(), "{}", all(&o));
    let err = stderr(&o);
    assert_eq!(
        err.matches("is not a work subject of this deployment")
            .count(),
        3,
        "{err}"
    );
    assert!(
        err.contains("STREAM.DELETE") && err.contains("gitaly-9"),
        "{err}"
    );
    assert!(stdout(&o).contains("replayed 1 job(s)"), "{}", all(&o));
    // The forged ones stay, the victim stream lives, the real one went back.
    let left = c.dead_letters().await;
    assert_eq!(left.len(), 3);
    assert!(
        left.iter()
            .all(|m| m.payload.windows(6).any(|w| w == b"forged"))
    );
    assert!(
        c.js.get_stream(&victim).await.is_ok(),
        "the stream was deleted"
    );
    assert_eq!(c.work_messages().await, 1);
    c.js.delete_stream(&victim).await.unwrap();
}

#[tokio::test]
async fn dead_replay_keeps_each_jobs_place_and_says_how_many_a_later_job_superseded() {
    let c = Cluster::start(2).await;
    for p in ["superseded.git", "current.git"] {
        c.db.store
            .create_repository(c.vs(), p, "gitaly-1", 1, &["gitaly-1"])
            .await
            .unwrap();
    }
    let update = |p: &str| {
        c.job(json!({"change": "update", "relative_path": p, "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}))
    };
    // Both updates die on their one attempt.
    c.node(2).respond(
        "ReplicateRepository",
        Behaviour::fail(tonic::Code::Unavailable, "down for now").times(2),
    );
    let consumer = c
        .consumer_with(|config| config.replication.attempts = 1)
        .await;
    c.publish(&update("superseded.git")).await;
    c.publish(&update("current.git")).await;
    assert!(
        c.eventually(Duration::from_secs(15), || async {
            c.dead_letters().await.len() == 2
        })
        .await
    );
    // Later, one replica is removed: its dead update is superseded.
    c.publish(&c.job(json!({"change": "delete_replica", "relative_path": "superseded.git", "target_node_storage": "gitaly-2"})))
        .await;
    assert!(
        c.eventually(Duration::from_secs(15), || async {
            c.node(2).calls_to("RemoveRepository").len() == 1 && c.work_messages().await == 0
        })
        .await
    );
    let o = cli(&c.toml, &["dead", "replay", "--all"], None);
    assert!(o.status.success(), "{}", all(&o));
    let out = stdout(&o);
    assert!(out.contains("replayed 2 job(s)"), "{out}");
    assert!(out.contains("1 of them were superseded"), "{out}");
    assert!(
        c.eventually(Duration::from_secs(15), || async {
            c.work_messages().await == 0
                && c.db
                    .store
                    .generation(c.vs(), "current.git", "gitaly-2")
                    .await
                    .unwrap()
                    == Some(1)
        })
        .await,
        "the replayed update that nothing superseded did not take effect"
    );
    // The superseded one was skipped: the replica stays removed.
    let replicated: Vec<String> = c
        .node(2)
        .calls_to("ReplicateRepository")
        .iter()
        .map(|call| call.relative_path.clone())
        .collect();
    assert_eq!(
        replicated.iter().filter(|p| *p == "superseded.git").count(),
        1,
        "the replayed update ran after the delete_replica that superseded it: {replicated:?}"
    );
    assert_eq!(
        c.db.store
            .generation(c.vs(), "superseded.git", "gitaly-2")
            .await
            .unwrap(),
        None
    );
    assert!(c.dead_letters().await.is_empty());
    consumer.stop().await.unwrap();
}

/// Every command that needs NATS or Postgres exits 69 when it cannot reach
/// it, with the driver's cause and the address, each named once, and
/// prints that once: plain text without colour codes when stderr is not a
/// terminal, a JSON line alone in JSON mode.
#[tokio::test]
async fn commands_that_cannot_reach_nats_or_postgres_exit_69_with_the_cause_once() {
    let c = Cluster::start(1).await;
    let no_nats = c.toml.replace(&nats_url(), "nats://127.0.0.1:1");
    let publish = [
        "publish",
        "--change",
        "update",
        "--relative-path",
        "a.git",
        "--target",
        "gitaly-2",
        "--source",
        "gitaly-1",
    ];
    let nats_commands: [&[&str]; 4] = [&["setup"], &["status"], &["dead", "list"], &publish];
    for args in nats_commands {
        let o = cli(&no_nats, args, None);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(69), "{args:?}: {}", all(&o));
        assert_eq!(
            err.matches("cannot connect to NATS").count(),
            1,
            "{args:?}: {err}"
        );
        assert_eq!(err.matches("127.0.0.1:1").count(), 1, "{args:?}: {err}");
        assert_eq!(
            err.matches("onnection refused").count(),
            1,
            "{args:?}: {err}"
        );
        assert!(
            !err.contains('\u{1b}'),
            "{args:?}: colour codes in a file: {err:?}"
        );
    }

    let db_port = crate::common::cluster::db_port(&c.db.url);
    let no_postgres = c
        .toml
        .replace(&format!("127.0.0.1:{db_port}"), "127.0.0.1:1")
        .replace(&format!("localhost:{db_port}"), "127.0.0.1:1");
    assert_ne!(no_postgres, c.toml);
    let postgres_commands: [&[&str]; 3] =
        [&["migrate"], &["dataloss"], &["praefect-queue", "status"]];
    for args in postgres_commands {
        let started = std::time::Instant::now();
        let o = cli(&no_postgres, args, None);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(69), "{args:?}: {}", all(&o));
        assert_eq!(
            err.matches("cannot connect to Postgres").count(),
            1,
            "{args:?}: {err}"
        );
        assert_eq!(err.matches("127.0.0.1:1").count(), 1, "{args:?}: {err}");
        assert_eq!(
            err.matches("onnection refused").count(),
            1,
            "{args:?}: {err}"
        );
        assert!(!err.contains("pool timed out"), "{args:?}: {err}");
        // Refused at once, not after the connect timeout.
        assert!(started.elapsed() < Duration::from_secs(3), "{args:?}");
    }

    // JSON mode: the failure is one JSON line, and nothing else is printed.
    let o = cli(&no_nats, &["--log-format", "json", "status"], None);
    assert_eq!(o.status.code(), Some(69), "{}", all(&o));
    let err = stderr(&o);
    for line in err.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line:?}"
        );
    }
    assert_eq!(err.matches("cannot connect to NATS").count(), 1, "{err}");
}

/// `status` and `dead` before `setup` name the missing stream and say to run
/// `setup`.
#[tokio::test]
async fn status_and_dead_before_setup_name_the_missing_stream_and_the_command_to_run() {
    let c = Cluster::start(1).await;
    let unset = c
        .toml
        .replace(&c.names.stream, &format!("{}_NEVER_SET_UP", c.names.stream));
    for args in [&["status"][..], &["dead", "list"][..]] {
        let o = cli(&unset, args, None);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", all(&o));
        assert!(
            err.contains(&format!(
                "stream {}_NEVER_SET_UP does not exist",
                c.names.stream
            )),
            "{args:?}: {err}"
        );
        assert!(err.contains("gitaly-replicator setup"), "{args:?}: {err}");
    }
}

/// `publish`'s usage mistakes exit 64 and name the flag to change.
#[test]
fn publish_usage_mistakes_exit_64_naming_the_flag() {
    let base = [
        "publish",
        "--relative-path",
        "a.git",
        "--target",
        "gitaly-2",
    ];
    let cases: [(&[&str], &str); 4] = [
        (&["--change", "gc"], "--param create_bitmap"),
        (
            &[
                "--change",
                "gc",
                "--param",
                "create_bitmap=true",
                "--param",
                "prune=maybe",
            ],
            "--param prune",
        ),
        (&["--change", "update", "--param", "prune"], "--param prune"),
        (
            &["--change", "repack_full", "--param", "create_bitmap=yes"],
            "--param create_bitmap",
        ),
    ];
    for (extra, flag) in cases {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        // Nothing is contacted: the config points nowhere.
        let o = cli(&unreachable_config(), &args, None);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", all(&o));
        assert!(stderr(&o).contains(flag), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("params."), "{args:?}: {}", stderr(&o));
    }
    let absolute = [
        "publish",
        "--change",
        "update",
        "--relative-path",
        "/var/opt/gitlab/a.git",
        "--target",
        "gitaly-2",
        "--source",
        "gitaly-1",
    ];
    let o = cli(&unreachable_config(), &absolute, None);
    assert_eq!(o.status.code(), Some(64), "{}", all(&o));
    assert!(stderr(&o).contains("--relative-path"), "{}", stderr(&o));
}

/// A config whose NATS and Postgres do not answer: a command that gets as far
/// as connecting exits 69, so 64 shows it stopped before.
fn unreachable_config() -> String {
    "[[virtual_storage]]\nname = \"default\"\n\n[[virtual_storage.node]]\nstorage = \"gitaly-1\"\naddress = \"tcp://127.0.0.1:1\"\ntoken = \"t\"\n\n[[virtual_storage.node]]\nstorage = \"gitaly-2\"\naddress = \"tcp://127.0.0.1:1\"\ntoken = \"t\"\n\n[database]\nurl = \"postgres://postgres@127.0.0.1:1/x\"\n\n[nats]\nurl = \"nats://127.0.0.1:1\"\n".to_owned()
}

/// `migrate` says what it applied, then that the database is up to date;
/// `run` does not log Postgres's notices about tables that exist already.
#[tokio::test]
async fn migrate_says_what_it_applied_and_then_that_nothing_was_left() {
    let db = crate::common::db::TestDatabase::empty().await;
    let toml = unreachable_config().replace("postgres://postgres@127.0.0.1:1/x", &db.url);
    let o = cli(&toml, &["migrate", "--standalone"], None);
    assert!(o.status.success(), "{}", all(&o));
    let out = stdout(&o);
    let applied: Vec<&str> = out.lines().filter(|l| l.starts_with("applied ")).collect();
    let embedded = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    assert_eq!(applied.len(), embedded, "{out}");
    assert!(out.contains("applied 0007_replica_moves"), "{out}");

    let o = cli(&toml, &["migrate"], None);
    assert!(o.status.success(), "{}", all(&o));
    assert_eq!(
        stdout(&o).trim(),
        "already up to date: no migration to apply"
    );

    // `run` at its default level: connects, migrates (nothing), waits for
    // NATS, gives up; Postgres's "already exists" notices are not logged.
    let run = format!("startup_timeout = \"1s\"\nprometheus_listen_addr = \"127.0.0.1:0\"\n{toml}");
    let o = cli(&run, &["run"], None);
    assert_eq!(o.status.code(), Some(69), "{}", all(&o));
    assert!(!stderr(&o).contains("already exists"), "{}", stderr(&o));
}

/// `setup` and `run` refuse a stream replica count a single nats-server
/// cannot provide, naming the cluster size; nothing is created.
#[tokio::test]
async fn setup_and_run_refuse_replicas_a_single_nats_server_cannot_keep() {
    let nats = testkit::nats_server::PrivateNats::start().await;
    let c = Cluster::start(1).await;
    let toml = c
        .toml
        .replace(&nats_url(), &nats.url())
        .replace("[nats]\n", "[nats]\nreplicas = 3\n");
    let o = cli(&toml, &["setup"], None);
    assert_eq!(o.status.code(), Some(1), "{}", all(&o));
    let err = stderr(&o);
    assert!(err.contains("nats.replicas = 3"), "{err}");
    assert!(err.contains("cluster size is 1"), "{err}");
    assert!(!stdout(&o).contains("replicas 1 -> 3"), "{}", stdout(&o));
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    assert!(
        js.get_stream(&c.names.stream).await.is_err(),
        "a stream was created"
    );

    let run = format!("startup_timeout = \"5s\"\n{toml}");
    let o = cli(&run, &["run", "--log-format", "text"], None);
    assert_eq!(o.status.code(), Some(1), "{}", all(&o));
    assert!(stderr(&o).contains("cluster size is 1"), "{}", stderr(&o));

    // One replica is what it can keep.
    let single = toml.replace("replicas = 3\n", "replicas = 1\n");
    let o = cli(&single, &["setup"], None);
    assert!(o.status.success(), "{}", all(&o));
}
