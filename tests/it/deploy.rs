//! `deploy/` kept true: every YAML and JSON file parses; the alert rules and
//! the dashboard use only metrics and labels that a running service exports
//! (scraped from its `/metrics`); the NATS JSON is what `setup` creates (on a
//! real server); the generated ScaledObject and ConfigMap are current; the
//! Kubernetes, compose, systemd and Docker files carry what operations need.

use crate::common::cluster::{TestNames, delete_streams, nats_url};
use crate::common::http::get;
use crate::common::service::RunningService;
use gitaly_replicator::manifests::{self, ScalingOptions};
use gitaly_replicator::{Config, node_token_env_var};
use gitaly_replicator::{Layout, LayoutChange};
use promql_parser::parser::{Expr, LabelModifier};
use promql_parser::util::{ExprVisitor, walk_expr};
use serde_json::{Value as Json, json};
use serde_norway::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

// --- files ------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy_path(relative: &str) -> PathBuf {
    root().join("deploy").join(relative)
}

fn read(relative: &str) -> String {
    let path = deploy_path(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Every document of a YAML file, merge keys (`<<`) applied.
fn yaml_documents(relative: &str) -> Vec<Yaml> {
    use serde::Deserialize;
    let text = read(relative);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value =
                Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{relative}: not YAML: {e}"));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{relative}: {e}"));
            value
        })
        .collect()
}

fn yaml(relative: &str) -> Json {
    let docs = yaml_documents(relative);
    assert_eq!(docs.len(), 1, "{relative}: expected one YAML document");
    serde_json::to_value(&docs[0]).unwrap()
}

fn json_file(relative: &str) -> Json {
    serde_json::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn str_at<'a>(v: &'a Json, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Json::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

fn int_at(v: &Json, pointer: &str) -> i64 {
    v.pointer(pointer)
        .and_then(Json::as_i64)
        .unwrap_or_else(|| panic!("no integer at {pointer} in {v}"))
}

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut files = Vec::new();
    files_under(&root().join("deploy"), &mut files);
    let mut checked = 0;
    for path in files {
        let relative = path.strip_prefix(root().join("deploy")).unwrap();
        let relative = relative.to_str().unwrap();
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                assert!(!yaml_documents(relative).is_empty(), "{relative} is empty");
                checked += 1;
            }
            Some("json") => {
                json_file(relative);
                checked += 1;
            }
            _ => {}
        }
    }
    assert!(checked >= 18, "only {checked} YAML/JSON files found");
}

// --- metrics: rules and dashboard against a real scrape ---------------------

/// What one scrape shows: metric family → type, and family → label names.
struct Scrape {
    types: BTreeMap<String, String>,
    labels: BTreeMap<String, BTreeSet<String>>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut types = BTreeMap::new();
        let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap();
            let series = &line[..name_end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| series.strip_suffix(s))
                .filter(|base| types.get(*base).is_some_and(|t| t == "histogram"))
                .unwrap_or(series)
                .to_owned();
            let set = labels.entry(family).or_default();
            if line[name_end..].starts_with('{') {
                let body = &line[name_end + 1..line.rfind('}').unwrap()];
                for pair in body.split("\",") {
                    if let Some((label, _)) = pair.split_once("=\"") {
                        set.insert(label.trim().to_owned());
                    }
                }
            }
        }
        Scrape { types, labels }
    }

    /// The family a name in a query refers to: itself, or the histogram
    /// whose `_bucket`, `_sum` or `_count` series it is.
    fn family(&self, name: &str) -> Option<(String, bool)> {
        if let Some(kind) = self.types.get(name) {
            return Some((name.to_owned(), kind == "histogram"));
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            (self.types.get(base)? == "histogram").then(|| (base.to_owned(), *suffix == "_bucket"))
        })
    }

    /// Labels a series of `name` carries once Prometheus has scraped it.
    fn labels_of(&self, name: &str) -> BTreeSet<String> {
        let (family, bucket) = self.family(name).unwrap();
        let mut set = self.labels.get(&family).cloned().unwrap_or_default();
        set.remove("le");
        if bucket {
            set.insert("le".into());
        }
        // Target labels added by Prometheus on scrape.
        set.extend(["instance".to_owned(), "job".to_owned()]);
        set
    }
}

/// Metric names, matcher labels and grouping labels of one query.
#[derive(Default)]
struct QueryRefs {
    selectors: Vec<(String, Vec<String>)>,
    grouping: BTreeSet<String>,
    created: BTreeSet<String>,
}

