//! The secured wire: `tls://` storage nodes (the `storage-node` binary
//! serving certificates a test's own CA signed), verified against the
//! system's CAs plus `SSL_CERT_FILE` and `SSL_CERT_DIR`, host name checked;
//! and NATS over TLS, mutual TLS and with each way to log in, each against a
//! private nats-server configured for it, refusals naming the key and never
//! the secret; and the publisher, consumer and operator roles of
//! `deploy-manifests --nats` on a server that grants only those.

use crate::cli::{all, cli};
use crate::common::cluster::{NodeSpec, TestNames, config_toml};
use crate::common::db::TestDatabase;
use crate::common::nats_server::PrivateNats;
use crate::common::process::ReplicatorProcess;
use crate::common::storage_nodes::{NodeCluster, NodeProcess, NodeSetup, call_context};
use gitaly_replicator::proto::gitaly as pb;
use gitaly_replicator::{Config, Job, Layout, Publisher};
use gitaly_replicator::{Node, NodeClient, Secret, TrustRoots};
use std::time::Duration;
use testkit::recording_gitaly::{Behaviour, RecordingGitaly};
use testkit::tls::{Leaf, TestCa};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

/// A storage node serving TLS with `leaf`.
async fn tls_node(dir: &std::path::Path, leaf: &Leaf) -> NodeProcess {
    NodeProcess::spawn(
        "gitaly-1",
        dir,
        "tls-token",
        "127.0.0.1:0",
        &leaf.node_flags(),
    )
    .await
}

/// A client of `node` at `address`, trusting `roots`.
fn client(node: &NodeProcess, address: &str, roots: &TrustRoots) -> NodeClient {
    let spec = Node {
        storage: node.storage.clone(),
        address: address.parse().unwrap(),
        token: Secret::new(node.token.clone()),
    };
    NodeClient::with_trust_roots("secure", &spec, roots).unwrap()
}

/// The health check's error through `client`, or `None` when healthy.
async fn health_error(client: &NodeClient) -> Option<String> {
    client
        .check_health(Duration::from_secs(5))
        .await
        .err()
        .map(|e| e.to_string())
}

#[tokio::test]
async fn tls_nodes_are_verified_against_the_systems_and_the_environments_cas_and_their_host_name() {
    let ca = TestCa::new("gitaly-ca");
    let other_ca = TestCa::new("other-ca");
    let leaf = ca.leaf("gitaly-1", &["127.0.0.1"]);
    let storage = tempfile::tempdir().unwrap();
    let node = tls_node(storage.path(), &leaf).await;
    let address = node.address();
    assert!(address.starts_with("tls://127.0.0.1:"), "{address}");

    // The CA as SSL_CERT_FILE, and in a directory of SSL_CERT_DIR (after
    // one that does not hold it): healthy, and calls work.
    let by_file = TrustRoots::load(Some(ca.cert_file.as_os_str()), None).unwrap();
    let dirs = std::env::join_paths([other_ca.dir(), ca.dir()]).unwrap();
    let by_dir = TrustRoots::load(None, Some(&dirs)).unwrap();
    for roots in [&by_file, &by_dir] {
        let c = client(&node, &address, roots);
        assert_eq!(health_error(&c).await, None);
        let request = c.request(
            pb::RepositoryExistsRequest {
                repository: Some(pb::Repository {
                    storage_name: "gitaly-1".into(),
                    relative_path: "none.git".into(),
                    ..Default::default()
                }),
            },
            &call_context(),
        );
        let exists = c
            .call(
                "RepositoryExists",
                &call_context(),
                c.repository_service().repository_exists(request),
            )
            .await
            .unwrap();
        assert!(!exists.exists);
    }

    // The system's CAs alone, or another CA: the certificate is refused.
    let system_only = TrustRoots::load(None, None).unwrap();
    let other = TrustRoots::load(Some(other_ca.cert_file.as_os_str()), None).unwrap();
    for roots in [&system_only, &other] {
        let e = health_error(&client(&node, &address, roots)).await;
        let e = e.expect("a certificate of an unknown CA was accepted");
        assert!(
            e.contains("Unavailable") && e.contains("invalid peer certificate: UnknownIssuer"),
            "{e}"
        );
    }

    // The right CA, another host name than the certificate's.
    let by_name = address.replace("127.0.0.1", "localhost");
    let e = health_error(&client(&node, &by_name, &by_file)).await;
    let e = e.expect("a certificate for another host name was accepted");
    assert!(
        e.contains("invalid peer certificate: certificate not valid for name \"localhost\""),
        "{e}"
    );

    // Plaintext to a TLS port gets no answer either.
    let e = health_error(&client(&node, &address.replace("tls:", "tcp:"), &by_file)).await;
    assert!(e.is_some());
}

