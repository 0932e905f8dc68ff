//! The git-backed storage node against real git repositories in temporary
//! directories, called with real tonic clients carrying v2 tokens: in-process
//! servers on 127.0.0.1:0, and the `storage-node` binary in one test.

use gitaly_replicator::{CallContext, NodeClient};
use gitaly_replicator::{Node as NodeSpec, Secret};
use gitaly_wire::auth::v2_token;
use gitaly_wire::metadata::{GITALY_SERVERS, encode_gitaly_servers};
use gitaly_wire::proto::gitaly as pb;
use gitaly_wire::proto::health::health_check_response::ServingStatus;
use gitaly_wire::proto::health::{HealthCheckRequest, health_client::HealthClient};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};
use storage_node::{Faults, NodeConfig, parse_fail_method, serve};
use tempfile::TempDir;
use testkit::git::{assert_fsck_clean, commit, git, git_with_input, init_bare, populate, refs};
use tokio::sync::oneshot;
use tonic::Code;
use tonic::metadata::MetadataValue;

mod cancellation;

const TOKEN: &str = "node-secret";

// ---------------------------------------------------------------- fixtures

/// An in-process storage node with one storage in its own temporary
/// directory; stops when dropped.
struct TestNode {
    storage: String,
    token: String,
    addr: SocketAddr,
    dir: TempDir,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestNode {
    async fn start(storage: &str) -> TestNode {
        Self::start_with(storage, Faults::default()).await
    }

    async fn start_with(storage: &str, faults: Faults) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = NodeConfig {
            storages: vec![(storage.to_owned(), dir.path().join("repositories"))],
            token: Secret::new(TOKEN),
            faults,
        };
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            serve(config, listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        let node = TestNode {
            storage: storage.to_owned(),
            token: TOKEN.to_owned(),
            addr,
            dir,
            shutdown: Some(tx),
        };
        // Serving means the storage directories are there.
        node.client()
            .check_health(Duration::from_secs(5))
            .await
            .unwrap();
        node
    }

    fn address(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("repositories")
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root().join(relative)
    }

    fn client(&self) -> NodeClient {
        client_for(&self.storage, &self.address(), &self.token)
    }

    fn repo(&self, relative: &str) -> Option<pb::Repository> {
        Some(pb::Repository {
            storage_name: self.storage.clone(),
            relative_path: relative.to_owned(),
            ..Default::default()
        })
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn client_for(storage: &str, address: &str, token: &str) -> NodeClient {
    NodeClient::new(
        "default",
        &NodeSpec {
            storage: storage.to_owned(),
            address: address.parse().unwrap(),
            token: Secret::new(token),
        },
    )
    .unwrap()
}

fn ctx() -> CallContext {
    CallContext::new(None, Some(Duration::from_secs(60)))
}

/// ReplicateRepository on `target` of `relative`, from the same path on the
/// source storage reached with `servers` (the `gitaly-servers` value).
async fn replicate_with(
    target: &NodeClient,
    target_storage: &str,
    source_storage: &str,
    servers: String,
    relative: &str,
) -> Result<(), tonic::Status> {
    let repo = |storage: &str| {
        Some(pb::Repository {
            storage_name: storage.to_owned(),
            relative_path: relative.to_owned(),
            ..Default::default()
        })
    };
    let mut req = target.request(
        pb::ReplicateRepositoryRequest {
            repository: repo(target_storage),
            source: repo(source_storage),
        },
        &ctx(),
    );
    req.metadata_mut()
        .insert(GITALY_SERVERS, MetadataValue::try_from(servers).unwrap());
    target
        .repository_service()
        .replicate_repository(req)
        .await
        .map(|_| ())
}

/// The `gitaly-servers` value naming `source` with its own token.
fn servers_of(source: &TestNode) -> String {
    encode_gitaly_servers(&source.storage, &source.address(), &source.token)
}

async fn replicate(
    target: &NodeClient,
    target_storage: &str,
    source: &TestNode,
    relative: &str,
) -> Result<(), tonic::Status> {
    replicate_with(
        target,
        target_storage,
        &source.storage,
        servers_of(source),
        relative,
    )
    .await
}

async fn replicate_between(
    target: &TestNode,
    source: &TestNode,
    relative: &str,
) -> Result<(), tonic::Status> {
    replicate(&target.client(), &target.storage, source, relative).await
}

/// Every file under `dir` with its size and modification time.
fn file_states(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut states = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            }
            states.insert(entry.path(), (meta.len(), meta.modified().unwrap()));
        }
    }
    states
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, message: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(message),
                "{:?} does not contain {message:?}",
                status.message()
            );
        }
        Ok(v) => panic!("expected {code:?}, got {v:?}"),
    }
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn replicate_copies_refs_head_and_objects_to_a_new_target() {
    let (a, b) = (
        TestNode::start("gitaly-1").await,
        TestNode::start("gitaly-2").await,
    );
    populate(&a.path("group/project.git"));
    replicate_between(&b, &a, "group/project.git")
        .await
        .unwrap();
    assert_eq!(
        refs(&b.path("group/project.git")),
        refs(&a.path("group/project.git"))
    );
    assert_fsck_clean(&b.path("group/project.git"));
    // Nothing is left behind in the scratch space.
    let tmp = b.root().join("+gitaly/tmp");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
}

