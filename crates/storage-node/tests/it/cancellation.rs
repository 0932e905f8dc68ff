//! Cancelled calls against the `storage-node` binary: a client deadline or a
//! client that goes away in the middle of `ReplicateRepository` or
//! `GarbageCollect` must leave no git lock files in the replica, so the next
//! call succeeds; lock files a dead git left behind are removed by the next
//! write, which says so in the node's log.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Commits on the source's main branch at the start.
const COMMITS: usize = 300;
/// Branches spread over them; every round moves all of them, so each
/// replication is one ref transaction of this many updates.
const BRANCHES: usize = 100;
const TAGS: usize = 10;
/// Cancelled calls in all, half of each kind.
const ROUNDS: usize = 100;
/// What the node logs when it removes lock files.
const REMOVED_LOCKS: &str = "removed lock files";

const COMMITTER: &str = "Test <test@example.com>";

/// `data` of fast-import: the exact byte count, then the bytes.
fn data(text: &str) -> String {
    format!("data {}\n{text}\n", text.len())
}

/// The source repository: COMMITS commits on main, BRANCHES branches and
/// TAGS tags spread over them, made by one `git fast-import`. Returns main's
/// commits.
fn build_source(repo: &Path) -> Vec<String> {
    init_bare(repo);
    let mut stream = String::new();
    for i in 1..=COMMITS {
        stream += &format!("commit refs/heads/main\nmark :{i}\n");
        stream += &format!("committer {COMMITTER} {} +0000\n", 1_700_000_000 + i);
        stream += &data(&format!("commit {i}"));
        if i > 1 {
            stream += &format!("from :{}\n", i - 1);
        }
        stream += "M 644 inline file.txt\n";
        stream += &data(&format!("content {i}"));
        stream += "\n";
    }
    for b in 0..BRANCHES {
        stream += &format!("reset refs/heads/b/{b}\nfrom :{}\n\n", b % COMMITS + 1);
    }
    for t in 0..TAGS {
        stream += &format!("reset refs/tags/t{t}\nfrom :{}\n\n", t * 5 + 1);
    }
    testkit::git::git_with_input(repo, &["fast-import", "--quiet"], &stream);
    git(repo, &["rev-list", "main"])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// New work for the replica: two commits on main, every branch moved, three
/// branches deleted and two created, in one ref transaction on the source.
fn change_source(repo: &Path, commits: &mut Vec<String>, round: usize) {
    let mut stream = String::new();
    for k in 0..2 {
        stream += "commit refs/heads/main\n";
        stream += &format!(
            "committer {COMMITTER} {} +0000\n",
            1_800_000_000 + round * 2 + k
        );
        stream += &data(&format!("round {round}.{k}"));
        if k == 0 {
            stream += "from refs/heads/main^0\n";
        }
        stream += "M 644 inline file.txt\n";
        stream += &data(&format!("round {round}.{k}"));
        stream += "\n";
    }
    testkit::git::git_with_input(repo, &["fast-import", "--quiet"], &stream);
    commits.extend(
        git(repo, &["rev-list", "-n", "2", "main"])
            .lines()
            .map(str::to_owned),
    );
    let deleted: Vec<usize> = (0..3).map(|k| (round * 3 + k) % BRANCHES).collect();
    let mut updates = String::new();
    for b in 0..BRANCHES {
        if deleted.contains(&b) {
            updates += &format!("delete refs/heads/b/{b}\n");
        } else {
            let to = &commits[(b * 7 + round * 31) % commits.len()];
            updates += &format!("update refs/heads/b/{b} {to}\n");
        }
    }
    for k in 0..2 {
        let to = &commits[(round + k) % commits.len()];
        updates += &format!("update refs/heads/r/{round}/{k} {to}\n");
    }
    testkit::git::git_with_input(repo, &["update-ref", "--stdin"], &updates);
    // Few files on the source make snapshots quick to write and unpack.
    git(repo, &["pack-refs", "--all"]);
    if round.is_multiple_of(10) {
        git(repo, &["repack", "-a", "-d", "-q"]);
    }
}

/// Every `*.lock` file in the repository at `repo`.
fn lock_files(repo: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![repo.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "lock") {
                found.push(path.strip_prefix(repo).unwrap().to_path_buf());
            }
        }
    }
    found
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Replicate,
    GarbageCollect,
}