/// The service's JSON log line that first found `storage` unhealthy.
fn unhealthy_line(stderr: &str, storage: &str) -> Option<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("storage node is unhealthy"))
                && v["storage"] == storage
        })
}

#[tokio::test]
async fn a_target_whose_tls_handshake_fails_stays_unhealthy_and_its_jobs_wait_with_their_attempts()
{
    let ca = TestCa::new("cluster-ca");
    let wrong_ca = TestCa::new("wrong-ca");
    let ca_env = (
        "SSL_CERT_FILE".to_owned(),
        ca.cert_file.display().to_string(),
    );
    let setups: Vec<NodeSetup> = (1..=2)
        .map(|i| NodeSetup {
            flags: ca.leaf(&format!("gitaly-{i}"), &["127.0.0.1"]).node_flags(),
            // The target dials the source over TLS too.
            env: vec![ca_env.clone()],
            ..NodeSetup::default()
        })
        .collect();
    let c = NodeCluster::start_with(setups, |_| {}).await;
    let target_address = c.node(2).address();
    assert!(target_address.starts_with("tls://"), "{target_address}");
    c.create_on_source("tls.git").await;
    c.publish_update("tls.git", "gitaly-2").await;
    let stream = c.js.get_stream(&c.layout.stream).await.unwrap();
    let durable = c
        .layout
        .consumer(c.vs(), "gitaly-2")
        .unwrap()
        .durable_name
        .clone();

    // A wrong CA, then the right CA with a host name the certificate does
    // not name: the target is unhealthy, the log says where and why, and the
    // job is never delivered.
    let by_name = c.toml.replace(
        &target_address,
        &target_address.replace("127.0.0.1", "localhost"),
    );
    let wrong_ca_file = wrong_ca.cert_file.display().to_string();
    let phases = [
        (
            &c.toml,
            wrong_ca_file.as_str(),
            "invalid peer certificate: UnknownIssuer",
            target_address.clone(),
        ),
        (
            &by_name,
            ca_env.1.as_str(),
            "invalid peer certificate: certificate not valid for name \"localhost\"",
            target_address.replace("127.0.0.1", "localhost"),
        ),
    ];
    for (toml, ssl_cert_file, reason, address) in phases {
        let p =
            ReplicatorProcess::spawn_with_env(toml, &["run"], &[("SSL_CERT_FILE", ssl_cert_file)]);
        let seen = crate::common::eventually(WAIT, || async {
            unhealthy_line(&p.stderr.lock().unwrap(), "gitaly-2").is_some()
        })
        .await;
        assert!(seen, "no unhealthy line:\n{}", p.stderr.lock().unwrap());
        // Several health checks (every 200 ms) and fetch rounds long.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        p.signal("TERM");
        let (code, stderr) = p.wait().await;
        assert_eq!(code, Some(0), "{stderr}");
        let line = unhealthy_line(&stderr, "gitaly-2").unwrap();
        assert_eq!(line["address"], address.as_str(), "{line}");
        let error = line["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{line}");
        let info = stream.consumer_info(&durable).await.unwrap();
        assert_eq!(
            (
                info.delivered.stream_sequence,
                info.num_ack_pending,
                info.num_redelivered,
                info.num_pending
            ),
            (0, 0, 0, 1),
            "the job was delivered while its target was unhealthy: {info:?}"
        );
    }
    assert!(c.dead_letters().await.is_empty());

    // The CA the nodes' certificates come from: healthy, and the update
    // completes on its first attempt.
    let p = ReplicatorProcess::spawn_with_env(
        &c.toml,
        &["run"],
        &[("SSL_CERT_FILE", ca_env.1.as_str())],
    );
    c.wait_for_generation("tls.git", "gitaly-2", 1).await;
    c.wait_until_drained().await;
    p.signal("TERM");
    let (code, stderr) = p.wait().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(c.dead_letters().await.is_empty());
    assert!(
        crate::common::git::refs(&c.node(2).repo("tls.git"))
            == crate::common::git::refs(&c.node(1).repo("tls.git"))
    );
    let info = stream.consumer_info(&durable).await.unwrap();
    assert_eq!(
        (info.delivered.stream_sequence, info.num_redelivered),
        (1, 0),
        "{info:?}"
    );
}