#[tokio::test]
async fn replicate_mirrors_added_moved_and_deleted_refs_and_a_second_call_changes_nothing() {
    let (a, b) = (
        TestNode::start("gitaly-1").await,
        TestNode::start("gitaly-2").await,
    );
    let (src, dst) = (a.path("p.git"), b.path("p.git"));
    populate(&src);
    replicate_between(&b, &a, "p.git").await.unwrap();

    commit(&src, "main", "three");
    let first = git(&src, &["rev-list", "--max-parents=0", "main"]);
    git(&src, &["update-ref", "refs/heads/feature", &first]);
    git(&src, &["update-ref", "-d", "refs/heads/stale"]);
    git(&src, &["update-ref", "-d", "refs/tags/light"]);
    git(&src, &["tag", "-a", "v2", "-m", "release 2", "main"]);
    commit(&src, "topic/new", "new branch");
    git(&src, &["symbolic-ref", "HEAD", "refs/heads/feature"]);

    replicate_between(&b, &a, "p.git").await.unwrap();
    assert_eq!(refs(&dst), refs(&src));
    assert!(!refs(&dst).contains("refs/heads/stale"));
    assert!(!refs(&dst).contains("refs/tags/light"));
    assert_fsck_clean(&dst);

    let before = file_states(&dst);
    replicate_between(&b, &a, "p.git").await.unwrap();
    assert_eq!(
        file_states(&dst),
        before,
        "an up-to-date target was written to"
    );
}

#[tokio::test]
async fn replicate_from_a_missing_source_is_not_found_invalid_source_repository() {
    let (a, b) = (
        TestNode::start("gitaly-1").await,
        TestNode::start("gitaly-2").await,
    );
    assert_code(
        replicate_between(&b, &a, "missing.git").await,
        Code::NotFound,
        "invalid source repository",
    );
    assert!(!b.path("missing.git").exists());
}

#[tokio::test]
async fn replicate_without_gitaly_servers_or_with_a_wrong_source_token_fails() {
    let (a, b) = (
        TestNode::start("gitaly-1").await,
        TestNode::start("gitaly-2").await,
    );
    populate(&a.path("p.git"));
    let client = b.client();
    let req = client.request(
        pb::ReplicateRepositoryRequest {
            repository: b.repo("p.git"),
            source: a.repo("p.git"),
        },
        &ctx(),
    );
    assert_code(
        client.repository_service().replicate_repository(req).await,
        Code::InvalidArgument,
        "gitaly-servers",
    );
    let wrong_token = encode_gitaly_servers(&a.storage, &a.address(), "not-the-token");
    assert_code(
        replicate_with(&client, &b.storage, &a.storage, wrong_token, "p.git").await,
        Code::Unauthenticated,
        "source storage",
    );
    let unnamed = encode_gitaly_servers("gitaly-9", &a.address(), TOKEN);
    assert_code(
        replicate_with(&client, &b.storage, &a.storage, unnamed, "p.git").await,
        Code::InvalidArgument,
        "names no storage",
    );
    assert!(!b.path("p.git").exists());
}