impl ExprVisitor for QueryRefs {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        let selector = match expr {
            Expr::VectorSelector(vs) => Some(vs),
            Expr::MatrixSelector(ms) => Some(&ms.vs),
            _ => None,
        };
        if let Some(vs) = selector {
            let name = vs
                .name
                .clone()
                .ok_or_else(|| format!("selector without a metric name: {vs}"))?;
            let labels = vs
                .matchers
                .matchers
                .iter()
                .chain(vs.matchers.or_matchers.iter().flatten())
                .map(|m| m.name.clone())
                .filter(|n| n != "__name__")
                .collect();
            self.selectors.push((name, labels));
        }
        let modifier = match expr {
            Expr::Aggregate(a) => a.modifier.as_ref(),
            Expr::Binary(b) => b.modifier.as_ref().and_then(|m| m.matching.as_ref()),
            _ => None,
        };
        if let Some(LabelModifier::Include(l) | LabelModifier::Exclude(l)) = modifier {
            self.grouping.extend(l.labels.iter().cloned());
        }
        if let Expr::Call(call) = expr
            && call.func.name == "label_replace"
            && let Some(Expr::StringLiteral(dst)) = call.args.args.get(1).map(|a| &**a)
        {
            self.created.insert(dst.val.clone());
        }
        Ok(true)
    }
}

/// Checks one query against the scrape; returns the metric names it uses.
fn check_query(scrape: &Scrape, where_: &str, query: &str) -> BTreeSet<String> {
    // Grafana's interval variables are not PromQL.
    let query = query
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    let expr = promql_parser::parser::parse(&query)
        .unwrap_or_else(|e| panic!("{where_}: not PromQL: {e}\n{query}"));
    let mut refs = QueryRefs::default();
    walk_expr(&mut refs, &expr).unwrap_or_else(|e| panic!("{where_}: {e}"));
    assert!(!refs.selectors.is_empty(), "{where_}: uses no metric");
    let mut all_labels = refs.created.clone();
    let mut names = BTreeSet::new();
    for (name, matchers) in &refs.selectors {
        assert!(
            scrape.family(name).is_some(),
            "{where_}: `{name}` is not a metric the service exports; it exports {:?}",
            scrape.types.keys().collect::<Vec<_>>()
        );
        let labels = scrape.labels_of(name);
        for label in matchers {
            assert!(
                labels.contains(label),
                "{where_}: `{name}` has no label `{label}` (it has {labels:?})"
            );
        }
        all_labels.extend(labels);
        names.insert(scrape.family(name).unwrap().0);
    }
    for label in &refs.grouping {
        assert!(
            all_labels.contains(label),
            "{where_}: groups by `{label}`, which none of its metrics has ({all_labels:?})"
        );
    }
    names
}

/// Starts the real service with a recording Gitaly cluster, runs a few jobs
/// so that every metric has samples, and scrapes `/metrics`.
async fn scrape_running_service() -> Scrape {
    let service = RunningService::start("deploy.git").await;
    let (c, port) = (&service.cluster, service.port);
    assert!(
        c.eventually(Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
                && get(port, "/health/ready").await.0 == 200
        })
        .await,
        "the service never became ready"
    );
    service.publish_update_and_cleanup().await;
    let vs = c.vs().to_owned();
    let wanted = [
        "gitaly_praefect_replication_latency_bucket{".to_owned(),
        "gitaly_praefect_replication_delay_bucket{".to_owned(),
        format!(
            "gitaly_praefect_replication_queue_depth{{virtual_storage=\"{vs}\",target_node=\"gitaly-2\",state=\"ready\"}}"
        ),
    ];
    let complete = c
        .eventually(Duration::from_secs(30), || {
            let wanted = wanted.clone();
            async move {
                let (_, body) = get(port, "/metrics").await;
                wanted.iter().all(|w| body.contains(w.as_str()))
            }
        })
        .await;
    let (_, body) = get(port, "/metrics").await;
    assert!(complete, "metrics never got samples: {body}");
    service.stop().await;
    Scrape::parse(&body)
}

