//! `cargo bench --bench pipeline [-- --quick] [--only raw,maintenance,...] [--jobs N]`
//!
//! Measures the replication pipeline against JetStream's own limit, measured
//! in the same run: raw pull+ack, maintenance and update jobs through the
//! real consumer (beside the ceiling of one gRPC call per job with nothing
//! else running), publish→dispatch latency at a steady rate, drain rate over
//! growing backlogs with the consumer's peak memory, and scale-out to two
//! processes, and a fleet of four that loses one to SIGKILL or SIGSTOP;
//! Praefect's own replication queue, emulated on the same Postgres and
//! target, drained to the end beside ours on backlogs of four shapes and
//! against targets that answer after 5 and 50 ms; Praefect's queue captured and
//! published while its Enqueue inserts; and the reconciler's round over
//! a store of 100,000 repositories. Prints one table and writes it
//! as JSON under `target/bench/`.

mod capture;
mod env;
mod praefect;
mod scenarios;
mod shapes;

use serde_json::json;
use std::time::Instant;

/// One line of the result table.
pub struct Row {
    pub scenario: &'static str,
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
    /// Human-readable target and whether it was met.
    pub target: Option<(String, bool)>,
}

pub struct Sizes {
    pub quick: bool,
    pub jobs: usize,
    pub latency_secs: u64,
    pub backlogs: Vec<usize>,
    pub scale_out_jobs: usize,
    /// The backlog of each shape in the praefect scenario, drained to the
    /// end by Praefect's emulation and by the consumer.
    pub praefect_jobs: usize,
    /// Stale lock rows in Praefect's table for that shape.
    pub stale_locks: usize,
    /// How long one drain of Praefect's queue may run before the rest of it
    /// is extrapolated.
    pub praefect_cap: std::time::Duration,
    /// The update backlog drained against slow targets (5 ms, 50 ms).
    pub call_time_jobs: usize,
    /// Jobs published into Praefect's idle queue in the latency scenario.
    pub idle_probes: usize,
    /// Repositories in the store of the reconcile scenario.
    pub reconcile_repositories: usize,
    /// Events Praefect's Enqueue inserts flat out in the capture scenario.
    pub capture_events: usize,
}

const USAGE: &str =
    "cargo bench --bench pipeline [-- --quick] [--only raw,maintenance,...] [--jobs N]";

/// What `--only` accepts.
const SCENARIOS: &[&str] = &[
    "raw",
    "grpc",
    "bound",
    "maintenance",
    "update",
    "praefect",
    "capture",
    "latency",
    "backlog",
    "reconcile",
    "scale-out",
    "fleet",
];