/// The node under test (the binary, logging to a file) and the in-process
/// source it replicates from.
struct Replica {
    source: TestNode,
    _node: NodeProcess,
    client: NodeClient,
    dir: TempDir,
}

impl Replica {
    async fn start() -> Replica {
        let source = TestNode::start("gitaly-1").await;
        let dir = tempfile::tempdir().unwrap();
        let node = NodeProcess::spawn_logging_to(
            "gitaly-2",
            &dir.path().join("repos"),
            &dir.path().join("node.log"),
        );
        let client = client_for("gitaly-2", &format!("tcp://{}", node.addr), TOKEN);
        client.check_health(Duration::from_secs(5)).await.unwrap();
        Replica {
            source,
            _node: node,
            client,
            dir,
        }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join("repos").join(relative)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap()
    }

    /// One call of `kind` on `relative`; `timeout`, when set, is sent as the
    /// gRPC deadline.
    async fn call(
        &self,
        kind: Call,
        relative: &str,
        timeout: Option<Duration>,
    ) -> Result<(), tonic::Status> {
        let ctx = CallContext::new(None, timeout.or(Some(Duration::from_secs(60))));
        let repo = |storage: &str| {
            Some(pb::Repository {
                storage_name: storage.to_owned(),
                relative_path: relative.to_owned(),
                ..Default::default()
            })
        };
        let mut service = self.client.repository_service();
        match kind {
            Call::Replicate => {
                let mut req = self.client.request(
                    pb::ReplicateRepositoryRequest {
                        repository: repo("gitaly-2"),
                        source: repo(&self.source.storage),
                    },
                    &ctx,
                );
                let servers = MetadataValue::try_from(servers_of(&self.source)).unwrap();
                req.metadata_mut().insert(GITALY_SERVERS, servers);
                service.replicate_repository(req).await.map(|_| ())
            }
            Call::GarbageCollect => {
                let req = self.client.request(
                    pb::GarbageCollectRequest {
                        repository: repo("gitaly-2"),
                        create_bitmap: false,
                        prune: false,
                    },
                    &ctx,
                );
                service.garbage_collect(req).await.map(|_| ())
            }
        }
    }