#[tokio::test]
async fn alert_rules_and_dashboard_use_only_metrics_and_labels_the_service_exports() {
    let scrape = scrape_running_service().await;

    // The scrape and metrics::ALL agree, so ALL is a fair list for docs too.
    let exported: BTreeSet<String> = scrape
        .types
        .keys()
        .filter(|n| n.starts_with("gitaly_"))
        .cloned()
        .collect();
    let all: BTreeSet<String> = gitaly_replicator::metric_names::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        exported, all,
        "metrics::ALL differs from what /metrics shows"
    );

    // Alert rules.
    let rules = yaml("prometheus/gitaly-replicator.rules.yml");
    let mut alerts = BTreeSet::new();
    let mut used = BTreeSet::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let alert = str_at(rule, "/alert");
            alerts.insert(alert.to_owned());
            used.extend(check_query(&scrape, alert, str_at(rule, "/expr")));
            assert!(rule["labels"]["severity"].is_string(), "{alert}: severity");
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{alert}: summary"
            );
        }
    }
    for required in [
        "GitalyReplicationQueueGrowing",
        "GitalyReplicationDeadLetters",
        "GitalyReplicationTargetUnhealthy",
        "GitalyReplicationStalled",
        "GitalyReplicationDelayHigh",
    ] {
        assert!(alerts.contains(required), "alert {required} is missing");
    }
    for metric in [
        "gitaly_praefect_replication_queue_depth",
        "gitaly_replicator_dead_letters_total",
        "gitaly_replicator_target_healthy",
        "gitaly_replicator_jobs_total",
        "gitaly_praefect_replication_delay",
    ] {
        assert!(used.contains(metric), "no alert rule uses {metric}");
    }

    // Dashboard: every panel query and every template variable query.
    let dashboard = json_file("grafana/gitaly-replicator.json");
    let mut used = BTreeSet::new();
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = str_at(panel, "/title");
        titles.push(title.to_owned());
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            used.extend(check_query(&scrape, title, str_at(target, "/expr")));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] != "query" {
            continue;
        }
        let query = str_at(var, "/query/query");
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {query}: expected label_values(...)"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let name = str_at(var, "/name");
        let metrics = check_query(&scrape, name, selector.trim());
        let metric = metrics.iter().next().unwrap();
        let metric_name = selector.split('{').next().unwrap().trim();
        assert!(
            scrape.labels_of(metric_name).contains(label.trim()),
            "variable {name}: {metric} has no label {label}"
        );
    }
    for metric in [
        "gitaly_replicator_jobs_total",
        "gitaly_praefect_replication_delay",
        "gitaly_praefect_replication_latency",
        "gitaly_praefect_replication_queue_depth",
        "gitaly_praefect_replication_jobs",
    ] {
        assert!(used.contains(metric), "no dashboard panel uses {metric}");
    }
    for wanted in [
        "outcome",
        "Delay percentiles",
        "Latency percentiles",
        "Queue depth per target",
        "In-flight",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel titled like {wanted:?}: {titles:?}"
        );
    }
}

// --- NATS ---------------------------------------------------------------------

fn example_config() -> Config {
    Config::from_toml_str(&std::fs::read_to_string(root().join("config.example.toml")).unwrap())
        .unwrap()
}

