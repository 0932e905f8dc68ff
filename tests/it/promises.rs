//! What the service promises and a weaker implementation would break: a
//! pull asks for `batch_size` jobs, a job is dispatched without polling, two
//! processes share one durable's work, acknowledgements that cannot be made
//! are counted, and a start-up that fails part-way leaves nothing running.

use crate::common::cluster::Cluster;
use crate::common::http::{get, get_when_up};
use crate::common::nats_server::PrivateNats;
use crate::common::process::{ReplicatorProcess, with_ops_on_any_port};
use futures::StreamExt;
use serde_json::json;
use std::time::Duration;
use testkit::metrics::Samples;
use testkit::recording_gitaly::Behaviour;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

/// The pull requests sent for `durable` on the cluster's work stream.
async fn pull_requests(c: &Cluster, durable: &str) -> async_nats::Subscriber {
    let subject = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{durable}", c.layout.stream);
    c.client.subscribe(subject).await.unwrap()
}

fn durable(c: &Cluster, storage: &str) -> String {
    c.layout
        .consumer(c.vs(), storage)
        .unwrap()
        .durable_name
        .clone()
}

#[tokio::test]
async fn a_pull_request_asks_the_broker_for_batch_size_jobs() {
    let c = Cluster::start_with(2, |t| *t = t.replace("batch_size = 10", "batch_size = 7")).await;
    let mut requests = pull_requests(&c, &durable(&c, "gitaly-2")).await;
    c.client.flush().await.unwrap();
    let consumer = c.consumer().await;
    // The consumer renews its request every second (fetch_expires): look
    // at a few of them.
    for _ in 0..3 {
        let request = tokio::time::timeout(Duration::from_secs(10), requests.next())
            .await
            .expect("a pull request within 10 s")
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&request.payload).unwrap();
        assert_eq!(body["batch"], 7, "{body}");
    }
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_published_into_an_idle_consumer_is_dispatched_without_polling() {
    // Health probes time out at their interval; a 200 ms probe can miss under
    // a loaded test machine, and an unhealthy target's pulls wait for the
    // next probe. That gate is not what this test is about.
    let c = Cluster::start_with(2, |t| {
        *t = t.replace(
            "health_check_interval = \"200ms\"",
            "health_check_interval = \"2s\"",
        )
    })
    .await;
    let consumer = c.consumer().await;
    // Idle: the first pull requests are out and nothing has arrived.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut published = Vec::new();
    for i in 0..50 {
        let path = format!("push-{i}.git");
        let at = Instant::now();
        c.publish(&c.job(
            json!({"change": "cleanup", "relative_path": path, "target_node_storage": "gitaly-2"}),
        ))
        .await;
        published.push((path, at));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c.node(2).wait_for_calls(50, WAIT).await);
    consumer.stop().await.unwrap();
    let calls = c.node(2).calls();
    let mut delays: Vec<_> = published
        .iter()
        .map(|(path, at)| {
            let call = calls
                .iter()
                .find(|call| &call.relative_path == path)
                .unwrap_or_else(|| panic!("{path} was never dispatched"));
            (call.received_at.saturating_duration_since(*at), path)
        })
        .collect();
    delays.sort();
    // A consumer that polls every fetch_expires (1 s) would dispatch about a
    // quarter of these within 250 ms; a waiting pull request dispatches at
    // once. A test machine busy with other tests may delay a few.
    let late: Vec<_> = delays
        .iter()
        .filter(|(d, _)| *d >= Duration::from_millis(250))
        .collect();
    assert!(
        late.len() <= 5,
        "{} of 50 jobs were dispatched 250 ms or more after they were published: {late:?}",
        late.len()
    );
}

/// The completed jobs a process's /metrics reports for `vs`.
async fn completed(port: u16, vs: &str) -> f64 {
    let (status, body) = get(port, "/metrics").await;
    assert_eq!(status, 200);
    Samples::parse(&body).sum(
        "gitaly_replicator_jobs_total",
        &[("virtual_storage", vs), ("outcome", "completed")],
    )
}

#[tokio::test]
async fn two_processes_on_one_durable_each_complete_a_share_and_together_exactly_the_jobs_published()
 {
    let c = Cluster::start(2).await;
    // Slow enough that one process cannot take every job.
    c.node(2)
        .respond("*", Behaviour::delay(Duration::from_millis(20)));
    let processes: Vec<_> = (0..2)
        .map(|_| ReplicatorProcess::run(&with_ops_on_any_port(&c.toml)))
        .collect();
    let mut ports = Vec::new();
    for p in &processes {
        let port = p.ops_port().await;
        get_when_up(port, "/health/ready").await;
        ports.push(port);
    }
    let jobs: Vec<_> = (0..300)
        .map(|i| c.job(json!({"change": "optimize_repository", "relative_path": format!("share-{i}.git"), "target_node_storage": "gitaly-2"})))
        .collect();
    for r in c.publisher().publish_many(&jobs, 100).await {
        r.unwrap();
    }
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    let (a, b) = (
        completed(ports[0], c.vs()).await,
        completed(ports[1], c.vs()).await,
    );
    for p in processes {
        p.signal("TERM");
        assert_eq!(p.wait().await.0, Some(0));
    }
    assert!(
        a > 0.0 && b > 0.0,
        "one process did all the work: {a} and {b}"
    );
    assert_eq!(a + b, 300.0, "{a} + {b} jobs completed");
    assert_eq!(c.node(2).calls().len(), 300);
}

