//! What one benchmark scenario runs against: a database and stream names of
//! its own on the machine's Postgres and NATS, an in-process recording Gitaly
//! target, and the consumer as a separate `gitaly-replicator run` process.

use gitaly_replicator::Job;
use gitaly_replicator::Layout;
use gitaly_replicator::Publisher;
use gitaly_replicator::RepositoryStore;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};
use testkit::recording_gitaly::{Behaviour, RecordingGitaly, RunningGitaly};

/// The Postgres server (`host:port`) the scenarios make their databases on:
/// `BENCH_POSTGRES`, or the machine's. Another server lets a run be watched
/// with extensions the shared one does not load (`pg_stat_statements`).
fn postgres_server() -> String {
    std::env::var("BENCH_POSTGRES").unwrap_or_else(|_| "127.0.0.1:5432".into())
}

/// The URL of database `db` on the benchmark's Postgres server.
fn database_url(db: &str) -> String {
    format!("postgres://postgres@{}/{db}", postgres_server())
}

/// The database connected to for `CREATE DATABASE` and `DROP DATABASE`.
const SERVER_DB: &str = "test";
pub const NATS: &str = "nats://127.0.0.1:4222";

pub struct BenchEnv {
    pub vs: String,
    pub db_name: String,
    pub store: RepositoryStore,
    /// The source node of update jobs.
    pub source: RunningGitaly,
    pub target: RunningGitaly,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub layout: Layout,
    pub toml: String,
    dir: tempfile::TempDir,
}

pub struct EnvOptions {
    pub batch_size: usize,
    pub target_latency: Duration,
    pub max_concurrent_jobs: usize,
    pub pull_loops: usize,
}

