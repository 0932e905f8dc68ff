//! `dataloss`: per virtual storage, the repositories whose replicas lag, as
//! a table or as JSON. Reads Postgres and JetStream only.

use gitaly_replicator::{
    Config, DatalossOptions, DatalossReport, Layout, connect_nats, dataloss_report, open_store,
};

#[derive(Debug, clap::Args)]
pub struct DatalossArgs {
    /// Only this virtual storage (default: every configured one).
    #[arg(long, value_name = "NAME")]
    virtual_storage: Option<String>,
    /// Also list repositories that are available but have assigned replicas
    /// that lag: not fully replicated, so a primary failure could lose data.
    #[arg(long)]
    partially_unavailable: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Read at most this many jobs per target from the work stream when
    /// looking for pending jobs.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    scan_limit: u64,
}

pub async fn run(config: &Config, args: DatalossArgs) -> anyhow::Result<()> {
    // A pool of one, and no migrations: the command only reads.
    let store = open_store(config, 1).await?;
    let client = connect_nats(&config.nats, "gitaly-replicator dataloss").await?;
    let js = async_nats::jetstream::new(client);
    let options = DatalossOptions {
        virtual_storage: args.virtual_storage,
        partially_unavailable: args.partially_unavailable,
        scan_limit: args.scan_limit,
    };
    let report = dataloss_report(config, &store, &js, &Layout::from_config(config), &options).await;
    store.pool().close().await;
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, args.partially_unavailable);
    }
    for t in &report.incomplete_scans {
        eprintln!(
            "gitaly-replicator: warning: read only the first {} jobs waiting for {}/{}; \
             a pending job after them shows as unknown (raise --scan-limit)",
            t.scanned, t.virtual_storage, t.storage
        );
    }
    Ok(())
}

/// One row per lagging replica (outdated or missing).
fn print_table(report: &DatalossReport, partially_unavailable: bool) {
    let mut rows = Vec::new();
    for vs in &report.virtual_storages {
        for repo in &vs.repositories {
            for s in repo.storages.iter().filter(|s| s.behind_by > 0) {
                rows.push([
                    vs.name.clone(),
                    repo.relative_path.clone(),
                    if repo.unavailable { "no" } else { "yes" }.to_owned(),
                    repo.generation.to_string(),
                    join_or_dash(&repo.latest_generation_on),
                    s.storage.clone(),
                    s.status.as_str().to_owned(),
                    s.behind_by.to_string(),
                    if s.assigned { "yes" } else { "no" }.to_owned(),
                    match s.pending_job {
                        Some(true) => format!("yes ({})", s.pending_changes.join(",")),
                        Some(false) => "no".to_owned(),
                        None => "unknown".to_owned(),
                    },
                    if s.dead_changes.is_empty() {
                        "no".to_owned()
                    } else {
                        format!("yes ({})", s.dead_changes.join(","))
                    },
                ]);
            }
        }
    }
    let header = [
        "VIRTUAL STORAGE",
        "RELATIVE PATH",
        "AVAILABLE",
        "GENERATION",
        "LATEST ON",
        "STORAGE",
        "REPLICA",
        "BEHIND",
        "ASSIGNED",
        "PENDING JOB",
        "DEAD JOB",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(&header.map(String::from));
    for row in &rows {
        line(row);
    }
    if rows.iter().any(|row| row[10] != "no") {
        eprintln!(
            "a DEAD JOB ran out of attempts (or was invalid) and runs again only when replayed: \
             see `gitaly-replicator dead list`, then `dead replay`"
        );
    }
    for vs in report
        .virtual_storages
        .iter()
        .filter(|v| v.repositories.is_empty())
    {
        // Praefect's words for a virtual storage with nothing to report.
        let all = if partially_unavailable {
            "all repositories are fully available on all assigned storages"
        } else {
            "all repositories are available"
        };
        eprintln!("virtual storage {}: {all}", vs.name);
    }
}

fn join_or_dash(names: &[String]) -> String {
    if names.is_empty() {
        "-".to_owned()
    } else {
        names.join(",")
    }
}