/// Why the arguments are not understood, if they are not. `--bench` is
/// cargo's own, passed to every bench.
fn unknown_argument(args: &[String]) -> Option<String> {
    let mut rest = args.iter().skip(1);
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--quick" | "--bench" | "--help" | "-h" => {}
            "--jobs" => {
                if rest.next().is_none() {
                    return Some("--jobs needs a number of jobs".into());
                }
            }
            "--only" => {
                let Some(list) = rest.next() else {
                    return Some("--only needs a list of scenarios".into());
                };
                if let Some(bad) = list.split(',').find(|n| !SCENARIOS.contains(n)) {
                    return Some(format!(
                        "unknown scenario {bad:?}; the scenarios are {}",
                        SCENARIOS.join(",")
                    ));
                }
            }
            other => return Some(format!("unknown argument {other:?}")),
        }
    }
    None
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(message) = unknown_argument(&args) {
        // A mistyped flag would otherwise start a full run of many minutes.
        eprintln!("error: {message}\nusage: {USAGE}");
        std::process::exit(2);
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: {USAGE}\nscenarios: {}", SCENARIOS.join(","));
        return Ok(());
    }
    let quick = args.iter().any(|a| a == "--quick");
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(str::to_owned).collect());
    let jobs_override: Option<usize> = args
        .iter()
        .position(|a| a == "--jobs")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse())
        .transpose()
        .map_err(|e| anyhow::anyhow!("--jobs: {e}"))?;
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let sizes = if quick {
        Sizes {
            quick,
            jobs: 2_000,
            latency_secs: 2,
            backlogs: vec![1_000, 5_000],
            scale_out_jobs: 2_000,
            praefect_jobs: 2_000,
            stale_locks: 100_000,
            praefect_cap: std::time::Duration::from_secs(8),
            call_time_jobs: 1_000,
            idle_probes: 10,
            reconcile_repositories: 20_000,
            capture_events: 4_000,
        }
    } else {
        Sizes {
            quick,
            jobs: 50_000,
            latency_secs: 10,
            backlogs: vec![10_000, 100_000, 1_000_000],
            scale_out_jobs: 20_000,
            praefect_jobs: 10_000,
            stale_locks: 100_000,
            praefect_cap: std::time::Duration::from_secs(300),
            call_time_jobs: 10_000,
            idle_probes: 20,
            reconcile_repositories: 100_000,
            capture_events: 20_000,
        }
    };
    let sizes = Sizes {
        jobs: jobs_override.unwrap_or(sizes.jobs),
        ..sizes
    };
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut raw_rate = None;
    let mut grpc_rate = None;
    let mut maintenance_rate = None;
    let needs_bound = wanted("bound") || wanted("maintenance");
    if wanted("raw") || needs_bound {
        let r = scenarios::raw(&sizes).await?;
        raw_rate = Some(r.value);
        rows.push(r);
    }
    if wanted("grpc") || needs_bound {
        let r = scenarios::grpc_ceiling(&sizes).await?;
        grpc_rate = Some(r.value);
        rows.push(r);
    }
    // No queue can beat raw delivery plus one gRPC call per job, each
    // costing what it costs alone.
    let bound = raw_rate
        .zip(grpc_rate)
        .map(|(raw, grpc)| 1.0 / (1.0 / raw + 1.0 / grpc));
    if let Some(b) = bound {
        rows.push(Row {
            scenario: "bound",
            metric: "1 / (1/raw + 1/grpc)".into(),
            value: b,
            unit: "jobs/s",
            target: None,
        });
    }
    if wanted("maintenance") {
        let (r, rate) = scenarios::maintenance(&sizes, raw_rate, bound).await?;
        maintenance_rate = Some(rate);
        rows.extend(r);
    }
    if wanted("update") {
        rows.extend(scenarios::update(&sizes, maintenance_rate).await?);
    }
    if wanted("praefect") {
        rows.extend(scenarios::praefect(&sizes).await?);
    }
    if wanted("capture") {
        rows.extend(capture::capture(&sizes).await?);
    }
    if wanted("latency") {
        rows.extend(scenarios::latency(&sizes).await?);
    }
    if wanted("backlog") {
        rows.extend(scenarios::backlog(&sizes).await?);
    }
    if wanted("reconcile") {
        rows.extend(scenarios::reconcile(&sizes).await?);
    }
    if wanted("scale-out") {
        rows.extend(scenarios::scale_out(&sizes).await?);
    }
    if wanted("fleet") {
        rows.extend(scenarios::fleet(&sizes).await?);
    }
    print_table(&rows, &sizes, started.elapsed().as_secs_f64());
    write_json(&rows, &sizes)?;
    Ok(())
}

fn print_table(rows: &[Row], sizes: &Sizes, secs: f64) {
    println!();
    println!(
        "{:<12} {:<52} {:>10} {:<7} target",
        "scenario", "metric", "value", "unit"
    );
    println!("{}", "-".repeat(100));
    for r in rows {
        let target = match &r.target {
            Some((t, true)) => format!("{t}  met"),
            Some((t, false)) => format!("{t}  NOT MET"),
            None => String::new(),
        };
        // Ratios need two decimals to be read against their targets.
        let value = if r.unit == "x" {
            format!("{:.2}", r.value)
        } else {
            format!("{:.1}", r.value)
        };
        println!(
            "{:<12} {:<52} {:>10} {:<7} {}",
            r.scenario, r.metric, value, r.unit, target
        );
    }
    println!(
        "({} run, {:.0} s; cores: {})",
        if sizes.quick { "quick" } else { "full" },
        secs,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
}

fn write_json(rows: &[Row], sizes: &Sizes) -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()),
    )
    .join("bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(if sizes.quick {
        "pipeline-quick.json"
    } else {
        "pipeline.json"
    });
    let json = json!({
        "quick": sizes.quick,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rows": rows.iter().map(|r| json!({
            "scenario": r.scenario,
            "metric": r.metric,
            "value": r.value,
            "unit": r.unit,
            "target": r.target.as_ref().map(|t| &t.0),
            "met": r.target.as_ref().map(|t| t.1),
        })).collect::<Vec<_>>(),
    });
    std::fs::write(&file, serde_json::to_string_pretty(&json)?)?;
    println!("written to {}", file.display());
    Ok(())
}