// ------------------------------------------------------------------ NATS

/// A config naming one storage (never dialled) and `url`, with `lines`
/// added to its `[nats]` section.
fn nats_toml(names: &TestNames, url: &str, lines: &str) -> String {
    let nodes = [NodeSpec {
        storage: "gitaly-1".into(),
        address: "tcp://127.0.0.1:1".into(),
        token: "unused".into(),
    }];
    let mut toml = config_toml(names, &nodes, "postgres://postgres@127.0.0.1:1/unused", url);
    toml.push_str(lines);
    toml.push('\n');
    toml
}

/// Connects as the service does, creates the layout and publishes a job
/// that the work stream then holds.
async fn publishes_through(toml: &str) {
    let config = Config::from_toml_str(toml).unwrap();
    let client = gitaly_replicator::connect_nats(&config.nats, "secure test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = async_nats::jetstream::new(client);
    let layout = Layout::from_config(&config);
    layout.ensure(&js).await.unwrap();
    let job = Job::from_value(&serde_json::json!({
        "change": "cleanup",
        "relative_path": "a.git",
        "virtual_storage": config.virtual_storages[0].name,
        "target_node_storage": "gitaly-1",
    }))
    .unwrap();
    Publisher::new(js.clone(), layout.clone())
        .publish(&job, None)
        .await
        .unwrap();
    assert_eq!(crate::common::cluster::work_messages(&js, &layout).await, 1);
}

/// The connection's error, which must name `key` and show none of
/// `secrets`.
async fn refused(toml: &str, key: &str, secrets: &[&str]) -> String {
    let config = Config::from_toml_str(toml).unwrap();
    let e = match gitaly_replicator::connect_nats(&config.nats, "secure test").await {
        Ok(_) => panic!("connected with {key} wrong"),
        Err(e) => e,
    };
    let text = format!("{e} / {e:?}");
    assert!(text.contains(key), "{key} not named: {e}");
    for secret in secrets {
        assert!(!text.contains(secret), "{secret} shown: {text}");
    }
    e.to_string()
}

/// A nats-server on a free port with `config` (its TLS files in `ca`'s
/// directory).
async fn nats_with(config: &str) -> PrivateNats {
    PrivateNats::start_with_config(config).await
}

fn tls_block(ca: &TestCa, server: &Leaf, verify_clients: bool) -> String {
    let mut block = format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  timeout: 2\n",
        server.cert_file, server.key_file
    );
    if verify_clients {
        block += &format!("  ca_file: {:?}\n  verify: true\n", ca.cert_file);
    }
    block + "}\n"
}

#[tokio::test]
async fn nats_over_tls_verifies_the_server_against_tls_ca_file() {
    let ca = TestCa::new("nats-ca");
    let other_ca = TestCa::new("other-ca");
    let nats = nats_with(&tls_block(&ca, &ca.leaf("nats", &["127.0.0.1"]), false)).await;
    let names = TestNames::new();
    let with_ca = |ca: &std::path::Path| {
        nats_toml(
            &names,
            &nats.url(),
            &format!("tls_ca_file = {:?}\ntls_required = true", ca),
        )
    };
    publishes_through(&with_ca(&ca.cert_file)).await;
    let e = refused(&with_ca(&other_ca.cert_file), "nats.tls_ca_file", &[]).await;
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");
    // Without the CA, the system's do not know the server's either.
    let e = refused(&nats_toml(&names, &nats.url(), ""), "nats.tls_ca_file", &[]).await;
    assert!(e.contains("invalid peer certificate"), "{e}");
    let missing = ca.dir().join("missing.pem");
    let e = refused(&with_ca(&missing), "nats.tls_ca_file", &[]).await;
    assert!(
        e.starts_with(&format!("nats.tls_ca_file {}: ", missing.display())),
        "{e}"
    );
}