#[tokio::test]
async fn acknowledgements_made_while_the_broker_is_down_are_counted_and_no_job_is_lost() {
    let mut nats = PrivateNats::start().await;
    let c = Cluster::start_on(2, nats.url(), |_| {}).await;
    c.node(2)
        .respond("*", Behaviour::delay(Duration::from_millis(1500)));
    let process = ReplicatorProcess::run(&with_ops_on_any_port(&c.toml));
    let port = process.ops_port().await;
    get_when_up(port, "/health/ready").await;
    let paths: Vec<String> = (0..10).map(|i| format!("down-{i}.git")).collect();
    for path in &paths {
        c.publish(&c.job(
            json!({"change": "cleanup", "relative_path": path, "target_node_storage": "gitaly-2"}),
        ))
        .await;
    }
    assert!(c.node(2).wait_for_calls(10, WAIT).await);
    // The jobs are in their calls; the broker goes away before they end.
    nats.kill();
    let ack_errors = || async {
        let (_, body) = get(port, "/metrics").await;
        Samples::parse(&body).sum("gitaly_replicator_ack_errors_total", &[])
    };
    assert!(
        c.eventually(WAIT, || async { ack_errors().await > 0.0 })
            .await,
        "no acknowledgement error was counted"
    );
    nats.start_again().await;
    // Every job ends acknowledged, by its late ack or a redelivery's, as
    // the consumer sees it (nats-server 2.9 may keep an acked message in a
    // work-queue stream after a hard kill).
    c.node(2).respond("*", Behaviour::ok());
    let durable = durable(&c, "gitaly-2");
    let drained = c
        .eventually(WAIT, || async {
            let Ok(stream) = c.js.get_stream(&c.layout.stream).await else {
                return false;
            };
            match stream.consumer_info(&durable).await {
                Ok(info) => info.num_pending == 0 && info.num_ack_pending == 0,
                Err(_) => false,
            }
        })
        .await;
    let dead = c.dead_letters().await;
    process.signal("TERM");
    let (code, stderr) = process.wait().await;
    assert!(drained, "jobs left in the stream; stderr: {stderr}");
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    assert_eq!(code, Some(0));
    let calls = c.node(2).calls();
    for path in &paths {
        assert!(
            calls.iter().any(|call| &call.relative_path == path),
            "{path} lost"
        );
    }
    assert!(
        stderr.contains("acknowledgement failed"),
        "the failed acknowledgement was not logged"
    );
}

#[tokio::test]
async fn a_start_up_that_fails_part_way_leaves_nothing_running() {
    let c = Cluster::start(3).await;
    // gitaly-3's durable is taken by a consumer that cannot be made ours (a
    // push consumer): its set-up fails after gitaly-1's and gitaly-2's pull
    // loops have started.
    let third = c.layout.consumer(c.vs(), "gitaly-3").unwrap().clone();
    let stream = c.js.get_stream(&c.layout.stream).await.unwrap();
    stream.delete_consumer(&third.durable_name).await.unwrap();
    stream
        .create_consumer(async_nats::jetstream::consumer::push::Config {
            durable_name: Some(third.durable_name.clone()),
            deliver_subject: format!("{}-push", c.names.subject_prefix),
            filter_subject: third.filter_subject.clone(),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let subscribe = |stream: String| {
        let client = c.client.clone();
        async move {
            client
                .subscribe(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.>"))
                .await
                .unwrap()
        }
    };
    // Pull requests of the work stream's and the advisory stream's loops.
    let mut requests = futures::stream::select(
        subscribe(c.layout.stream.clone()).await,
        subscribe(c.layout.advisory_stream.clone()).await,
    );
    c.client.flush().await.unwrap();
    let ops = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = ops.local_addr().unwrap().port();

    let error =
        gitaly_replicator::run_with_ops_listener(c.config.clone(), ops, std::future::pending())
            .await
            .expect_err("a consumer that cannot be set up fails the start");
    assert!(error.to_string().contains(&third.durable_name), "{error}");

    // A pull loop had been asking for jobs...
    let asked = tokio::time::timeout(Duration::from_secs(1), requests.next()).await;
    assert!(matches!(asked, Ok(Some(_))), "no pull loop had started");
    // ...and now nothing does, nor serves: the ops port is closed.
    while tokio::time::timeout(Duration::from_millis(100), requests.next())
        .await
        .is_ok()
    {}
    let later = tokio::time::timeout(Duration::from_secs(3), requests.next()).await;
    assert!(later.is_err(), "a pull request went out after run returned");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "the ops port is still open"
    );
}