#[tokio::test]
async fn an_empty_source_replicates_and_an_empty_directory_at_the_target_is_replaced() {
    let (a, b) = (
        TestNode::start("gitaly-1").await,
        TestNode::start("gitaly-2").await,
    );
    init_bare(&a.path("empty.git"));
    std::fs::create_dir_all(b.path("empty.git")).unwrap();
    replicate_between(&b, &a, "empty.git").await.unwrap();
    assert_eq!(
        git(&b.path("empty.git"), &["for-each-ref"]),
        "",
        "an empty repository has no refs"
    );
    assert_eq!(
        git(&b.path("empty.git"), &["symbolic-ref", "HEAD"]),
        "refs/heads/main"
    );
    commit(&a.path("empty.git"), "main", "first");
    replicate_between(&b, &a, "empty.git").await.unwrap();
    assert_eq!(refs(&b.path("empty.git")), refs(&a.path("empty.git")));
}

#[tokio::test]
async fn get_snapshot_streams_a_tar_of_head_refs_and_objects_without_config() {
    let a = TestNode::start("gitaly-1").await;
    populate(&a.path("p.git"));
    let client = a.client();
    let req = client.request(
        pb::GetSnapshotRequest {
            repository: a.repo("p.git"),
        },
        &ctx(),
    );
    let mut stream = client
        .repository_service()
        .get_snapshot(req)
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        bytes.extend_from_slice(&chunk.data);
    }
    let mut archive = tar::Archive::new(bytes.as_slice());
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.first().map(String::as_str), Some("HEAD"));
    assert!(names.iter().any(|n| n == "refs/heads/main"), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("objects/")), "{names:?}");
    assert!(
        !names
            .iter()
            .any(|n| n == "config" || n.starts_with("hooks")),
        "{names:?}"
    );
}

#[tokio::test]
async fn concurrent_replications_of_different_repositories_all_complete() {
    let (a, b) = (
        TestNode::start("gitaly-1").await,
        TestNode::start("gitaly-2").await,
    );
    let names: Vec<String> = (0..8).map(|i| format!("many/r{i}.git")).collect();
    for name in &names {
        populate(&a.path(name));
        commit(&a.path(name), "main", name);
    }
    let calls = names.iter().map(|n| replicate_between(&b, &a, n));
    for result in futures::future::join_all(calls).await {
        result.unwrap();
    }
    for name in &names {
        assert_eq!(refs(&b.path(name)), refs(&a.path(name)));
    }
}

#[tokio::test]
async fn a_pool_linked_source_replicates_whole_and_the_pool_link_round_trips() {
    let (a, b) = (
        TestNode::start("gitaly-1").await,
        TestNode::start("gitaly-2").await,
    );
    let pool_rel = "@pools/aa/bb/pool.git";
    populate(&a.path(pool_rel));
    // The repository's only objects live in the pool.
    let repo = a.path("forked.git");
    init_bare(&repo);
    let pool_main = git(&a.path(pool_rel), &["rev-parse", "main"]);
    let ctx = ctx();
    let client = a.client();
    let get = |rel: &str| {
        let req = client.request(
            pb::GetObjectPoolRequest {
                repository: a.repo(rel),
            },
            &ctx,
        );
        let mut pools = client.object_pool_service();
        async move { pools.get_object_pool(req).await.map(|r| r.into_inner()) }
    };
    assert_eq!(get("forked.git").await.unwrap().object_pool, None);

    let link = |pool: &str| {
        let req = client.request(
            pb::LinkRepositoryToObjectPoolRequest {
                object_pool: Some(pb::ObjectPool {
                    repository: a.repo(pool),
                }),
                repository: a.repo("forked.git"),
            },
            &ctx,
        );
        let mut pools = client.object_pool_service();
        async move { pools.link_repository_to_object_pool(req).await }
    };
    assert_code(
        link("@pools/none.git").await,
        Code::FailedPrecondition,
        "does not exist",
    );
    link(pool_rel).await.unwrap();
    link(pool_rel).await.unwrap();
    let pool = get("forked.git").await.unwrap().object_pool.unwrap();
    assert_eq!(pool.repository, a.repo(pool_rel));
    git(&repo, &["update-ref", "refs/heads/main", &pool_main]);
    assert_fsck_clean(&repo);

    replicate_between(&b, &a, "forked.git").await.unwrap();
    assert_eq!(refs(&b.path("forked.git")), refs(&repo));
    assert_fsck_clean(&b.path("forked.git"));
}