#[tokio::test]
async fn nats_with_mutual_tls_presents_tls_cert_file() {
    let ca = TestCa::new("nats-ca");
    let other_ca = TestCa::new("other-ca");
    let nats = nats_with(&tls_block(&ca, &ca.leaf("nats", &["127.0.0.1"]), true)).await;
    let names = TestNames::new();
    let client = ca.leaf("replicator", &["replicator"]);
    let stranger = other_ca.leaf("stranger", &["replicator"]);
    let with_cert = |leaf: &Leaf| {
        nats_toml(
            &names,
            &nats.url(),
            &format!(
                "tls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}",
                ca.cert_file, leaf.cert_file, leaf.key_file
            ),
        )
    };
    publishes_through(&with_cert(&client)).await;
    let key = std::fs::read_to_string(&stranger.key_file).unwrap();
    let key_body = key.lines().nth(1).unwrap_or_default();
    refused(&with_cert(&stranger), "nats.tls_cert_file", &[key_body]).await;
    let no_cert = nats_toml(
        &names,
        &nats.url(),
        &format!("tls_ca_file = {:?}", ca.cert_file),
    );
    refused(&no_cert, "nats.tls_cert_file", &[]).await;
}

#[tokio::test]
async fn nats_with_user_and_password() {
    let nats = nats_with(
        "authorization { users = [ {user: \"replicator\", password: \"Right-pw-8c1\"} ] }\n",
    )
    .await;
    let names = TestNames::new();
    let with = |password: &str| {
        nats_toml(
            &names,
            &nats.url(),
            &format!("user = \"replicator\"\npassword = \"{password}\""),
        )
    };
    publishes_through(&with("Right-pw-8c1")).await;
    let e = refused(
        &with("Wrong-pw-5d2"),
        "nats.user and nats.password",
        &["Wrong-pw-5d2", "Right-pw-8c1"],
    )
    .await;
    assert!(e.contains("authorization violation"), "{e}");
    refused(
        &nats_toml(&names, &nats.url(), ""),
        "nats.token",
        &["Right-pw-8c1"],
    )
    .await;
}

#[tokio::test]
async fn nats_with_a_token() {
    let nats = nats_with("authorization { token: \"Right-token-3f9\" }\n").await;
    let names = TestNames::new();
    let with = |token: &str| nats_toml(&names, &nats.url(), &format!("token = \"{token}\""));
    publishes_through(&with("Right-token-3f9")).await;
    refused(
        &with("Wrong-token-7a0"),
        "the server refused nats.token",
        &["Wrong-token-7a0", "Right-token-3f9"],
    )
    .await;
}

#[tokio::test]
async fn nats_with_an_nkey_seed_file() {
    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let nats = nats_with(&format!(
        "authorization {{ users = [ {{nkey: \"{}\"}} ] }}\n",
        user.public_key()
    ))
    .await;
    let names = TestNames::new();
    let dir = tempfile::tempdir().unwrap();
    let with_seed = |file: &str, seed: &str| {
        let path = dir.path().join(file);
        std::fs::write(&path, format!("{seed}\n")).unwrap();
        nats_toml(&names, &nats.url(), &format!("nkey_seed_file = {:?}", path))
    };
    let seed = user.seed().unwrap();
    publishes_through(&with_seed("user.nk", &seed)).await;
    let stranger_seed = stranger.seed().unwrap();
    refused(
        &with_seed("stranger.nk", &stranger_seed),
        "the server refused nats.nkey_seed_file",
        &[&stranger_seed, &seed],
    )
    .await;
    let garbage = format!("SU{}", &seed[2..seed.len() - 4]);
    let e = refused(
        &with_seed("garbage.nk", &garbage),
        "nats.nkey_seed_file",
        &[&garbage],
    )
    .await;
    assert!(
        e.ends_with("not an NKey seed (expected one line starting with SU)"),
        "{e}"
    );
}

