//! The fault suite: the service as it runs in production (consumer
//! processes, NATS JetStream, Postgres, git-backed storage nodes), all
//! private to the test, under a writer that keeps committing and publishing
//! while faults come at random: consumers SIGKILLed at least every 2 s, the
//! broker restarted, Postgres restarted, a target killed and restarted, a
//! target answering UNAVAILABLE for a while. At the end every replica must
//! be what the last job for it asked, on disk and in Postgres, with nothing
//! left in the queue and only the expected dead letters.
//!
//! `cargo test --release chaos` runs the short mode (40 s of faults, about a
//! minute in all) twice: on one nats-server, and on a 3-node NATS cluster
//! where the broker fault kills a node and starts it again;
//! `CHAOS_SECONDS=600` is the long mode of both.
//! `CHAOS_SEED` replays a run's random choices (the printed seed); timing
//! still differs from run to run. `CHAOS_TLS=1` runs it with every storage
//! node serving TLS, verified against a CA made for the run.

use crate::common::chaos::broker::Broker;
use crate::common::chaos::check::Checker;
use crate::common::chaos::faults::{Fault, Injector, kill_consumers};
use crate::common::chaos::fleet::Fleet;
use crate::common::chaos::model::{DIR, Expected, Model, SOURCE, STORAGES};
use crate::common::chaos::settings::Settings;
use crate::common::chaos::summary::Summary;
use crate::common::chaos::writer::Writer;
use crate::common::cluster::{NodeSpec, TestNames, config_toml};
use crate::common::storage_nodes::NodeProcess;
use gitaly_replicator::{Config, Layout, RepositoryStore};
use sqlx::postgres::PgPoolOptions;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use testkit::postgres_server::PrivatePostgres;
use testkit::tls::TestCa;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Consumer processes on the one config.
const CONSUMERS: usize = 3;
/// Latency of each storage node's calls: gitaly-1 (the source), 2 and 3.
const LATENCIES: [&str; 3] = ["10ms", "20ms", "40ms"];
/// How long the service may take to settle everything once the faults stop.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// ack_wait of the run: a killed consumer's jobs come back within it.
const ACK_WAIT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_with_one_nats_server_every_replica_ends_as_its_last_job_asked() {
    run(Settings::from_env(), Broker::single().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_with_a_three_node_nats_cluster_every_replica_ends_as_its_last_job_asked() {
    run(Settings::from_env(), Broker::cluster().await).await;
}

/// The config of the consumers. Attempts are many because here, with a
/// consumer killed every second or so, most failed deliveries are kills,
/// not the job's fault: a job that loses its few deliveries to kills would
/// be dead-lettered, which production's rare crashes never cause. The lock
/// lease is short (5 s, not 30 s), so that the repositories of a killed
/// consumer, and all of them after a Postgres restart, are granted again
/// within the run: leases run out, and peers end sessions, many times.
fn consumer_toml(
    names: &TestNames,
    nodes: &[NodeProcess],
    database: &str,
    broker: &Broker,
) -> String {
    let specs: Vec<NodeSpec> = nodes
        .iter()
        .map(|n| NodeSpec {
            storage: n.storage.clone(),
            address: n.address(),
            token: n.token.clone(),
        })
        .collect();
    let toml = config_toml(names, &specs, database, &broker.url())
        .replace(
            "ack_wait = \"5s\"",
            &format!("ack_wait = \"{}s\"", ACK_WAIT.as_secs()),
        )
        .replacen(
            "\n[replication]\n",
            "max_connections = 4\n\n[replication]\nattempts = 15\nlock_lease = \"5s\"\n",
            1,
        );
    toml.replacen(
        "\n[nats]\n",
        &format!("\n[nats]\nreplicas = {}\n", broker.replicas()),
        1,
    )
}

async fn run(settings: Settings, broker: Broker) {
    let started = Instant::now();
    show(&format!(
        "chaos: seed {} (replay with CHAOS_SEED={}), {} mode, {} s of faults on {}, storage nodes over {}",
        settings.seed,
        settings.seed,
        settings.mode(),
        settings.chaos.as_secs(),
        broker.describe(),
        settings.transport()
    ));
    let postgres = tokio::task::block_in_place(PrivatePostgres::start);
    // Short waits for a connection: the writer retries through outages.
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&postgres.url())
        .await
        .unwrap();
    let store = RepositoryStore::new(pool.clone());
    store.migrate().await.unwrap();

    let names = TestNames::new();
    let storages = tempfile::tempdir().unwrap();
    // Over TLS, the consumers and the targets (which fetch from the
    // source) trust the run's CA by SSL_CERT_FILE, as Gitaly's clients do.
    let ca = settings.tls.then(|| TestCa::new("chaos-ca"));
    let leaf = ca.as_ref().map(|ca| ca.leaf("node", &["127.0.0.1"]));
    let env: Vec<(String, String)> = ca
        .iter()
        .map(|ca| {
            (
                gitaly_replicator::SSL_CERT_FILE.to_owned(),
                ca.cert_file.display().to_string(),
            )
        })
        .collect();
    let mut nodes = Vec::new();
    let mut flags = Vec::new();
    for (i, storage) in STORAGES.iter().enumerate() {
        let mut f = vec!["--latency".to_owned(), LATENCIES[i].to_owned()];
        f.extend(leaf.iter().flat_map(|l| l.node_flags()));
        let token = format!("token-{i}-{}", names.id);
        let dir = storages.path().join(storage);
        nodes.push(
            NodeProcess::spawn_with_env(storage, &dir, &token, "127.0.0.1:0", &f, &env).await,
        );
        flags.push(f);
    }
    let toml = consumer_toml(&names, &nodes, &postgres.url(), &broker);
    assert_eq!(
        toml.matches("address = \"tls://").count(),
        if settings.tls { STORAGES.len() } else { 0 },
        "{toml}"
    );
    let layout = Layout::from_config(&Config::from_toml_str(&toml).unwrap());
    let js = async_nats::jetstream::new(broker.client().await);
    layout.ensure(&js).await.unwrap();
    let dirs: BTreeMap<String, _> = nodes
        .iter()
        .map(|n| (n.storage.clone(), n.dir.clone()))
        .collect();

    let log_path = std::env::temp_dir().join(format!("chaos-{}-consumers.log", names.id));
    let fleet = Arc::new(Mutex::new(Fleet::start(&toml, env, CONSUMERS, log_path)));
    let mut writer = Writer::new(
        settings.rng(1),
        store.clone(),
        js.clone(),
        &layout.subject_prefix,
        &names.virtual_storage,
        dirs[SOURCE].clone(),
        Instant::now() + settings.chaos * 2 / 5,
    );
    writer.seed().await;

    // The chaos: the writer, the consumer kills and the other faults at once.
    let until = Instant::now() + settings.chaos;
    let injector = Injector {
        broker,
        postgres,
        targets: nodes.split_off(1),
        flags: flags.split_off(1),
        fleet: fleet.clone(),
        rng: settings.rng(2),
        injected: Vec::new(),
        healed: Instant::now(),
    };
    let writing = tokio::spawn(writer.run(until));
    let killing = tokio::spawn(kill_consumers(fleet.clone(), settings.rng(3), until));
    let injector = injector.run(until).await;
    let last_kill = killing.await.unwrap();
    let mut writer = writing.await.unwrap();
    let last_fault = injector.healed.max(last_kill);

    // The source's renames still outstanding, and the updates after them.
    let renamed = writer.finish_renames(Duration::from_secs(60)).await;
    let checker = Checker {
        js: js.clone(),
        layout: layout.clone(),
        pool: pool.clone(),
        virtual_storage: names.virtual_storage.clone(),
        dirs,
    };
    let converged_at = converge(&checker, &writer.model).await;

    // Once more after a redelivery could have come: still as asked, and
    // thoroughly (every live replica has all its objects).
    tokio::time::sleep(ACK_WAIT + Duration::from_secs(1)).await;
    let mut problems = checker.queue_problems().await;
    let (replica_problems, replicas) = checker.replica_problems(&writer.model, true).await;
    problems.extend(replica_problems);
    let (dead_problems, dead_letters, dead_repeated) =
        checker.dead_letter_problems(&writer.model.poison).await;
    problems.extend(dead_problems);
    if !renamed {
        problems.push("a rename never took effect on the source".into());
    }

    let mut fleet = fleet.lock().await;
    let tails = fleet.tails(40);
    fleet.stop().await;
    let evidence = &fleet.evidence;
    let expected = writer.model.expected();
    let targets_killed: Vec<_> = injector
        .injected
        .iter()
        .filter(|i| i.fault == Fault::TargetKill)
        .collect();
    let summary = Summary {
        seed: settings.seed,
        mode: settings.mode(),
        broker: injector.broker.describe(),
        chaos: settings.chaos,
        jobs: writer.model.jobs_by_change(),
        poison: writer.model.poison.len(),
        dead_repeated,
        consumer_kills: fleet.kills.len(),
        longest_kill_gap: fleet.longest_gap(),
        killed_mid_call: targets_killed
            .iter()
            .filter(|i| evidence.failed_across(i.target.as_deref().unwrap_or_default(), i.at))
            .count(),
        started_while_broker_down: evidence
            .incarnations
            .iter()
            .filter(|i| i.began_in_outage)
            .count(),
        shielded: evidence.incarnations.iter().filter(|i| i.shielded).count(),
        shielded_connected: evidence
            .incarnations
            .iter()
            .filter(|i| i.shielded && i.reached_nats)
            .count(),
        live_paths: expected
            .values()
            .filter(|e| matches!(e, Expected::Live { .. }))
            .count(),
        gone_paths: expected.values().filter(|e| **e == Expected::Gone).count(),
        replicas_converged: replicas,
        executed_twice: evidence.executed_twice(),
        completed_twice: evidence.completed_twice(),
        outcomes: evidence.outcomes_by_state(),
        leftovers: evidence.leftovers,
        dead_letters,
        converged_after: converged_at.map(|at| at.saturating_duration_since(last_fault)),
        wall: started.elapsed(),
        injected: injector.injected.clone(),
    };
    show(&summary.to_string());

    // The run did what it claims to.
    for fault in [
        Fault::PostgresRestart,
        Fault::TargetKill,
        Fault::TargetUnavailable,
    ] {
        if summary.count(fault) == 0 {
            problems.push(format!("no {fault:?} in the run"));
        }
    }
    if summary.count(Fault::BrokerRestart) + summary.count(Fault::BrokerNodeRestart) == 0 {
        problems.push("no broker restart in the run".into());
    }
    // At most 2 s apart, give or take the time a kill and a start take.
    if summary.longest_kill_gap > Duration::from_millis(2500) {
        problems.push(format!(
            "consumers went {:?} without a kill",
            summary.longest_kill_gap
        ));
    }
    if summary.shielded_connected < summary.shielded {
        problems.push(format!(
            "{} of the consumers started while the broker was down never reached it",
            summary.shielded - summary.shielded_connected
        ));
    }
    let keep_logs = std::env::var_os("CHAOS_KEEP_LOGS").is_some();
    if keep_logs {
        show(&format!(
            "chaos: consumer logs in {}",
            fleet.log_path.display()
        ));
    }
    if problems.is_empty() {
        if !keep_logs {
            let _ = std::fs::remove_file(&fleet.log_path);
        }
    } else {
        let faults: Vec<String> = summary
            .injected
            .iter()
            .map(|i| {
                format!(
                    "  {} {:?} {}",
                    i.at,
                    i.fault,
                    i.target.as_deref().unwrap_or("")
                )
            })
            .collect();
        panic!(
            "{} problems (seed {}; every consumer's log in {}):\n{}\n\nfaults:\n{}\n\n{}\n{tails}",
            problems.len(),
            settings.seed,
            fleet.log_path.display(),
            problems
                .iter()
                .take(60)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            faults.join("\n"),
            histories(&problems, &writer.model, evidence)
        );
    }
}

/// Writes to stderr past the test harness's capture: the seed and the
/// summary belong in every run's output, passing or not.
fn show(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Polls until nothing is left in the queue, the dead letters are the
/// poison jobs and every replica is as its last job asked; returns when.
async fn converge(checker: &Checker, model: &Model) -> Option<Instant> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    while Instant::now() < deadline {
        if checker.queue_problems().await.is_empty() {
            let (dead, _, _) = checker.dead_letter_problems(&model.poison).await;
            // A dead letter that should not be there never goes away.
            if dead.iter().any(|p| p.starts_with("unexpected")) {
                return None;
            }
            let (replicas, _) = checker.replica_problems(model, false).await;
            if dead.is_empty() && replicas.is_empty() {
                return Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

/// The jobs of each path a problem names, with what the logs say of each.
fn histories(
    problems: &[String],
    model: &Model,
    evidence: &crate::common::chaos::evidence::Evidence,
) -> String {
    let mut paths: Vec<&str> = problems
        .iter()
        .filter_map(|p| p.split_whitespace().next())
        .filter(|p| p.starts_with(DIR))
        .map(|p| p.trim_end_matches(':'))
        .collect();
    paths.sort_unstable();
    paths.dedup();
    let mut out = String::new();
    for path in paths.iter().take(10) {
        out += &format!("jobs of {path}:\n");
        for job in model.history(path) {
            out += &format!(
                "  seq {} {} {} on {}{}: {}\n",
                job.sequence,
                job.correlation_id,
                job.change,
                job.target,
                job.new_path
                    .as_deref()
                    .map(|n| format!(" to {n}"))
                    .unwrap_or_default(),
                evidence.lines_of(&job.correlation_id).join(", ")
            );
        }
    }
    out
}