#[tokio::test]
async fn every_maintenance_rpc_runs_and_leaves_the_repository_valid() {
    let a = TestNode::start("gitaly-1").await;
    let path = a.path("m.git");
    populate(&path);
    let before = refs(&path);
    let client = a.client();
    let ctx = ctx();
    let r = || a.repo("m.git");
    let mut repos = client.repository_service();
    let mut refs_svc = client.ref_service();

    // Old enough to be stale: Cleanup removes it.
    let lock = path.join("refs/heads/main.lock");
    std::fs::write(&lock, "").unwrap();
    let f = std::fs::File::options().read(true).open(&lock).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(2 * 3600))
        .unwrap();
    repos
        .cleanup(client.request(pb::CleanupRequest { repository: r() }, &ctx))
        .await
        .unwrap();
    assert!(!lock.exists());
    assert_fsck_clean(&path);

    refs_svc
        .pack_refs(client.request(
            pb::PackRefsRequest {
                repository: r(),
                all_refs: true,
            },
            &ctx,
        ))
        .await
        .unwrap();
    assert!(path.join("packed-refs").is_file());
    assert!(!path.join("refs/heads/main").exists());
    assert_fsck_clean(&path);

    repos
        .repack_incremental(client.request(pb::RepackIncrementalRequest { repository: r() }, &ctx))
        .await
        .unwrap();
    assert_fsck_clean(&path);

    let req = pb::GarbageCollectRequest {
        repository: r(),
        create_bitmap: true,
        prune: true,
    };
    repos
        .garbage_collect(client.request(req, &ctx))
        .await
        .unwrap();
    let has = |ext: &str| {
        std::fs::read_dir(path.join("objects/pack"))
            .unwrap()
            .any(|e| e.unwrap().path().extension().is_some_and(|x| x == ext))
    };
    assert!(has("bitmap"));
    assert_fsck_clean(&path);

    let req = pb::RepackFullRequest {
        repository: r(),
        create_bitmap: false,
    };
    repos.repack_full(client.request(req, &ctx)).await.unwrap();
    assert!(!has("bitmap"));
    assert_fsck_clean(&path);

    let req = pb::WriteCommitGraphRequest {
        repository: r(),
        split_strategy: 0,
    };
    repos
        .write_commit_graph(client.request(req, &ctx))
        .await
        .unwrap();
    assert!(
        path.join("objects/info/commit-graphs/commit-graph-chain")
            .is_file()
    );
    assert_fsck_clean(&path);

    repos
        .midx_repack(client.request(pb::MidxRepackRequest { repository: r() }, &ctx))
        .await
        .unwrap();
    assert!(path.join("objects/pack/multi-pack-index").is_file());
    assert_fsck_clean(&path);

    repos
        .optimize_repository(
            client.request(pb::OptimizeRepositoryRequest { repository: r() }, &ctx),
        )
        .await
        .unwrap();
    assert_fsck_clean(&path);
    assert_eq!(refs(&path), before);

    let missing = pb::GarbageCollectRequest {
        repository: a.repo("nope.git"),
        ..Default::default()
    };
    assert_code(
        repos.garbage_collect(client.request(missing, &ctx)).await,
        Code::NotFound,
        "repository does not exist",
    );
}

