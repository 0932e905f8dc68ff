//! No secret of the configuration reaches anything the binary writes: its
//! errors, its logs at every level, `check-config`, `status`, `dead list`,
//! the headers of dead letters, the metrics. Every secret is a marker of its
//! own; every command runs as a process with `RUST_LOG=trace` (every crate's
//! logs, the NATS client's and sqlx's included), on paths that work and
//! paths that fail, and every output is searched for every marker.

use crate::cli::{all, cli_with_env};
use crate::common::cluster::Cluster;
use crate::common::http::get;
use crate::common::nats_server::PrivateNats;
use crate::common::process::{ReplicatorProcess, with_ops_on_any_port};
use std::process::Output;
use std::time::Duration;

const TRACE: &[(&str, &str)] = &[("RUST_LOG", "trace")];

/// Every secret a configuration can hold, each a marker of its own.
struct Secrets {
    node_tokens: [String; 2],
    database_url_password: String,
    database_password: String,
    session_pooled_password: String,
    nats_password: String,
    nats_url_password: String,
    nats_token: String,
    wrong_nats_password: String,
    /// The contents of a credentials file (its path is no secret).
    creds_jwt: String,
    creds_seed: String,
    wrong_nats_token: String,
    /// The contents of an NKey seed file and of a client key file.
    nkey_seed: String,
    tls_key: String,
}

impl Secrets {
    fn new() -> Secrets {
        let id = uuid::Uuid::new_v4().simple().to_string();
        // Letters and digits only, so no URL encodes them into another form.
        let marker = |label: &str| format!("Marker{label}{}", &id[..10]);
        Secrets {
            node_tokens: [marker("NodeOne"), marker("NodeTwo")],
            database_url_password: marker("DbUrl"),
            database_password: marker("DbPassword"),
            session_pooled_password: marker("SessionPooled"),
            nats_password: marker("NatsPassword"),
            nats_url_password: marker("NatsUrl"),
            nats_token: marker("NatsToken"),
            wrong_nats_password: marker("NatsWrong"),
            creds_jwt: marker("CredsJwt"),
            creds_seed: format!("SU{}", marker("CredsSeed").to_uppercase()),
            wrong_nats_token: marker("NatsWrongToken"),
            nkey_seed: format!("SU{}", marker("NkeySeed").to_uppercase()),
            tls_key: marker("TlsKey"),
        }
    }

    fn all(&self) -> Vec<&str> {
        let mut all: Vec<&str> = self.node_tokens.iter().map(String::as_str).collect();
        all.extend([
            self.database_url_password.as_str(),
            &self.database_password,
            &self.session_pooled_password,
            &self.nats_password,
            &self.nats_url_password,
            &self.nats_token,
            &self.wrong_nats_password,
            &self.creds_jwt,
            &self.creds_seed,
            &self.wrong_nats_token,
            &self.nkey_seed,
            &self.tls_key,
        ]);
        all
    }
}

/// What was searched: a name and the text.
#[derive(Default)]
struct Outputs(Vec<(String, String)>);

impl Outputs {
    fn add(&mut self, what: &str, text: String) {
        self.0.push((what.to_owned(), text));
    }

    /// Runs the binary on `toml` with `args`, keeps its output, returns it.
    fn run(&mut self, what: &str, toml: &str, args: &[&str]) -> Output {
        let o = cli_with_env(toml, args, None, TRACE);
        self.add(what, all(&o));
        o
    }

    /// Every (output, marker, line) where a marker shows.
    fn leaks(&self, secrets: &Secrets) -> Vec<String> {
        let mut leaks = Vec::new();
        for (what, text) in &self.0 {
            for secret in secrets.all() {
                for line in text.lines().filter(|l| l.contains(secret)) {
                    leaks.push(format!("{what}: {secret}: {line}"));
                }
            }
        }
        leaks
    }
}

/// The line `gitaly-replicator: …` that a failed command ends with, or in
/// JSON mode (`run`'s default) the `error` of its `failed` line.
fn error_line(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr);
    let plain = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("gitaly-replicator: "))
        .map(str::to_owned);
    let json = || {
        stderr.lines().rev().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["message"] == "failed").then(|| v["error"].as_str().map(str::to_owned))?
        })
    };
    plain
        .or_else(json)
        .unwrap_or_else(|| panic!("no error line in\n{}", all(o)))
}