/// A NATS JWT: `claims` (with `nats` holding the typed part) signed by
/// `issuer`, as nsc makes them.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, nats: serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": now,
        "iss": issuer.public_key(),
        "name": subject,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        b64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        b64.encode(claims.to_string())
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64.encode(signature))
}

/// An account JWT with JetStream enabled and no limits.
fn account_jwt(operator: &nkeys::KeyPair, account: &nkeys::KeyPair) -> String {
    jwt(
        operator,
        &account.public_key(),
        serde_json::json!({
            "type": "account",
            "version": 2,
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
            },
        }),
    )
}

/// A `.creds` file's text: a user JWT issued by `account`, and the user's seed.
fn creds(account: &nkeys::KeyPair, user: &nkeys::KeyPair) -> (String, String) {
    let user_jwt = jwt(
        account,
        &user.public_key(),
        serde_json::json!({"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1}),
    );
    let seed = user.seed().unwrap();
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    (text, seed)
}

#[tokio::test]
async fn nats_with_a_creds_file_in_operator_mode() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let unknown_account = nkeys::KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        serde_json::json!({"type": "operator", "version": 2}),
    );
    // The system account nats-server wants in operator mode, and the
    // replicator's, with JetStream.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        serde_json::json!({"type": "account", "version": 2}),
    );
    let nats = nats_with(&format!(
        "operator: {operator_jwt}\nsystem_account: {}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {}: {system_jwt}\n  {}: {}\n}}\n",
        system.public_key(),
        system.public_key(),
        account.public_key(),
        account_jwt(&operator, &account)
    ))
    .await;
    let names = TestNames::new();
    let dir = tempfile::tempdir().unwrap();
    let with_creds = |file: &str, text: &str| {
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        nats_toml(
            &names,
            &nats.url(),
            &format!("credentials_file = {:?}", path),
        )
    };
    let (text, _) = creds(&account, &nkeys::KeyPair::new_user());
    publishes_through(&with_creds("replicator.creds", &text)).await;
    // A user of an account the operator never signed.
    let (text, seed) = creds(&unknown_account, &nkeys::KeyPair::new_user());
    let jwt_line = text.lines().nth(1).unwrap_or_default().to_owned();
    refused(
        &with_creds("stranger.creds", &text),
        "the server refused nats.credentials_file",
        &[&seed, &jwt_line],
    )
    .await;
}

// ------------------------------------------------------- least privilege

/// The `Violation` lines of a nats-server log: what a user was refused.
fn violations(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("Violation")).collect()
}

/// Whether a `Violation` line names `user`: nats-server 2.9 writes
/// `Violation - User "consumer", Subject …`, 2.10 and later put the user in
/// the client's tag, `"$G/user:consumer" - Publish Violation - Subject …`.
fn refused_user(line: &str, user: &str) -> bool {
    line.contains(&format!("User \"{user}\"")) || line.contains(&format!("/user:{user}\""))
}