#[tokio::test]
async fn rename_and_remove_change_the_disk() {
    let a = TestNode::start("gitaly-1").await;
    populate(&a.path("old.git"));
    populate(&a.path("taken.git"));
    let client = a.client();
    let ctx = ctx();
    let mut repos = client.repository_service();
    let rename = |from: &str, to: &str| {
        client.request(
            pb::RenameRepositoryRequest {
                repository: a.repo(from),
                relative_path: to.to_owned(),
            },
            &ctx,
        )
    };
    assert_code(
        repos
            .rename_repository(rename("old.git", "taken.git"))
            .await,
        Code::AlreadyExists,
        "already exists",
    );
    let before = refs(&a.path("old.git"));
    repos
        .rename_repository(rename("old.git", "moved/new.git"))
        .await
        .unwrap();
    assert!(!a.path("old.git").exists());
    assert_eq!(refs(&a.path("moved/new.git")), before);
    assert_code(
        repos
            .rename_repository(rename("old.git", "other.git"))
            .await,
        Code::NotFound,
        "repository does not exist",
    );
    assert_code(
        repos
            .rename_repository(rename("moved/new.git", "../escape.git"))
            .await,
        Code::InvalidArgument,
        "escapes root",
    );

    let remove = || {
        client.request(
            pb::RemoveRepositoryRequest {
                repository: a.repo("moved/new.git"),
            },
            &ctx,
        )
    };
    repos.remove_repository(remove()).await.unwrap();
    assert!(!a.path("moved/new.git").exists());
    assert_code(
        repos.remove_repository(remove()).await,
        Code::NotFound,
        "repository does not exist",
    );
}

#[tokio::test]
async fn create_exists_and_checksum_agree_across_replicas() {
    let (a, b) = (
        TestNode::start("gitaly-1").await,
        TestNode::start("gitaly-2").await,
    );
    let ctx = ctx();
    let client = a.client();
    let mut repos = client.repository_service();
    let exists = |node: &TestNode, rel: &str| {
        let c = node.client();
        let req = c.request(
            pb::RepositoryExistsRequest {
                repository: node.repo(rel),
            },
            &ctx,
        );
        async move {
            c.repository_service()
                .repository_exists(req)
                .await
                .unwrap()
                .into_inner()
                .exists
        }
    };
    assert!(!exists(&a, "new.git").await);
    let create = || {
        client.request(
            pb::CreateRepositoryRequest {
                repository: a.repo("new.git"),
                default_branch: b"trunk".to_vec(),
                ..Default::default()
            },
            &ctx,
        )
    };
    repos.create_repository(create()).await.unwrap();
    assert!(exists(&a, "new.git").await);
    assert_eq!(
        git(&a.path("new.git"), &["symbolic-ref", "HEAD"]),
        "refs/heads/trunk"
    );
    assert_code(
        repos.create_repository(create()).await,
        Code::AlreadyExists,
        "already exists",
    );

    let checksum = |node: &TestNode, rel: &str| {
        let c = node.client();
        let req = c.request(
            pb::CalculateChecksumRequest {
                repository: node.repo(rel),
            },
            &ctx,
        );
        async move {
            c.repository_service()
                .calculate_checksum(req)
                .await
                .map(|r| r.into_inner().checksum)
        }
    };
    assert_eq!(checksum(&a, "new.git").await.unwrap(), "0".repeat(40));
    populate(&a.path("c.git"));
    replicate_between(&b, &a, "c.git").await.unwrap();
    let sum = checksum(&a, "c.git").await.unwrap();
    // Gitaly drops leading zero bytes, so a checksum may be shorter.
    assert!(!sum.is_empty() && sum.len() <= 40);
    assert_ne!(sum, "0".repeat(40));
    assert_eq!(checksum(&b, "c.git").await.unwrap(), sum);
    commit(&a.path("c.git"), "main", "diverge");
    assert_ne!(checksum(&a, "c.git").await.unwrap(), sum);
}