impl BenchEnv {
    pub async fn new(o: &EnvOptions) -> anyhow::Result<BenchEnv> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let db_name = format!("gr_bench_{id}");
        let mut admin = PgConnection::connect(&database_url(SERVER_DB)).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        let db_url = database_url(&db_name);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&db_url)
            .await?;
        let store = RepositoryStore::new(pool);
        store.migrate().await?;
        let source = RecordingGitaly::new(Some("token-1")).serve().await?;
        let target = RecordingGitaly::new(Some("token-2")).serve().await?;
        for node in [&source, &target] {
            node.gitaly.set_recording(false);
        }
        if !o.target_latency.is_zero() {
            target
                .gitaly
                .respond("*", Behaviour::delay(o.target_latency));
        }
        let vs = format!("bench-{id}");
        let toml = format!(
            r#"prometheus_listen_addr = ""
graceful_stop_timeout = "5s"
[logging]
level = "warn"
[[virtual_storage]]
name = "{vs}"
[[virtual_storage.node]]
storage = "gitaly-1"
address = "{}"
token = "token-1"
[[virtual_storage.node]]
storage = "gitaly-2"
address = "{}"
token = "token-2"
[database]
url = "{db_url}"
max_connections = 16
[replication]
batch_size = {}
max_concurrent_jobs = {}
parallel_storage_processing_workers = {}
health_check_interval = "1s"
[nats]
url = "{NATS}"
subject_prefix = "b{id}.replication"
stream = "B{id}"
dead_letter_stream = "B{id}_DEAD"
consumer_prefix = "b{id}"
max_messages = -1
max_ack_pending = -1
"#,
            source.address(),
            target.address(),
            o.batch_size,
            o.max_concurrent_jobs,
            o.pull_loops,
        );
        let config = gitaly_replicator::Config::from_toml_str(&toml)?;
        let client = async_nats::ConnectOptions::new().connect(NATS).await?;
        let js = async_nats::jetstream::new(client.clone());
        let layout = Layout::from_config(&config);
        layout.ensure(&js).await?;
        Ok(BenchEnv {
            vs,
            db_name,
            store,
            source,
            target,
            client,
            js,
            layout,
            toml,
            dir: tempfile::tempdir()?,
        })
    }

    /// Milliseconds from each job's send time (by correlation id) to its
    /// call reaching the target, sorted.
    pub fn dispatch_delays_ms(&self, sent: &HashMap<String, SystemTime>) -> Vec<f64> {
        let mut delays: Vec<f64> = self
            .target
            .gitaly
            .calls()
            .iter()
            .filter_map(|c| {
                let at = sent.get(c.correlation_id.as_deref()?)?;
                c.received_wall
                    .duration_since(*at)
                    .ok()
                    .map(|d| d.as_secs_f64() * 1000.0)
            })
            .collect();
        delays.sort_by(f64::total_cmp);
        delays
    }

    pub fn db_url(&self) -> String {
        database_url(&self.db_name)
    }

    pub fn maintenance_job(&self, i: usize) -> Job {
        Job::from_value(&json!({
            "change": "optimize_repository",
            "virtual_storage": self.vs,
            "relative_path": format!("@hashed/{:02x}/{i}.git", i % 256),
            "target_node_storage": "gitaly-2",
        }))
        .expect("valid job")
    }

    pub fn update_job(&self, i: usize) -> Job {
        Job::from_value(&json!({
            "change": "update",
            "virtual_storage": self.vs,
            "relative_path": format!("@hashed/{:02x}/{i}.git", i % 256),
            "target_node_storage": "gitaly-2",
            "source_node_storage": "gitaly-1",
        }))
        .expect("valid job")
    }

    /// Publishes with up to 1,000 acks outstanding; returns jobs/s.
    pub async fn publish_all(&self, jobs: &[Job]) -> anyhow::Result<f64> {
        let publisher = Publisher::new(self.js.clone(), self.layout.clone());
        let started = Instant::now();
        for chunk in jobs.chunks(50_000) {
            for r in publisher.publish_many(chunk, 1000).await {
                r?;
            }
        }
        Ok(jobs.len() as f64 / started.elapsed().as_secs_f64())
    }

    /// Jobs not yet done, as the consumers see them (waiting plus
    /// unacknowledged), not the stream's message count: a broker killed
    /// right after acknowledgements can keep acknowledged jobs in it.
    pub async fn jobs_left(&self) -> anyhow::Result<u64> {
        let depths = gitaly_replicator::queue_depth(&self.js, &self.layout)
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(depths.iter().map(|d| d.pending + d.in_flight).sum())
    }

    /// Starts `gitaly-replicator run` on this environment's config.
    pub fn spawn_consumer(&self) -> anyhow::Result<Child> {
        self.spawn_consumer_with(&self.toml, "config.toml")
    }

    /// Starts `gitaly-replicator run` on `toml`, written to `name` in this
    /// environment's directory.
    pub fn spawn_consumer_with(&self, toml: &str, name: &str) -> anyhow::Result<Child> {
        let path: PathBuf = self.dir.path().join(name);
        std::fs::write(&path, toml)?;
        Ok(Command::new(env!("CARGO_BIN_EXE_gitaly-replicator"))
            .arg("--config")
            .arg(&path)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    }

    /// Waits until the target has seen `calls` calls and the work stream is
    /// empty; returns seconds from the first call to the end, the peak RSS in
    /// KiB of `watch` (the consumers) sampled every 50 ms, and the CPU time
    /// spent meanwhile, split by process. The call count is read every
    /// 5 ms, so the start and end are found to within that (a few seconds'
    /// drain at 50 ms would be off by a few percent).
    pub async fn drain(
        &self,
        calls: usize,
        watch: &[u32],
        timeout: Duration,
    ) -> anyhow::Result<Drained> {
        let deadline = Instant::now() + timeout;
        let counter = &self.target.gitaly;
        let start_count = counter.call_count();
        let mut first: Option<(Instant, f64, CpuSample)> = None;
        let mut peak = 0;
        let (mut peak_anon, mut file) = (0, 0);
        let mut polls: u64 = 0;
        loop {
            let n = counter.call_count() - start_count;
            if n > 0 && first.is_none() {
                first = Some((
                    Instant::now(),
                    cpu_busy_secs(),
                    CpuSample::take(watch, &self.db_name),
                ));
            }
            if polls.is_multiple_of(10) {
                for pid in watch {
                    let [hwm, anon, mapped] = status_kib(*pid, ["VmHWM:", "RssAnon:", "RssFile:"]);
                    peak = peak.max(hwm);
                    peak_anon = peak_anon.max(anon);
                    file = file.max(mapped);
                }
            }
            polls += 1;
            if n >= calls && self.jobs_left().await? == 0 {
                let (secs, cpu_secs, split) = first
                    .map(|(f, cpu, sample)| {
                        (
                            f.elapsed().as_secs_f64(),
                            cpu_busy_secs() - cpu,
                            CpuSample::take(watch, &self.db_name).since(&sample),
                        )
                    })
                    .unwrap_or_default();
                return Ok(Drained {
                    secs,
                    peak_kib: peak,
                    peak_anon_kib: peak_anon,
                    file_kib: file,
                    cpu_secs,
                    split,
                });
            }
            if Instant::now() > deadline {
                anyhow::bail!("drain timed out: {n} of {calls} calls");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn cleanup(self) {
        for s in [
            self.layout.stream.clone(),
            self.layout.dead_letter_stream.clone(),
            self.layout.advisory_stream.clone(),
        ] {
            let _ = self.js.delete_stream(s).await;
        }
        self.store.pool().close().await;
        if let Ok(mut admin) = PgConnection::connect(&database_url(SERVER_DB)).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db_name
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

/// What a drain measured.
pub struct Drained {
    /// From the first call to the last job acknowledged.
    pub secs: f64,
    /// The highest peak RSS of the watched processes.
    pub peak_kib: u64,
    /// The highest anonymous resident memory (heap, stacks) seen, sampled
    /// every 50 ms, so a shorter peak may be missed.
    pub peak_anon_kib: u64,
    /// The highest file-backed resident memory seen: the binary's code and
    /// read-only data, and the shared libraries, as far as they are mapped.
    pub file_kib: u64,
    /// CPU time the whole machine spent busy meanwhile (every process:
    /// consumer, NATS, Postgres, the bench's own target), which stolen time
    /// on a shared host does not inflate the way it does wall time.
    pub cpu_secs: f64,
    /// The same time by process.
    pub split: CpuSplit,
}

/// CPU seconds by process over an interval.
#[derive(Default, Clone, Copy)]
pub struct CpuSplit {
    /// The `gitaly-replicator run` processes watched.
    pub consumer: f64,
    /// The bench process: the recording Gitaly target and source, the
    /// drain's polling, and the Praefect emulation where it runs.
    pub bench: f64,
    pub nats: f64,
    /// Postgres backends connected to this scenario's database.
    pub postgres: f64,
    /// The machine's busy time from /proc/stat less the above: Postgres'
    /// and NATS' other processes, other work on the machine.
    pub other: f64,
}

/// Cumulative CPU time of the processes a split counts.
pub struct CpuSample {
    busy: f64,
    consumer: f64,
    bench: f64,
    nats: f64,
    /// Per backend, so one that exits between samples is not subtracted.
    postgres: HashMap<u32, f64>,
}

impl CpuSample {
    /// Reads /proc: the watched pids, this process, every `nats-server`, and
    /// the Postgres backends whose process title names `db_name`.
    pub fn take(consumers: &[u32], db_name: &str) -> CpuSample {
        let mut nats = 0.0;
        let mut postgres = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                match comm.trim_end() {
                    "nats-server" => nats += process_cpu_secs(pid),
                    "postgres" => {
                        let title =
                            std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                        if String::from_utf8_lossy(&title).contains(db_name) {
                            postgres.insert(pid, process_cpu_secs(pid));
                        }
                    }
                    _ => {}
                }
            }
        }
        CpuSample {
            busy: cpu_busy_secs(),
            consumer: consumers.iter().map(|&p| process_cpu_secs(p)).sum(),
            bench: process_cpu_secs(std::process::id()),
            nats,
            postgres,
        }
    }

    pub fn since(&self, earlier: &CpuSample) -> CpuSplit {
        let postgres = self
            .postgres
            .iter()
            .map(|(pid, t)| t - earlier.postgres.get(pid).copied().unwrap_or(0.0))
            .sum();
        let mut split = CpuSplit {
            consumer: self.consumer - earlier.consumer,
            bench: self.bench - earlier.bench,
            nats: self.nats - earlier.nats,
            postgres,
            other: 0.0,
        };
        let counted = split.consumer + split.bench + split.nats + split.postgres;
        split.other = (self.busy - earlier.busy - counted).max(0.0);
        split
    }
}

/// User plus system time of a process and all its threads (utime and stime
/// of /proc/<pid>/stat, in USER_HZ = 100 ticks); 0 where unreadable.
fn process_cpu_secs(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // The command name may hold spaces; the fields follow its ')'.
            let rest = &s[s.rfind(')')? + 1..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

/// Busy CPU time of the machine so far (user, nice, system, irq, softirq
/// from /proc/stat, in USER_HZ = 100 ticks); 0 where unreadable.
pub fn cpu_busy_secs() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("cpu "))?.to_owned();
            let ticks: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq
            let busy = [0, 1, 2, 5, 6]
                .iter()
                .filter_map(|&i| ticks.get(i))
                .sum::<u64>();
            Some(busy as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

/// Fields of /proc/<pid>/status counted in KiB, in the order of `names`
/// (`"VmHWM:"` the peak resident set, `"RssAnon:"`, `"RssFile:"` its
/// anonymous and file-backed parts now); 0 where unreadable.
fn status_kib<const N: usize>(pid: u32, names: [&str; N]) -> [u64; N] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    names.map(|name| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// Stops a consumer process with SIGTERM and waits for it.
pub fn stop(child: Child) {
    signal_and_wait(child, "TERM");
}

/// Sends `signal` (`KILL`, `TERM`) and waits for the process to end.
pub fn signal_and_wait(mut child: Child, signal: &str) {
    signal_child(&child, signal);
    let _ = child.wait();
}

/// Sends `signal` (`STOP`, `CONT`, `KILL`) to a process.
pub fn signal_child(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status();
}
