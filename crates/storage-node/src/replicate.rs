//! ReplicateRepository, the target side: find the source node in the
//! `gitaly-servers` metadata, dial it with its own v2 tokens, download its
//! `GetSnapshot` tar into scratch space, and make the target's refs, HEAD and
//! objects those of the snapshot with `git fetch --prune` (see the module
//! docs of `storage_node` for why).

use crate::git::Git;
use crate::lifecycle::move_into_place;
use crate::node::StorageNode;
use crate::snapshot::unpack_snapshot;
use crate::storage::{RepoPath, io_status};
use gitaly_replicator::CallContext;
use gitaly_replicator::NodeClient;
use gitaly_replicator::{Node, NodeAddress, Secret};
use gitaly_wire::metadata::{GITALY_SERVERS, ServerInfo, decode_gitaly_servers};
use gitaly_wire::proto::gitaly as pb;
use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

/// Gitaly's answer when the source replica is not a repository; the
/// replicator matches this text.
pub const INVALID_SOURCE: &str = "invalid source repository";
/// How long a unary call to the source may take.
const SOURCE_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the source may pause in the middle of a snapshot.
const SNAPSHOT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The source named by a request: its repository and how to reach its node.
struct Source {
    repository: pb::Repository,
    client: NodeClient,
}

impl Source {
    fn from_request(
        metadata: &MetadataMap,
        source: Option<pb::Repository>,
    ) -> Result<Self, Status> {
        let repository = source.ok_or_else(|| Status::invalid_argument("empty Source"))?;
        if repository.storage_name.is_empty() || repository.relative_path.is_empty() {
            return Err(Status::invalid_argument(
                "source needs a storage name and a relative path",
            ));
        }
        let value = metadata
            .get(GITALY_SERVERS)
            .ok_or_else(|| {
                Status::invalid_argument("no gitaly-servers metadata: cannot reach the source")
            })?
            .to_str()
            .map_err(|_| Status::invalid_argument("gitaly-servers metadata is not ASCII"))?;
        let servers =
            decode_gitaly_servers(value).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ServerInfo { address, token } = servers
            .get(&repository.storage_name)
            .cloned()
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "gitaly-servers metadata names no storage {:?}",
                    repository.storage_name
                ))
            })?;
        let address: NodeAddress = address
            .parse()
            .map_err(|e: String| Status::invalid_argument(format!("source address: {e}")))?;
        let node = Node {
            storage: repository.storage_name.clone(),
            address,
            token: Secret::new(token),
        };
        let client =
            NodeClient::new("", &node).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Source { repository, client })
    }

    /// The source's failure, told as coming from the source; a missing
    /// repository there is Gitaly's "invalid source repository".
    fn failed(&self, status: &Status) -> Status {
        if status.code() == Code::NotFound {
            return Status::not_found(format!("{INVALID_SOURCE}: {}", status.message()));
        }
        Status::new(
            status.code(),
            format!(
                "source storage {:?} at {}: {}",
                self.repository.storage_name,
                self.client.address,
                status.message()
            ),
        )
    }

    async fn exists(&self) -> Result<bool, Status> {
        let ctx = CallContext::new(None, Some(SOURCE_CALL_TIMEOUT));
        let request = self.client.request(
            pb::RepositoryExistsRequest {
                repository: Some(self.repository.clone()),
            },
            &ctx,
        );
        let mut client = self.client.repository_service();
        self.client
            .call("RepositoryExists", &ctx, client.repository_exists(request))
            .await
            .map(|r| r.exists)
            .map_err(|e| self.failed(&Status::new(e.code, e.message)))
    }

    /// Streams the source's snapshot into the file at `path`.
    async fn download(&self, path: &Path) -> Result<(), Status> {
        let request = self.client.request(
            pb::GetSnapshotRequest {
                repository: Some(self.repository.clone()),
            },
            &CallContext::default(),
        );
        let mut client = self.client.repository_service();
        let mut stream = client
            .get_snapshot(request)
            .await
            .map_err(|s| self.failed(&s))?
            .into_inner();
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| io_status("creating the snapshot file", e))?;
        loop {
            let message = tokio::time::timeout(SNAPSHOT_IDLE_TIMEOUT, stream.message())
                .await
                .map_err(|_| Status::unavailable("the source stalled while sending its snapshot"))?
                .map_err(|s| self.failed(&s))?;
            match message {
                Some(chunk) => file
                    .write_all(&chunk.data)
                    .await
                    .map_err(|e| io_status("writing the snapshot file", e))?,
                None => break,
            }
        }
        file.flush()
            .await
            .map_err(|e| io_status("writing the snapshot file", e))
    }
}