/// Gitaly's checksum computed here, apart from the node: the SHA-1 of each
/// `git show-ref --head` line naming one of `counted`, XORed, as the hex of
/// a big integer (no leading zero bytes).
fn expected_checksum(repo: &Path, counted: &[&str]) -> String {
    use sha1::{Digest, Sha1};
    let listing = git(repo, &["show-ref", "--head"]);
    let mut sum = [0u8; 20];
    let mut seen = Vec::new();
    for line in listing.lines() {
        let (_, name) = line.split_once(' ').unwrap();
        if counted.contains(&name) {
            seen.push(name);
            for (s, d) in sum.iter_mut().zip(Sha1::digest(line.as_bytes())) {
                *s ^= d;
            }
        }
    }
    seen.sort_unstable();
    let mut wanted = counted.to_vec();
    wanted.sort_unstable();
    assert_eq!(seen, wanted, "show-ref lists every counted ref");
    let first = sum.iter().position(|&b| b != 0).unwrap();
    hex::encode(&sum[first..])
}

#[tokio::test]
async fn checksum_counts_head_and_gitalys_namespaces_only_and_flags_broken_repositories() {
    let a = TestNode::start("gitaly-1").await;
    let ctx = ctx();
    let checksum = |rel: &str| {
        let c = a.client();
        let req = c.request(
            pb::CalculateChecksumRequest {
                repository: a.repo(rel),
            },
            &ctx,
        );
        async move {
            c.repository_service()
                .calculate_checksum(req)
                .await
                .map(|r| r.into_inner().checksum)
        }
    };

    let repo = a.path("sum.git");
    init_bare(&repo);
    let main = commit(&repo, "main", "one");
    let other = commit(&repo, "side", "two");
    let counted = [
        "HEAD",
        "refs/heads/main",
        "refs/heads/side",
        "refs/tags/v1",
        "refs/keep-around/k1",
        "refs/merge-requests/1/head",
        "refs/environments/production",
        "refs/notes/commits",
        // The pattern is unanchored: HEAD anywhere in the line counts.
        "refs/remotes/origin/HEAD",
    ];
    for name in &counted[3..] {
        git(&repo, &["update-ref", name, &other]);
    }
    let outside = [
        "refs/pipelines/7",
        "refs/remotes/origin/main",
        "refs/custom/x",
    ];
    for name in outside {
        git(&repo, &["update-ref", name, &main]);
    }
    let want = expected_checksum(&repo, &counted);
    assert_eq!(checksum("sum.git").await.unwrap(), want);
    // Refs outside the namespaces change nothing; counted ones do.
    git(&repo, &["update-ref", "refs/pipelines/7", &other]);
    assert_eq!(checksum("sum.git").await.unwrap(), want);
    git(&repo, &["update-ref", "refs/keep-around/k1", &main]);
    assert_ne!(checksum("sum.git").await.unwrap(), want);
    assert_eq!(
        checksum("sum.git").await.unwrap(),
        expected_checksum(&repo, &counted)
    );

    // HEAD unborn and only uncounted refs: a valid repository, all zeros.
    let bare = a.path("uncounted.git");
    init_bare(&bare);
    let blob = git_with_input(&bare, &["hash-object", "-w", "--stdin"], "x");
    let tree = git_with_input(&bare, &["mktree"], &format!("100644 blob {blob}\tf\n"));
    let lone = git(&bare, &["commit-tree", &tree, "-m", "lone"]);
    git(&bare, &["update-ref", "refs/pipelines/1", &lone]);
    assert_eq!(checksum("uncounted.git").await.unwrap(), "0".repeat(40));

    // Laid out like a repository but not one git recognises: DATA_LOSS.
    let broken = a.path("broken.git");
    init_bare(&broken);
    std::fs::write(broken.join("HEAD"), "not a ref\n").unwrap();
    assert_code(
        checksum("broken.git").await,
        Code::DataLoss,
        "not a git repository",
    );
    // No repository at all is NOT_FOUND, as Gitaly's locator answers.
    assert_code(
        checksum("absent.git").await,
        Code::NotFound,
        "does not exist",
    );
}