/// The committed files of deploy/nats/jetstream, by name.
fn committed_jetstream_files() -> BTreeMap<String, String> {
    std::fs::read_dir(deploy_path("nats/jetstream"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn nats_json_is_what_the_layout_of_the_example_config_generates() {
    let layout = Layout::from_config(&example_config());
    let generated: BTreeMap<String, String> = manifests::jetstream_files(&layout)
        .unwrap()
        .into_iter()
        .map(|f| (f.name, f.contents))
        .collect();
    let committed = committed_jetstream_files();
    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>(),
        "deploy/nats/jetstream is stale: run deploy/regenerate.sh"
    );
    for (name, text) in &generated {
        assert_eq!(
            &committed[name], text,
            "deploy/nats/jetstream/{name} is stale: run deploy/regenerate.sh"
        );
    }

    // Field by field, on what setup sets.
    use async_nats::jetstream::{consumer, stream};
    let parse_stream = |name: &str| -> stream::Config {
        serde_json::from_str(&committed[&manifests::stream_file_name(name)]).unwrap()
    };
    for wanted in [
        layout.work_stream_config(),
        layout.dead_letter_stream_config(),
        layout.advisory_stream_config(),
    ] {
        let got = parse_stream(&wanted.name);
        assert_eq!(got.name, wanted.name);
        assert_eq!(got.description, wanted.description);
        assert_eq!(got.subjects, wanted.subjects, "{}", wanted.name);
        assert_eq!(got.retention, wanted.retention, "{}", wanted.name);
        assert_eq!(got.storage, wanted.storage, "{}", wanted.name);
        assert_eq!(got.num_replicas, wanted.num_replicas, "{}", wanted.name);
        assert_eq!(got.discard, wanted.discard, "{}", wanted.name);
        assert_eq!(got.max_bytes, wanted.max_bytes, "{}", wanted.name);
        assert_eq!(got.max_messages, wanted.max_messages, "{}", wanted.name);
        assert_eq!(got.max_age, wanted.max_age, "{}", wanted.name);
        assert_eq!(
            got.duplicate_window, wanted.duplicate_window,
            "{}",
            wanted.name
        );
    }
    let consumers = layout
        .consumers
        .iter()
        .map(|spec| (layout.stream.clone(), layout.consumer_config(spec)))
        .chain([(
            layout.advisory_stream.clone(),
            layout.advisory_consumer_config(),
        )]);
    for (stream_name, wanted) in consumers {
        let durable = wanted.durable_name.clone().unwrap();
        let file = manifests::consumer_file_name(&stream_name, &durable);
        let got: consumer::pull::Config = serde_json::from_str(&committed[&file]).unwrap();
        assert_eq!(got.durable_name, wanted.durable_name, "{file}");
        assert_eq!(got.name, wanted.name, "{file}");
        assert_eq!(got.filter_subject, wanted.filter_subject, "{file}");
        assert_eq!(got.ack_policy, wanted.ack_policy, "{file}");
        assert_eq!(got.deliver_policy, wanted.deliver_policy, "{file}");
        assert_eq!(got.ack_wait, wanted.ack_wait, "{file}");
        assert_eq!(got.max_deliver, wanted.max_deliver, "{file}");
        assert_eq!(got.max_ack_pending, wanted.max_ack_pending, "{file}");
        let script = &committed[manifests::NATS_SCRIPT];
        assert!(
            script.contains(&format!(
                "nats consumer add '{stream_name}' --config '{file}'"
            )),
            "the script does not create {file}"
        );
    }
    assert_eq!(
        layout.consumers.len(),
        example_config().targets().count(),
        "one consumer per (virtual storage, target)"
    );
}

/// Deletes a test's streams when dropped, also when the test fails.
struct StreamsGuard(TestNames);

impl Drop for StreamsGuard {
    fn drop(&mut self) {
        delete_streams(nats_url(), self.0.clone());
    }
}

fn config_with_names(names: &TestNames) -> Config {
    let mut config = example_config();
    config.nats.url = nats_url();
    config.nats.subject_prefix = names.subject_prefix.clone();
    config.nats.stream = names.stream.clone();
    config.nats.dead_letter_stream = names.dead_letter_stream.clone();
    config.nats.consumer_prefix = names.consumer_prefix.clone();
    config
}

/// The committed JSON with the example config's names replaced by a test's.
fn renamed(text: &str, names: &TestNames) -> String {
    text.replace("GITALY_REPLICATION", &names.stream)
        .replace("gitaly.replication", &names.subject_prefix)
        .replace("gitaly-replicator_", &format!("{}_", names.consumer_prefix))
}

async fn api(client: &async_nats::Client, subject: String, body: Vec<u8>) -> Json {
    let reply = client
        .request(subject.clone(), body.into())
        .await
        .unwrap_or_else(|e| panic!("{subject}: {e}"));
    let value: Json = serde_json::from_slice(&reply.payload).unwrap();
    assert!(value.get("error").is_none(), "{subject}: {value}");
    value
}

#[tokio::test]
async fn the_nats_json_creates_on_a_real_server_exactly_what_setup_creates() {
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let by_json = TestNames::new();
    let by_setup = TestNames::new();
    let _guards = (
        StreamsGuard(by_json.clone()),
        StreamsGuard(by_setup.clone()),
    );

    // As an operator would with the nats CLI: the files, in the script's order.
    let files = committed_jetstream_files();
    let script = &files[manifests::NATS_SCRIPT];
    let mut created = Vec::new();
    for line in script.lines().filter(|l| l.starts_with("nats ")) {
        let quoted: Vec<&str> = line.split('\'').skip(1).step_by(2).collect();
        let (kind, target, file) = match (line.split(' ').nth(1), quoted.as_slice()) {
            (Some(kind), [target, file]) => (kind, *target, *file),
            _ => panic!("unexpected script line {line}"),
        };
        let body: Json = serde_json::from_str(&renamed(&files[file], &by_json)).unwrap();
        let target = renamed(target, &by_json);
        if kind == "stream" {
            api(
                &client,
                format!("$JS.API.STREAM.CREATE.{target}"),
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
            created.push(("stream", target, String::new()));
        } else {
            let durable = str_at(&body, "/durable_name").to_owned();
            let request = json!({"stream_name": target, "config": body});
            api(
                &client,
                format!("$JS.API.CONSUMER.CREATE.{target}.{durable}"),
                serde_json::to_vec(&request).unwrap(),
            )
            .await;
            created.push(("consumer", target, durable));
        }
    }
    let json_files = files.keys().filter(|n| n.ends_with(".json")).count();
    assert_eq!(created.len(), json_files, "every JSON file is used");

    // setup finds nothing to change on what the JSON created...
    let layout = Layout::from_config(&config_with_names(&by_json));
    for change in layout.ensure(&js).await.unwrap() {
        assert!(
            matches!(change, LayoutChange::Unchanged(_)),
            "setup would change what the nats CLI created: {change}"
        );
    }
    // ...and creating with setup gives the same server-side configuration.
    let setup_layout = Layout::from_config(&config_with_names(&by_setup));
    setup_layout.ensure(&js).await.unwrap();
    for (kind, stream, consumer) in created {
        let info = |stream: String, consumer: String| {
            let client = client.clone();
            async move {
                let subject = if consumer.is_empty() {
                    format!("$JS.API.STREAM.INFO.{stream}")
                } else {
                    format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}")
                };
                let mut reply = api(&client, subject, Vec::new()).await;
                reply["config"].take()
            }
        };
        let from_json = info(stream.clone(), consumer.clone()).await;
        let from_setup = info(
            stream.replace(&by_json.id, &by_setup.id),
            consumer.replace(&by_json.id, &by_setup.id),
        )
        .await;
        let from_json: Json =
            serde_json::from_str(&from_json.to_string().replace(&by_json.id, &by_setup.id))
                .unwrap();
        assert_eq!(
            from_json, from_setup,
            "{kind} {stream} {consumer}: the JSON and setup create different objects"
        );
    }
}

fn nats_server_version() -> Option<(u32, u32)> {
    let out = std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text.trim().rsplit('v').next()?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Some((parts.next()?, parts.next()?))
}

#[test]
fn nats_server_configs_are_accepted_by_nats_server() {
    for file in ["nats/nats-server.conf", "nats/nats-server-cluster.conf"] {
        let text = read(file);
        assert!(text.contains("jetstream"), "{file}: JetStream is not on");
        assert!(
            text.lines().any(|l| l.trim() == "sync_interval: always"),
            "{file}: sync_interval: always"
        );
    }
    assert!(read("nats/nats-server-cluster.conf").contains("cluster {"));
    assert!(read("nats/README.md").contains("sync_interval"));
    let Some(version) = nats_server_version() else {
        eprintln!("nats-server is not installed; only the text was checked");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for file in ["nats/nats-server.conf", "nats/nats-server-cluster.conf"] {
        let mut text = read(file);
        if version < (2, 10) {
            // 2.9 has no sync_interval (the files say so).
            text = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("sync_interval"))
                .map(|l| format!("{l}\n"))
                .collect();
        }
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new("nats-server")
            .arg("-t")
            .arg("-c")
            .arg(&path)
            .env("NATS_SERVER_NAME", "nats-1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: nats-server -t: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// --- Kubernetes ------------------------------------------------------------------

/// The Kubernetes config with the Secret's variables applied, as a pod sees it.
fn kubernetes_config() -> (Config, BTreeMap<String, String>) {
    let secret = yaml("kubernetes/secret.yaml");
    let env: BTreeMap<String, String> = secret["stringData"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    let text = read("kubernetes/config.toml");
    let config = Config::from_toml_str_with_env(&text, env.clone())
        .unwrap_or_else(|e| panic!("kubernetes/config.toml with the Secret's variables: {e}"));
    (config, env)
}

fn container(deployment: &Json) -> &Json {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1);
    &containers[0]
}

#[test]
fn kubernetes_manifests_have_probes_resources_grace_and_wiring() {
    let (config, secret_env) = kubernetes_config();
    let deployment = yaml("kubernetes/deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let c = container(&deployment);
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        &deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        &pod_labels["app.kubernetes.io/name"]
    );

    // Probes on the metrics port, which is prometheus_listen_addr's.
    let port = config.prometheus_listen_addr.expect("metrics listener");
    assert!(
        port.ip().is_unspecified(),
        "probes need 0.0.0.0, not {port}"
    );
    let ports = c["ports"].as_array().unwrap();
    let metrics_port = ports.iter().find(|p| p["name"] == "metrics").unwrap();
    assert_eq!(
        int_at(metrics_port, "/containerPort"),
        i64::from(port.port())
    );
    for (probe, path) in [
        ("livenessProbe", "/health/live"),
        ("readinessProbe", "/health/ready"),
    ] {
        assert_eq!(str_at(&c[probe], "/httpGet/path"), path, "{probe}");
        assert_eq!(str_at(&c[probe], "/httpGet/port"), "metrics", "{probe}");
    }

    // Resources.
    for key in ["/requests/cpu", "/requests/memory", "/limits/memory"] {
        str_at(&c["resources"], key);
    }

    // Termination grace longer than the shutdown grace period.
    let grace = int_at(pod, "/terminationGracePeriodSeconds");
    assert!(
        grace as u64 > config.graceful_stop_timeout.as_secs(),
        "terminationGracePeriodSeconds {grace} must exceed graceful_stop_timeout {:?}",
        config.graceful_stop_timeout
    );

    // Service links would add GITALY_REPLICATOR_* variables the config rejects.
    assert_eq!(pod["enableServiceLinks"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);

    // The config file is the ConfigMap kustomize generates from config.toml
    // (named with a hash of its content, so a change rolls the pods),
    // mounted where GITALY_REPLICATOR_CONFIG says.
    let kustomization = yaml("kubernetes/kustomization.yaml");
    let generator = kustomization["configMapGenerator"]
        .as_array()
        .expect("a configMapGenerator")
        .iter()
        .find(|g| {
            g["files"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "config.toml"))
        })
        .expect("a ConfigMap generated from config.toml");
    assert!(
        generator["options"]["disableNameSuffixHash"] != true,
        "the ConfigMap's name must change with its content"
    );
    let configmap_name = str_at(generator, "/name");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == configmap_name)
        .expect("a volume from the ConfigMap");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the ConfigMap is mounted");
    let env_config = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "GITALY_REPLICATOR_CONFIG")
        .expect("GITALY_REPLICATOR_CONFIG");
    assert_eq!(
        str_at(env_config, "/value"),
        format!("{}/config.toml", str_at(mount, "/mountPath"))
    );

    // Secrets reach the config through GITALY_REPLICATOR_* variables: all of
    // them are needed, none is unknown (checked by the parse above).
    let secret = yaml("kubernetes/secret.yaml");
    let secret_name = str_at(&secret, "/metadata/name");
    assert!(
        c["envFrom"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["secretRef"]["name"] == secret_name),
        "the Secret is not wired into the container"
    );
    assert!(secret_env.contains_key("GITALY_REPLICATOR_DATABASE__PASSWORD"));
    for (vs, node) in config.targets() {
        let var = node_token_env_var(&vs.name, &node.storage);
        assert!(secret_env.contains_key(&var), "the Secret lacks {var}");
    }
    let in_config_map = Config::from_toml_str(&read("kubernetes/config.toml")).unwrap();
    assert!(
        in_config_map
            .targets()
            .all(|(_, node)| node.token.is_empty()),
        "the config holds tokens itself; they belong in the Secret"
    );

    // Service for metrics.
    let service = yaml("kubernetes/service.yaml");
    assert_eq!(
        &service["spec"]["selector"]["app.kubernetes.io/name"],
        &pod_labels["app.kubernetes.io/name"]
    );
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(str_at(service_port, "/targetPort"), "metrics");
    assert_eq!(int_at(service_port, "/port"), i64::from(port.port()));

    // PodDisruptionBudget.
    let pdb = yaml("kubernetes/pdb.yaml");
    assert_eq!(str_at(&pdb, "/apiVersion"), "policy/v1");
    assert_eq!(str_at(&pdb, "/kind"), "PodDisruptionBudget");
    assert_eq!(
        &pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        &pod_labels["app.kubernetes.io/name"]
    );
    assert!(pdb["spec"]["maxUnavailable"].is_number() || pdb["spec"]["minAvailable"].is_number());

    // kustomization lists every manifest.
    let listed: BTreeSet<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let mut manifests = BTreeSet::new();
    for entry in std::fs::read_dir(deploy_path("kubernetes")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            manifests.insert(name);
        }
    }
    assert_eq!(
        listed,
        manifests
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
    );
}

#[test]
fn keda_has_one_nats_jetstream_trigger_per_consumer_and_is_current() {
    let (config, _) = kubernetes_config();
    let layout = Layout::from_config(&config);
    let committed = read("kubernetes/scaledobject.yaml");
    assert_eq!(
        committed,
        manifests::scaled_object(&layout, &ScalingOptions::for_config(&config)),
        "scaledobject.yaml is stale: run deploy/regenerate.sh"
    );

    let scaled = yaml("kubernetes/scaledobject.yaml");
    let deployment = yaml("kubernetes/deployment.yaml");
    assert_eq!(str_at(&scaled, "/apiVersion"), "keda.sh/v1alpha1");
    assert_eq!(str_at(&scaled, "/kind"), "ScaledObject");
    assert_eq!(
        str_at(&scaled, "/spec/scaleTargetRef/name"),
        str_at(&deployment, "/metadata/name")
    );
    assert_eq!(str_at(&scaled, "/spec/scaleTargetRef/kind"), "Deployment");
    assert_eq!(int_at(&scaled, "/spec/minReplicaCount"), 1);
    assert!(int_at(&scaled, "/spec/maxReplicaCount") > 1);
    assert!(
        deployment["spec"]["replicas"].is_null(),
        "KEDA owns the replica count"
    );

    let triggers = scaled["spec"]["triggers"].as_array().unwrap();
    assert_eq!(triggers.len(), config.targets().count());
    let mut consumers = BTreeSet::new();
    let nats_host = config.nats.servers().next().unwrap();
    for t in triggers {
        assert_eq!(str_at(t, "/type"), "nats-jetstream");
        let m = &t["metadata"];
        let endpoint = str_at(m, "/natsServerMonitoringEndpoint");
        let host = endpoint.rsplit_once(':').unwrap().0;
        assert!(nats_host.contains(host), "{endpoint} is not {nats_host}");
        assert_eq!(str_at(m, "/account"), "$G");
        assert_eq!(str_at(m, "/stream"), layout.stream);
        str_at(m, "/lagThreshold").parse::<u64>().unwrap();
        consumers.insert(str_at(m, "/consumer").to_owned());
    }
    let durables: BTreeSet<String> = layout
        .consumers
        .iter()
        .map(|c| c.durable_name.clone())
        .collect();
    assert_eq!(consumers, durables, "one trigger per durable consumer");
}

fn run_deploy_manifests(config: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gitaly-replicator"));
    for (k, _) in std::env::vars() {
        if k.starts_with("GITALY_REPLICATOR_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .arg("--config")
        .arg(config)
        .arg("deploy-manifests")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy-manifests {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_deploy_manifests_command_reproduces_the_committed_files_without_secrets() {
    let out = run_deploy_manifests(&deploy_path("kubernetes/config.toml"), &[]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        read("kubernetes/scaledobject.yaml")
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("consumer.OLD.gone.json"), "{}").unwrap();
    let out_dir = dir.path().to_str().unwrap();
    run_deploy_manifests(
        &root().join("config.example.toml"),
        &["--nats", "--output", out_dir],
    );
    let written: BTreeMap<String, String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        written,
        committed_jetstream_files(),
        "stale consumers are removed"
    );
}

// --- compose, Docker, systemd ------------------------------------------------------

/// `${NAME:-default}` → default, as compose does with NAME unset.
fn compose_defaults(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap() + start;
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map_or("", |(_, d)| d));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn env_of(service: &Json) -> BTreeMap<String, String> {
    service["environment"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let v = v
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string());
            (k.clone(), compose_defaults(&v))
        })
        .collect()
}

fn duration_secs(s: &str) -> u64 {
    humantime::parse_duration(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .as_secs()
}

#[test]
fn compose_runs_the_demo_with_a_config_the_service_accepts() {
    let compose = yaml("docker/compose.yaml");
    let services = &compose["services"];
    for name in [
        "nats",
        "postgres",
        "gitaly-1",
        "gitaly-2",
        "gitaly-3",
        "replicator",
        "prometheus",
    ] {
        assert!(services[name].is_object(), "service {name} is missing");
    }
    for i in 1..=3 {
        let node = &services[format!("gitaly-{i}")];
        let command: Vec<&str> = node["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(command[0], "storage-node");
        assert!(command.contains(&format!("gitaly-{i}=/var/opt/gitaly/gitaly-{i}").as_str()));
    }

    // The replicator's mounted config, with compose's variables, is valid;
    // its node tokens match the storage nodes'.
    let replicator = &services["replicator"];
    let env = env_of(replicator);
    let config = Config::from_toml_str_with_env(&read("docker/config.toml"), env.clone())
        .unwrap_or_else(|e| panic!("docker/config.toml with compose's environment: {e}"));
    assert_eq!(config.targets().count(), 3);
    for (i, (vs, node)) in config.targets().enumerate() {
        let node_env = env_of(&services[&node.storage]);
        assert_eq!(
            env[&node_token_env_var(&vs.name, &node.storage)],
            node_env["STORAGE_NODE_TOKEN"],
            "token of node {}",
            i + 1
        );
    }
    assert!(
        duration_secs(str_at(replicator, "/stop_grace_period"))
            > config.graceful_stop_timeout.as_secs()
    );
    let mounts: Vec<&str> = replicator["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(mounts.contains(&"./config.toml:/etc/gitaly-replicator/config.toml:ro"));
    assert_eq!(
        env["GITALY_REPLICATOR_CONFIG"],
        "/etc/gitaly-replicator/config.toml"
    );

    // Every file it mounts exists, and Prometheus gets the alert rules.
    for service in services.as_object().unwrap().values() {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(
                    deploy_path("docker").join(source).exists(),
                    "compose mounts {source}, which does not exist"
                );
            }
        }
    }
    let prometheus_mounts = services["prometheus"]["volumes"].to_string();
    assert!(prometheus_mounts.contains("../prometheus/gitaly-replicator.rules.yml"));
    let scrape = yaml("docker/prometheus.yml");
    assert!(
        scrape["scrape_configs"][0]["dns_sd_configs"][0]["port"].as_i64()
            == Some(i64::from(config.prometheus_listen_addr.unwrap().port()))
    );
}

/// The runtime stage of a multi-stage Dockerfile, checked for what every
/// image of ours has: a slim Debian, and a user other than root.
fn runtime_stage(dockerfile: &str) -> &str {
    let stages: Vec<&str> = dockerfile.split("\nFROM ").collect();
    assert!(stages.len() >= 3, "a multi-stage build");
    let runtime = stages.last().unwrap();
    assert!(runtime.starts_with("debian:") && runtime.contains("slim"));
    let user = runtime
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER in the runtime stage");
    let uid = user.split(':').next().unwrap().trim();
    assert!(uid != "root" && uid != "0", "runs as root");
    runtime
}

/// The binaries the runtime stage copies in from the build.
fn copied_binaries(runtime: &str) -> BTreeSet<&str> {
    runtime
        .lines()
        .filter(|l| l.starts_with("COPY --from="))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.strip_prefix("/out/"))
        .collect()
}

#[test]
fn the_production_image_holds_the_service_alone_without_git_or_the_storage_node() {
    let dockerfile = read("docker/Dockerfile");
    // The image ships the build the benchmark measures: the production
    // profile, optimised as one unit.
    assert!(dockerfile.contains(
        "cargo build --profile production --locked -p gitaly-replicator --bin gitaly-replicator"
    ));
    let manifest: toml::Table = toml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap(),
    )
    .unwrap();
    for profile in ["production", "bench"] {
        let settings = &manifest["profile"][profile];
        assert_eq!(settings["lto"].as_str(), Some("fat"), "profile {profile}");
        assert_eq!(
            settings["codegen-units"].as_integer(),
            Some(1),
            "profile {profile}"
        );
    }
    let runtime = runtime_stage(&dockerfile);
    assert_eq!(
        copied_binaries(runtime),
        BTreeSet::from(["gitaly-replicator"])
    );
    let installs: String = runtime
        .lines()
        .filter(|l| l.contains("apt-get install"))
        .collect();
    assert!(!installs.contains("git"), "the service image installs git");
    assert!(
        runtime.contains("CMD [\"gitaly-replicator\", \"run\"]"),
        "the image runs the service"
    );
}

#[test]
fn the_demo_image_adds_the_storage_node_the_demo_and_git() {
    let dockerfile = read("docker/Dockerfile.demo");
    let runtime = runtime_stage(&dockerfile);
    assert_eq!(
        copied_binaries(runtime),
        BTreeSet::from([
            "gitaly-replicator",
            "gitaly-replicator-demo",
            "storage-node"
        ])
    );
    assert!(runtime.contains("git"), "storage-node needs git");
    // compose runs the storage nodes and the job script from it, the
    // replicator from the production image.
    let compose = yaml("docker/compose.yaml");
    let dockerfile_of =
        |service: &str| str_at(&compose["services"][service], "/build/dockerfile").to_owned();
    for service in ["gitaly-1", "gitaly-2", "gitaly-3", "demo-jobs"] {
        assert_eq!(
            dockerfile_of(service),
            "deploy/docker/Dockerfile.demo",
            "{service}"
        );
    }
    assert_eq!(dockerfile_of("replicator"), "deploy/docker/Dockerfile");
}

fn unit_keys(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_owned();
            continue;
        }
        let (k, v) = line.split_once('=').unwrap();
        keys.entry(format!("{section}{k}"))
            .or_default()
            .push(v.to_owned());
    }
    keys
}