#[tokio::test]
async fn each_nats_role_can_do_its_job_and_nothing_more() {
    let names = TestNames::new();
    let db = TestDatabase::new().await;
    let mut nodes = Vec::new();
    let mut specs = Vec::new();
    for i in 1..=2 {
        let token = format!("token-{i}");
        let node = RecordingGitaly::new(Some(&token)).serve().await.unwrap();
        specs.push(NodeSpec {
            storage: format!("gitaly-{i}"),
            address: node.address(),
            token,
        });
        nodes.push(node);
    }
    // The permissions follow the layout, which does not depend on the URL.
    // `strand` needs the server to give up after three deliveries.
    let base = config_toml(&names, &specs, &db.url, "NATS_URL")
        .replace("ack_wait = \"5s\"", "ack_wait = \"1s\"")
        .replacen("\n[nats]\n", "\n[nats]\nmax_deliver = 3\n", 1);
    let layout = Layout::from_config(&Config::from_toml_str(&base).unwrap());
    let permissions = gitaly_replicator::manifests::nats_permissions_conf(&layout);
    let mut users = String::new();
    for (role, variable) in [
        ("publisher", "GITALY_REPLICATOR_PUBLISHER"),
        ("consumer", "GITALY_REPLICATOR_CONSUMER"),
        ("operator", "GITALY_REPLICATOR_OPERATOR"),
    ] {
        users += &format!(
            "    {{user: \"{role}\", password: \"{role}-pw\", permissions: ${variable}}}\n"
        );
    }
    let nats = PrivateNats::start_with_files(
        &format!("include \"permissions.conf\"\nauthorization {{\n  users = [\n{users}  ]\n}}\n"),
        &[("permissions.conf", &permissions)],
    )
    .await;
    let as_role = |role: &str| {
        format!("{}user = \"{role}\"\npassword = \"{role}-pw\"\n", base)
            .replace("NATS_URL", &nats.url())
    };
    let (publisher, consumer, operator) = (
        as_role("publisher"),
        as_role("consumer"),
        as_role("operator"),
    );
    let connect = |toml: &str| {
        let config = Config::from_toml_str(toml).unwrap();
        async move {
            let client = gitaly_replicator::connect_nats(&config.nats, "role test")
                .await
                .unwrap();
            let mut js = async_nats::jetstream::new(client.clone());
            js.set_timeout(Duration::from_secs(1));
            (client, js)
        }
    };
    let (_, js) = connect(&operator).await;
    let dead_letters = || async {
        gitaly_replicator::dead_letters::list(&js, &layout, 1, 100)
            .await
            .unwrap()
    };
    let work_messages = || crate::common::cluster::work_messages(&js, &layout);

    // Before setup the consumer can create nothing: `run` waits, and says
    // that the server refused it and who may change the layout.
    let early = ReplicatorProcess::run(&consumer);
    let said = crate::common::eventually(WAIT, || async {
        early
            .stderr
            .lock()
            .unwrap()
            .contains("NATS refused this user a request")
    })
    .await;
    early.signal("TERM");
    let (_, log) = early.wait().await;
    assert!(said, "{log}");
    assert!(log.contains("run as the operator"), "{log}");
    // What the server refused it; nothing refused from here on is expected.
    let refused_early = nats.log();
    let early_violations = violations(&refused_early);
    assert!(
        !early_violations.is_empty()
            && early_violations.iter().all(|v| refused_user(v, "consumer")),
        "{refused_early}"
    );

    // The operator sets up.
    let o = cli(&operator, &["setup"], None);
    assert!(o.status.success(), "{}", all(&o));

    // The publisher publishes: jobs that complete, one that fails once, two
    // that fail for good (dead letters), and one for gitaly-1 that a
    // process takes three times and never acks (stranded).
    nodes[1]
        .gitaly
        .respond("Cleanup", Behaviour::fail(Code::InvalidArgument, "refused"));
    nodes[1].gitaly.respond(
        "GarbageCollect",
        Behaviour::fail(Code::Unavailable, "once").times(1),
    );
    let vs = &names.virtual_storage;
    let job = |change: &str, path: &str, target: &str, params: serde_json::Value| {
        serde_json::json!({"change": change, "relative_path": path, "virtual_storage": vs,
            "target_node_storage": target, "params": params})
        .to_string()
    };
    let no_params = serde_json::Value::Null;
    let lines = [
        job(
            "repack_incremental",
            "ok.git",
            "gitaly-2",
            no_params.clone(),
        ),
        job(
            "gc",
            "retried.git",
            "gitaly-2",
            serde_json::json!({"create_bitmap": false, "prune": false}),
        ),
        job("cleanup", "dead-1.git", "gitaly-2", no_params.clone()),
        job("cleanup", "dead-2.git", "gitaly-2", no_params.clone()),
        job("midx_repack", "stranded.git", "gitaly-1", no_params),
    ]
    .join("\n");
    let o = cli(&publisher, &["publish", "--stdin"], Some(&lines));
    assert!(o.status.success(), "{}", all(&o));
    // A process that takes the gitaly-1 job and dies before acking, three
    // times over: the server gives up on it one ack wait later.
    {
        let (_, consumer_js) = connect(&consumer).await;
        crate::common::cluster::strand(&consumer_js, &layout, vs, "gitaly-1", 1).await;
    }

    // The service as consumer: completes, retries, dead-letters at once,
    // and moves the stranded job from its advisory to the dead letters.
    let service = ReplicatorProcess::run(&consumer);
    let done = crate::common::eventually(WAIT, || async {
        dead_letters().await.len() == 3 && work_messages().await == 0
    })
    .await;
    assert!(
        done,
        "dead letters {}, work {}:\n{}\n{}",
        dead_letters().await.len(),
        work_messages().await,
        service.stderr.lock().unwrap(),
        nats.log()
    );
    assert_eq!(nodes[1].gitaly.calls_to("GarbageCollect").len(), 2);
    assert_eq!(nodes[1].gitaly.calls_to("RepackIncremental").len(), 1);
    assert!(nodes[0].gitaly.calls().is_empty());
    let log = nats.log();
    let log = log.get(refused_early.len()..).unwrap_or_default();
    assert!(violations(log).is_empty(), "{}", violations(log).join("\n"));

    // The publisher may not write dead letters, purge or delete streams.
    let (pub_client, pub_js) = connect(&publisher).await;
    let dead_subject = format!("{}-dead.x.y", names.subject_prefix);
    let published = match pub_js.publish(dead_subject, "forged".into()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!published, "the publisher wrote a dead letter");
    let purge = pub_client
        .request(
            format!("$JS.API.STREAM.PURGE.{}", names.dead_letter_stream),
            "".into(),
        )
        .await;
    assert!(
        purge.is_err()
            || String::from_utf8_lossy(&purge.as_ref().unwrap().payload).contains("error"),
        "the publisher purged the dead letters"
    );
    assert!(pub_js.delete_stream(&layout.stream).await.is_err());
    assert!(
        pub_js
            .delete_stream(&layout.dead_letter_stream)
            .await
            .is_err()
    );
    assert_eq!(dead_letters().await.len(), 3, "the dead letters changed");
    assert!(js.get_stream(&layout.stream).await.is_ok());
    let refused = nats.log();
    let refused = violations(&refused);
    for subject in [
        format!("{}-dead.x.y", names.subject_prefix),
        format!("$JS.API.STREAM.PURGE.{}", names.dead_letter_stream),
        format!("$JS.API.STREAM.DELETE.{}", names.stream),
    ] {
        assert!(
            refused.iter().any(|l| l.contains(&subject)),
            "no violation for {subject}: {refused:?}"
        );
    }
    let refused_count = refused.len();

    // The operator: status, dead list, replay one (it now completes) and
    // purge the other.
    let o = cli(&operator, &["status"], None);
    assert!(o.status.success(), "{}", all(&o));
    let o = cli(&operator, &["dead", "list", "--json"], None);
    assert!(o.status.success(), "{}", all(&o));
    let dead = dead_letters().await;
    let sequence = |path: &str| {
        dead.iter()
            .find(|d| String::from_utf8_lossy(&d.payload).contains(path))
            .map(|d| d.sequence.to_string())
            .unwrap()
    };
    nodes[1].gitaly.respond("Cleanup", Behaviour::ok());
    let o = cli(
        &operator,
        &["dead", "replay", &sequence("dead-1.git")],
        None,
    );
    assert!(o.status.success(), "{}", all(&o));
    let o = cli(&operator, &["dead", "purge", &sequence("dead-2.git")], None);
    assert!(o.status.success(), "{}", all(&o));
    let o = cli(&operator, &["dead", "purge", "--all"], None);
    assert!(o.status.success(), "{}", all(&o));
    let replayed = crate::common::eventually(WAIT, || async {
        work_messages().await == 0
            && nodes[1]
                .gitaly
                .calls_to("Cleanup")
                .iter()
                .filter(|c| c.relative_path == "dead-1.git")
                .count()
                == 2
    })
    .await;
    assert!(replayed, "the replayed job did not complete");
    assert!(dead_letters().await.is_empty());
    service.signal("TERM");
    let (code, stderr) = service.wait().await;
    assert_eq!(code, Some(0), "{stderr}");
    let log = nats.log();
    assert_eq!(
        violations(&log).len(),
        refused_count,
        "{}",
        violations(&log)[refused_count..].join("\n")
    );
}