    async fn timed(&self, kind: Call, relative: &str) -> Duration {
        let started = Instant::now();
        self.call(kind, relative, None).await.unwrap();
        started.elapsed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_and_gc_cancelled_at_random_points_leave_no_locks_and_the_next_call_succeeds() {
    let started = Instant::now();
    let replica = Replica::start().await;
    let rel = "big.git";
    let src = replica.source.path(rel);
    let mut commits = build_source(&src);
    replica.call(Call::Replicate, rel, None).await.unwrap();
    // Cancellation points are drawn from 0 to what a whole call takes here,
    // so they fall in every phase of it.
    change_source(&src, &mut commits, ROUNDS);
    let whole_replicate = replica.timed(Call::Replicate, rel).await;
    let whole_gc = replica.timed(Call::GarbageCollect, rel).await;
    let seed: u64 = rand::random();
    eprintln!(
        "seed {seed}; a replication takes {whole_replicate:?}, a gc {whole_gc:?}; set up in {:?}",
        started.elapsed()
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut cut, mut completed) = (0, 0);
    for round in 0..ROUNDS {
        let kind = if round.is_multiple_of(2) {
            change_source(&src, &mut commits, round);
            Call::Replicate
        } else {
            Call::GarbageCollect
        };
        let whole = match kind {
            Call::Replicate => whole_replicate,
            Call::GarbageCollect => whole_gc,
        };
        let max_ms = u64::try_from(whole.as_millis()).unwrap().max(1);
        let delay = Duration::from_millis(rng.random_range(0..=max_ms));
        // Half the calls carry a deadline the node enforces; the others are
        // dropped by the client, which resets the stream.
        let by_deadline = round % 4 < 2;
        let outcome = if by_deadline {
            replica.call(kind, rel, Some(delay)).await
        } else {
            match tokio::time::timeout(delay, replica.call(kind, rel, None)).await {
                Ok(result) => result,
                Err(_) => Err(tonic::Status::cancelled("dropped by the client")),
            }
        };
        match outcome {
            Ok(()) => completed += 1,
            Err(s) if matches!(s.code(), Code::Cancelled | Code::DeadlineExceeded) => cut += 1,
            Err(s) => panic!("round {round}: {kind:?} cut after {delay:?} failed: {s:?}"),
        }
        if let Err(s) = replica.call(kind, rel, None).await {
            panic!(
                "round {round}: {kind:?} after one cut after {delay:?} (by {}) failed: {s:?}",
                if by_deadline { "deadline" } else { "drop" }
            );
        }
    }
    eprintln!(
        "{cut} calls cut, {completed} done before their deadline, in {:?}",
        started.elapsed()
    );
    assert!(cut >= ROUNDS / 4, "only {cut} of {ROUNDS} calls were cut");
    replica.call(Call::Replicate, rel, None).await.unwrap();
    let dst = replica.path(rel);
    assert_eq!(refs(&dst), refs(&src));
    assert_fsck_clean(&dst);
    assert_eq!(lock_files(&dst), Vec::<PathBuf>::new());
    // No call left lock files for the next one to remove.
    let log = replica.log();
    assert!(!log.contains(REMOVED_LOCKS), "{log}");
}

#[tokio::test]
async fn lock_files_of_a_dead_git_are_removed_by_the_next_replicate_and_gc_and_logged() {
    let replica = Replica::start().await;
    let rel = "p.git";
    let src = replica.source.path(rel);
    populate(&src);
    commit(&src, "x", "x one");
    replica.call(Call::Replicate, rel, None).await.unwrap();
    let dst = replica.path(rel);
    let dead_locks = ["HEAD.lock", "packed-refs.lock", "refs/heads/x.lock"];
    let leave_locks = || {
        for lock in dead_locks {
            // Fresh, as a git killed a moment ago leaves them.
            std::fs::write(dst.join(lock), "").unwrap();
        }
    };
    // Pack the replica's refs, so deleting one needs packed-refs.lock.
    git(&dst, &["pack-refs", "--all"]);
    leave_locks();

    // The replication must move HEAD, move x and delete a packed ref.
    commit(&src, "x", "x two");
    git(&src, &["update-ref", "-d", "refs/heads/stale"]);
    git(&src, &["symbolic-ref", "HEAD", "refs/heads/feature"]);
    replica.call(Call::Replicate, rel, None).await.unwrap();
    assert_eq!(refs(&dst), refs(&src));
    assert_eq!(lock_files(&dst), Vec::<PathBuf>::new());
    let log = replica.log();
    let removals: Vec<&str> = log.lines().filter(|l| l.contains(REMOVED_LOCKS)).collect();
    assert_eq!(removals.len(), 1, "{log}");
    for name in dead_locks.iter().chain(&[rel]) {
        assert!(removals[0].contains(name), "{name} not in {}", removals[0]);
    }

    leave_locks();
    replica.call(Call::GarbageCollect, rel, None).await.unwrap();
    assert_eq!(lock_files(&dst), Vec::<PathBuf>::new());
    assert_eq!(refs(&dst), refs(&src));
    assert_fsck_clean(&dst);
    let log = replica.log();
    assert_eq!(
        log.lines().filter(|l| l.contains(REMOVED_LOCKS)).count(),
        2,
        "{log}"
    );
}