/// Each `: `-separated part of an error line that says something (the
/// message of one error of the chain) appears in it once.
fn assert_each_cause_once(line: &str) {
    for part in line.split(": ").filter(|p| p.len() >= 8) {
        assert_eq!(line.matches(part).count(), 1, "{part:?} repeated in {line}");
    }
}

/// The cluster's config with every secret set: node tokens, the database
/// password in the URL and as a key, Praefect's session-pooled password,
/// and `nats` in place of the cluster's `[nats] url` line.
fn config(c: &Cluster, s: &Secrets, admin_url: &str, database_url: &str, nats: &str) -> String {
    let mut with_password = url::Url::parse(database_url).unwrap();
    with_password
        .set_password(Some(&s.database_url_password))
        .unwrap();
    c.toml
        .replace(
            "token = \"token-1\"",
            &format!("token = \"{}\"", s.node_tokens[0]),
        )
        .replace(
            "token = \"token-2\"",
            &format!("token = \"{}\"", s.node_tokens[1]),
        )
        .replace(
            "graceful_stop_timeout = \"10s\"\n",
            "graceful_stop_timeout = \"10s\"\nstartup_timeout = \"1s\"\n",
        )
        .replace(
            &format!("url = \"{}\"", c.db.url),
            &format!(
                "url = \"{with_password}\"\npassword = \"{}\"\n\n[database.session_pooled]\n\
                 host = \"127.0.0.1\"\npassword = \"{}\"",
                s.database_password, s.session_pooled_password
            ),
        )
        .replace(&format!("url = \"{admin_url}\""), nats)
}