/// Makes the request's target repository a copy of its source.
pub async fn replicate(
    node: &StorageNode,
    metadata: &MetadataMap,
    request: pb::ReplicateRepositoryRequest,
) -> Result<(), Status> {
    let target = node.repo(request.repository.as_ref())?;
    let source = Source::from_request(metadata, request.source)?;
    if source.repository.storage_name == target.storage.name
        && source.repository.relative_path == target.relative
    {
        return Err(Status::invalid_argument(
            "source and target are the same repository",
        ));
    }
    if !source.exists().await? {
        return Err(Status::not_found(INVALID_SOURCE));
    }
    let scratch = target
        .storage
        .temp_dir("replicate")
        .map_err(|e| io_status("creating scratch directory", e))?;
    let archive = scratch.path().join("snapshot.tar");
    let snapshot = scratch.path().join("snapshot");
    source.download(&archive).await?;
    let (from, into) = (archive.clone(), snapshot.clone());
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir(&into)?;
        let file = std::fs::File::open(&from)?;
        unpack_snapshot(std::io::BufReader::new(file), &into)?;
        std::fs::remove_file(&from)
    })
    .await
    .map_err(|e| Status::internal(format!("unpacking task failed: {e}")))?
    .map_err(|e| Status::internal(format!("unpacking the source's snapshot: {e}")))?;

    // Only now, with the data here, wait for the target: the lock is never
    // held while the source is slow.
    let guard = node.locks().lock(&target.path).await;
    let source_storage = source.repository.storage_name;
    let work = |target: RepoPath| async move {
        let outcome = sync(&target, &snapshot, scratch.path()).await;
        // Deleting the scratch copy is blocking work.
        let _ = tokio::task::spawn_blocking(move || drop(scratch)).await;
        let outcome = outcome?;
        tracing::info!(
            storage = %target.storage.name,
            relative_path = %target.relative,
            %source_storage,
            ?outcome,
            "replicated repository"
        );
        Ok(())
    };
    node.change(&target, guard, work).await
}

/// What a replication did to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    UpToDate,
}

/// Refs as `<oid> <ref>` lines, sorted by name.
async fn refs(git: &Git<'_>) -> Result<String, Status> {
    Ok(git
        .run(["for-each-ref", "--format=%(objectname) %(refname)"])
        .await?
        .stdout_text())
}

fn head(repo: &Path) -> Result<String, Status> {
    std::fs::read_to_string(repo.join("HEAD"))
        .map(|h| h.trim().to_owned())
        .map_err(|e| io_status("reading HEAD", e))
}

/// Gives `target` the snapshot's refs, objects and HEAD; nothing is written
/// when they already agree. An empty directory in the target's place (a
/// leftover) is replaced; anything else there that is not a repository is an error.
async fn sync(target: &RepoPath, snapshot: &Path, scratch: &Path) -> Result<Outcome, Status> {
    let home = &target.storage.home;
    let wanted_refs = refs(&Git::in_repo(home, snapshot)).await?;
    let wanted_head = head(snapshot)?;
    if target.exists() {
        let git = target.git();
        if refs(&git).await? == wanted_refs && head(&target.path)? == wanted_head {
            return Ok(Outcome::UpToDate);
        }
        fetch(&git, snapshot).await?;
        set_head(&git, &target.path, &wanted_head).await?;
        Ok(Outcome::Updated)
    } else {
        if target.path.exists() {
            std::fs::remove_dir(&target.path).map_err(|e| {
                Status::failed_precondition(format!(
                    "{:?} exists and is not a repository: {e}",
                    target.relative
                ))
            })?;
        }
        let fresh = scratch.join("repo");
        Git::outside(home, scratch)
            .run([
                OsStr::new("init"),
                OsStr::new("--bare"),
                OsStr::new("--quiet"),
                OsStr::new("--"),
                fresh.as_os_str(),
            ])
            .await?;
        let git = Git::in_repo(home, &fresh);
        fetch(&git, snapshot).await?;
        set_head(&git, &fresh, &wanted_head).await?;
        move_into_place(&fresh, &target.path)?;
        Ok(Outcome::Created)
    }
}

/// Mirrors every ref of `snapshot`: added, moved and deleted. Git checks that
/// the received objects are complete before it moves any ref.
async fn fetch(git: &Git<'_>, snapshot: &Path) -> Result<(), Status> {
    let flags = [
        "fetch",
        "--quiet",
        "--prune",
        "--force",
        "--atomic",
        "--no-tags",
        "--no-write-fetch-head",
        "--no-auto-gc",
    ];
    let args = flags
        .iter()
        .map(OsStr::new)
        .chain([snapshot.as_os_str(), OsStr::new("+refs/*:refs/*")]);
    git.run(args).await?;
    Ok(())
}

/// Points HEAD where the source's points. The value comes from another
/// machine, so it must look like a ref or an object id before git sees it.
async fn set_head(git: &Git<'_>, repo: &Path, wanted: &str) -> Result<(), Status> {
    if head(repo)? == wanted {
        return Ok(());
    }
    let bad_head = || Status::internal(format!("the source's HEAD is not usable: {wanted:?}"));
    match wanted.strip_prefix("ref:").map(str::trim) {
        Some(symref) => {
            let plain = !symref.chars().any(|c| c.is_whitespace() || c.is_control());
            if !symref.starts_with("refs/") || !plain {
                return Err(bad_head());
            }
            git.run(["symbolic-ref", "HEAD", symref]).await?
        }
        None => {
            let object_id =
                matches!(wanted.len(), 40 | 64) && wanted.chars().all(|c| c.is_ascii_hexdigit());
            if !object_id {
                return Err(bad_head());
            }
            git.run(["update-ref", "--no-deref", "HEAD", wanted])
                .await?
        }
    };
    Ok(())
}