#[tokio::test]
async fn bad_missing_stale_and_wrong_version_tokens_are_refused_but_health_is_open() {
    let a = TestNode::start("gitaly-1").await;
    populate(&a.path("p.git"));
    let call = |authorization: Option<String>| {
        let wrong = client_for(&a.storage, &a.address(), "ignored");
        let mut req = tonic::Request::new(pb::RepositoryExistsRequest {
            repository: a.repo("p.git"),
        });
        if let Some(value) = authorization {
            req.metadata_mut()
                .insert("authorization", MetadataValue::try_from(value).unwrap());
        }
        async move {
            wrong
                .repository_service()
                .repository_exists(req)
                .await
                .map(|r| r.into_inner())
        }
    };
    let now = SystemTime::now();
    let good = format!("Bearer {}", v2_token(TOKEN, now));
    assert!(call(Some(good.clone())).await.unwrap().exists);
    let bad = format!("Bearer {}", v2_token("wrong", now));
    assert_code(call(Some(bad)).await, Code::Unauthenticated, "signature");
    assert_code(
        call(None).await,
        Code::Unauthenticated,
        "authentication required",
    );
    let stale = format!("Bearer {}", v2_token(TOKEN, now - Duration::from_secs(60)));
    assert_code(
        call(Some(stale)).await,
        Code::Unauthenticated,
        "outside the accepted window",
    );
    let v1 = good.replacen("v2.", "v1.", 1);
    assert_code(call(Some(v1)).await, Code::PermissionDenied, "version");

    let mut health = HealthClient::connect(format!("http://{}", a.addr))
        .await
        .unwrap();
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn paths_that_escape_the_storage_and_unknown_storages_are_refused() {
    let a = TestNode::start("gitaly-1").await;
    let outside = tempfile::tempdir().unwrap();
    populate(&outside.path().join("secret.git"));
    std::os::unix::fs::symlink(outside.path(), a.root().join("link")).unwrap();
    let client = a.client();
    let ctx = ctx();
    let mut repos = client.repository_service();
    for bad in [
        "../secret.git",
        "/etc",
        "a/../../x.git",
        "link/secret.git",
        "+gitaly/tmp",
    ] {
        let req = client.request(
            pb::RepositoryExistsRequest {
                repository: a.repo(bad),
            },
            &ctx,
        );
        assert_code(
            repos.repository_exists(req).await,
            Code::InvalidArgument,
            "",
        );
        let req = client.request(
            pb::RemoveRepositoryRequest {
                repository: a.repo(bad),
            },
            &ctx,
        );
        assert_code(
            repos.remove_repository(req).await,
            Code::InvalidArgument,
            "",
        );
    }
    assert!(outside.path().join("secret.git").exists());
    let unknown = pb::Repository {
        storage_name: "nope".into(),
        relative_path: "p.git".into(),
        ..Default::default()
    };
    let req = client.request(
        pb::RepositoryExistsRequest {
            repository: Some(unknown),
        },
        &ctx,
    );
    assert_code(
        repos.repository_exists(req).await,
        Code::InvalidArgument,
        "storage not found",
    );
}

#[tokio::test]
async fn fail_method_answers_its_code_and_failure_rate_one_fails_everything() {
    let faults = Faults {
        fail_methods: vec![parse_fail_method("GarbageCollect=unimplemented").unwrap()],
        ..Default::default()
    };
    let a = TestNode::start_with("gitaly-1", faults).await;
    populate(&a.path("p.git"));
    let client = a.client();
    let ctx = ctx();
    let mut repos = client.repository_service();
    let gc = pb::GarbageCollectRequest {
        repository: a.repo("p.git"),
        ..Default::default()
    };
    assert_code(
        repos.garbage_collect(client.request(gc, &ctx)).await,
        Code::Unimplemented,
        "fault",
    );
    let full = pb::RepackFullRequest {
        repository: a.repo("p.git"),
        create_bitmap: false,
    };
    repos.repack_full(client.request(full, &ctx)).await.unwrap();

    let flaky = TestNode::start_with(
        "gitaly-2",
        Faults {
            failure_rate: 1.0,
            ..Default::default()
        },
    )
    .await;
    let c = flaky.client();
    let req = c.request(
        pb::RepositoryExistsRequest {
            repository: flaky.repo("p.git"),
        },
        &ctx,
    );
    assert_code(
        c.repository_service().repository_exists(req).await,
        Code::Unavailable,
        "fault",
    );
    c.check_health(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn latency_is_added_to_every_call_but_health_checks() {
    let latency = Duration::from_millis(500);
    let a = TestNode::start_with(
        "gitaly-1",
        Faults {
            latency,
            ..Default::default()
        },
    )
    .await;
    let client = a.client();
    client.check_health(Duration::from_secs(5)).await.unwrap(); // connects
    let started = Instant::now();
    client.check_health(Duration::from_secs(5)).await.unwrap();
    assert!(
        started.elapsed() < latency,
        "health was delayed: {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let req = client.request(
        pb::RepositoryExistsRequest {
            repository: a.repo("p.git"),
        },
        &ctx(),
    );
    client
        .repository_service()
        .repository_exists(req)
        .await
        .unwrap();
    assert!(started.elapsed() >= latency, "only {:?}", started.elapsed());
}

/// The real binary, reading its address from its first line; killed on drop.
struct NodeProcess {
    child: Child,
    addr: SocketAddr,
}

impl NodeProcess {
    fn spawn(storage: &str, dir: &Path, extra: &[&str]) -> NodeProcess {
        Self::spawn_with(storage, dir, extra, Stdio::inherit())
    }

    /// The binary with its warnings and errors written to the file at `log`.
    fn spawn_logging_to(storage: &str, dir: &Path, log: &Path) -> NodeProcess {
        let file = std::fs::File::create(log).unwrap();
        Self::spawn_with(storage, dir, &[], Stdio::from(file))
    }

    fn spawn_with(storage: &str, dir: &Path, extra: &[&str], stderr: Stdio) -> NodeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_storage-node"))
            .args(["--listen", "127.0.0.1:0", "--token", TOKEN, "--log", "warn"])
            .arg("--storage")
            .arg(format!("{storage}={}", dir.display()))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        NodeProcess { child, addr }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_binary_serves_replication_from_an_in_process_source_and_its_fault_flags() {
    let a = TestNode::start("gitaly-1").await;
    populate(&a.path("p.git"));
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::spawn(
        "gitaly-2",
        dir.path(),
        &[
            "--fail-method",
            "RepackFull=failed_precondition",
            "--latency",
            "1ms",
        ],
    );
    let client = client_for("gitaly-2", &format!("tcp://{}", node.addr), TOKEN);
    client.check_health(Duration::from_secs(5)).await.unwrap();
    replicate(&client, "gitaly-2", &a, "p.git").await.unwrap();
    assert_eq!(refs(&dir.path().join("p.git")), refs(&a.path("p.git")));
    assert_fsck_clean(&dir.path().join("p.git"));
    let req = client.request(
        pb::RepackFullRequest {
            repository: Some(pb::Repository {
                storage_name: "gitaly-2".into(),
                relative_path: "p.git".into(),
                ..Default::default()
            }),
            create_bitmap: false,
        },
        &ctx(),
    );
    assert_code(
        client.repository_service().repack_full(req).await,
        Code::FailedPrecondition,
        "fault",
    );
}

#[tokio::test]
async fn midx_repack_of_a_repository_with_only_loose_objects_packs_them_first() {
    let a = TestNode::start("gitaly-1").await;
    let path = a.path("loose.git");
    populate(&path);
    // Commits made with plain git are loose; there is no pack to index.
    let packs = std::fs::read_dir(path.join("objects/pack"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(packs, 0, "the fixture should start without packs");
    let before = refs(&path);
    let client = a.client();
    let ctx = ctx();
    client
        .repository_service()
        .midx_repack(client.request(
            pb::MidxRepackRequest {
                repository: a.repo("loose.git"),
            },
            &ctx,
        ))
        .await
        .unwrap();
    assert!(path.join("objects/pack/multi-pack-index").is_file());
    assert_fsck_clean(&path);
    assert_eq!(refs(&path), before);
}