#[test]
fn systemd_unit_is_sandboxed_and_outlasts_the_shutdown_grace() {
    let unit = unit_keys(&read("systemd/gitaly-replicator.service"));
    let one = |key: &str| -> &str {
        let values = unit
            .get(&format!("[Service]{key}"))
            .unwrap_or_else(|| panic!("[Service] {key} is missing"));
        values.last().unwrap()
    };
    assert!(
        one("DynamicUser") == "yes" || unit.contains_key("[Service]User"),
        "a dynamic or dedicated user"
    );
    for (key, value) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    assert!(one("RestrictAddressFamilies").contains("AF_INET"));
    assert!(one("EnvironmentFile").starts_with("/etc/gitaly-replicator/"));
    assert!(one("ExecStart").ends_with(" run"));
    assert_eq!(
        one("RestartPreventExitStatus"),
        "64",
        "bad config: no restart loop"
    );
    assert!(
        duration_secs(one("TimeoutStopSec")) > Config::default().graceful_stop_timeout.as_secs(),
        "TimeoutStopSec must exceed graceful_stop_timeout"
    );
    // The example environment file names real keys.
    let env: Vec<(String, String)> = read("systemd/gitaly-replicator.env.example")
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let example = std::fs::read_to_string(root().join("config.example.toml")).unwrap();
    Config::from_toml_str_with_env(&example, env).unwrap();
}