#[tokio::test]
async fn no_secret_appears_in_any_output_and_error_chains_name_each_cause_once() {
    let s = Secrets::new();
    let nats = PrivateNats::start_with_config(&format!(
        "authorization {{\n  users = [\n\
         {{user: \"admin\", password: \"admin-pw\"}}\n\
         {{user: \"replicator\", password: \"{}\"}}\n\
         {{user: \"url-user\", password: \"{}\"}}\n  ]\n}}\n",
        s.nats_password, s.nats_url_password
    ))
    .await;
    let port = nats.port;
    let admin_url = format!("nats://admin:admin-pw@127.0.0.1:{port}");
    let c = Cluster::start_on(2, admin_url.clone(), |t| {
        *t = with_ops_on_any_port(t);
    })
    .await;
    let db = c.db.url.clone();
    let with_keys = config(
        &c,
        &s,
        &admin_url,
        &db,
        &format!(
            "url = \"nats://127.0.0.1:{port}\"\nuser = \"replicator\"\npassword = \"{}\"",
            s.nats_password
        ),
    );
    let in_url = config(
        &c,
        &s,
        &admin_url,
        &db,
        &format!(
            "url = \"nats://url-user:{}@127.0.0.1:{port}\"",
            s.nats_url_password
        ),
    );
    let wrong_password = config(
        &c,
        &s,
        &admin_url,
        &db,
        &format!(
            "url = \"nats://replicator:{}@127.0.0.1:{port}\"",
            s.wrong_nats_password
        ),
    );
    let nats_unreachable = config(
        &c,
        &s,
        &admin_url,
        &db,
        &format!(
            "url = \"nats://replicator:{}@127.0.0.1:1\"",
            s.nats_url_password
        ),
    );
    let postgres_unreachable = config(
        &c,
        &s,
        &admin_url,
        "postgres://postgres@127.0.0.1:1/gone",
        &format!(
            "url = \"nats://127.0.0.1:{port}\"\nuser = \"replicator\"\npassword = \"{}\"",
            s.nats_password
        ),
    );
    let creds_dir = tempfile::tempdir().unwrap();
    let creds_path = creds_dir.path().join("replicator.creds");
    std::fs::write(
        &creds_path,
        format!(
            "-----BEGIN NATS USER JWT-----\n{}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            s.creds_jwt, s.creds_seed
        ),
    )
    .unwrap();
    let bad_creds = config(
        &c,
        &s,
        &admin_url,
        &db,
        &format!(
            "url = \"nats://127.0.0.1:{port}\"\ncredentials_file = \"{}\"",
            creds_path.display()
        ),
    );
    let seed_path = creds_dir.path().join("replicator.nk");
    std::fs::write(&seed_path, format!("{}\n", s.nkey_seed)).unwrap();
    let bad_nkey_seed = config(
        &c,
        &s,
        &admin_url,
        &db,
        &format!(
            "url = \"nats://127.0.0.1:{port}\"\nnkey_seed_file = \"{}\"",
            seed_path.display()
        ),
    );
    let ca = testkit::tls::TestCa::new("secrets-ca");
    let leaf = ca.leaf("client", &["client"]);
    std::fs::write(&leaf.key_file, format!("{}\n", s.tls_key)).unwrap();
    let bad_tls_key = config(
        &c,
        &s,
        &admin_url,
        &db,
        &format!(
            "url = \"nats://127.0.0.1:{port}\"\nuser = \"replicator\"\npassword = \"{}\"\n\
             tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
            s.nats_password,
            leaf.cert_file.display(),
            leaf.key_file.display()
        ),
    );
    let mut out = Outputs::default();

    // Paths that work, and the dead letter of a job whose target refuses
    // the configured token.
    for (name, toml) in [("keys", &with_keys), ("url", &in_url)] {
        out.run(&format!("check-config ({name})"), toml, &["check-config"]);
        let o = out.run(&format!("setup ({name})"), toml, &["setup"]);
        assert!(o.status.success(), "{}", all(&o));
        let o = out.run(&format!("status ({name})"), toml, &["status"]);
        assert!(o.status.success(), "{}", all(&o));
    }
    let o = out.run("deploy-manifests", &in_url, &["deploy-manifests"]);
    assert!(o.status.success(), "{}", all(&o));
    let manifests = tempfile::tempdir().unwrap();
    let dir = manifests.path().to_string_lossy().into_owned();
    let o = out.run(
        "deploy-manifests --nats",
        &in_url,
        &["deploy-manifests", "--nats", "--output", &dir],
    );
    assert!(o.status.success(), "{}", all(&o));
    for entry in std::fs::read_dir(manifests.path()).unwrap() {
        let path = entry.unwrap().path();
        out.add(
            &path.display().to_string(),
            std::fs::read_to_string(&path).unwrap(),
        );
    }
    let o = out.run("migrate", &with_keys, &["migrate"]);
    assert!(o.status.success(), "{}", all(&o));
    let vs = c.vs().to_owned();
    let o = out.run(
        "publish",
        &with_keys,
        &[
            "publish",
            "--virtual-storage",
            &vs,
            "--change",
            "cleanup",
            "--relative-path",
            "refused.git",
            "--target",
            "gitaly-2",
        ],
    );
    assert!(o.status.success(), "{}", all(&o));
    let service = ReplicatorProcess::spawn_with_env(&with_keys, &["run"], TRACE);
    let ops_port = service.ops_port().await;
    assert!(
        c.eventually(Duration::from_secs(30), || async {
            c.dead_letters().await.len() == 1
        })
        .await,
        "the job refused for its token never went to the dead-letter stream"
    );
    assert!(
        c.eventually(Duration::from_secs(15), || async {
            get(ops_port, "/metrics")
                .await
                .1
                .contains("gitaly_praefect_replication_queue_depth")
        })
        .await
    );
    out.add("/metrics", get(ops_port, "/metrics").await.1);
    service.signal("TERM");
    let (code, stderr) = service.wait().await;
    assert_eq!(code, Some(0), "{stderr}");
    // The search saw every crate's most detailed lines.
    for needle in ["TRACE", "async_nats", "sqlx::query", "gitaly_replicator"] {
        assert!(stderr.contains(needle), "no {needle} in the run's log");
    }
    out.add("run", stderr);
    let dead = c.dead_letters().await;
    let error = dead[0]
        .header(gitaly_replicator::dead_letters::headers::ERROR)
        .unwrap_or_default()
        .to_owned();
    assert!(!error.is_empty(), "{:?}", dead[0].headers);
    out.add("dead-letter headers", format!("{:?}", dead[0].headers));
    let o = out.run("dead list", &with_keys, &["dead", "list"]);
    assert!(o.status.success(), "{}", all(&o));
    let o = out.run("dead list --json", &with_keys, &["dead", "list", "--json"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("refused.git"),
        "{}",
        all(&o)
    );

    // A token, in its key and in the URL, on a server that wants one.
    let token_nats = PrivateNats::start_with_config(&format!(
        "authorization {{ token: \"{}\" }}\n",
        s.nats_token
    ))
    .await;
    let token_port = token_nats.port;
    for (name, nats_lines) in [
        (
            "token key",
            format!(
                "url = \"nats://127.0.0.1:{token_port}\"\ntoken = \"{}\"",
                s.nats_token
            ),
        ),
        (
            "token in url",
            format!("url = \"nats://{}@127.0.0.1:{token_port}\"", s.nats_token),
        ),
    ] {
        let toml = config(&c, &s, &admin_url, &db, &nats_lines);
        out.run(&format!("check-config ({name})"), &toml, &["check-config"]);
        let o = out.run(&format!("setup ({name})"), &toml, &["setup"]);
        assert!(o.status.success(), "{}", all(&o));
        let o = out.run(&format!("status ({name})"), &toml, &["status"]);
        assert!(o.status.success(), "{}", all(&o));
    }

    // Paths that fail: a refused password or token, files that hold no
    // seed or key, NATS or Postgres unreachable.
    let wrong_token = config(
        &c,
        &s,
        &admin_url,
        &db,
        &format!(
            "url = \"nats://127.0.0.1:{token_port}\"\ntoken = \"{}\"",
            s.wrong_nats_token
        ),
    );
    let mut failed = Vec::new();
    for (name, toml, args) in [
        ("status (wrong password)", &wrong_password, &["status"][..]),
        ("setup (wrong token)", &wrong_token, &["setup"]),
        ("setup (bad nkey seed file)", &bad_nkey_seed, &["setup"]),
        ("setup (bad client key file)", &bad_tls_key, &["setup"]),
        ("setup (wrong password)", &wrong_password, &["setup"]),
        ("setup (bad credentials file)", &bad_creds, &["setup"]),
        ("status (no NATS)", &nats_unreachable, &["status"]),
        ("setup (no NATS)", &nats_unreachable, &["setup"]),
        ("dead list (no NATS)", &nats_unreachable, &["dead", "list"]),
        (
            "publish (no NATS)",
            &nats_unreachable,
            &[
                "publish",
                "--change",
                "cleanup",
                "--relative-path",
                "a.git",
                "--target",
                "gitaly-2",
            ],
        ),
        ("run (no NATS)", &nats_unreachable, &["run"]),
        ("migrate (no Postgres)", &postgres_unreachable, &["migrate"]),
        ("run (no Postgres)", &postgres_unreachable, &["run"]),
        (
            "check-config (no Postgres)",
            &postgres_unreachable,
            &["check-config"],
        ),
    ] {
        let o = out.run(name, toml, args);
        if name.starts_with("check-config") {
            assert!(o.status.success(), "{name}: {}", all(&o));
            continue;
        }
        assert!(!o.status.success(), "{name}: {}", all(&o));
        failed.push((name, error_line(&o)));
    }

    let leaks = out.leaks(&s);
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    for (name, line) in &failed {
        assert_each_cause_once(line);
        println!("{name}: {line}");
    }
    // A refusal names the keys whose secret was refused.
    for (name, key) in [
        ("status (wrong password)", "the credentials in nats.url"),
        ("setup (wrong token)", "nats.token"),
        ("setup (bad nkey seed file)", "nats.nkey_seed_file"),
        ("setup (bad client key file)", "nats.tls_key_file"),
        ("setup (bad credentials file)", "nats.credentials_file"),
    ] {
        let (_, line) = failed.iter().find(|(n, _)| *n == name).unwrap();
        assert!(line.contains(key), "{name}: {line}");
    }
    // The chain of an unreachable NATS ends in the operating system's
    // answer, once.
    let (_, status) = failed
        .iter()
        .find(|(name, _)| *name == "status (no NATS)")
        .unwrap();
    assert!(
        status.contains("cannot connect to NATS at nats://[masked]@127.0.0.1:1"),
        "{status}"
    );
    let cause = status.rsplit(": ").next().unwrap_or_default();
    assert!(cause.len() >= 8, "{status}");
    assert_eq!(status.matches(cause).count(), 1, "{status}");
    drop(token_nats);
    drop(nats);
}
