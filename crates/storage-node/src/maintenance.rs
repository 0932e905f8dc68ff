//! The maintenance RPCs, each the git command Gitaly ran for it (v14), on a
//! repository the caller has locked and checked.

use crate::storage::RepoPath;
use gitaly_wire::proto::gitaly::write_commit_graph_request::SplitStrategy;
use tonic::Status;

/// `gc` keeps the call in the foreground, so the answer means it is done.
const FOREGROUND: [&str; 2] = ["-c", "gc.autoDetach=false"];

fn bitmaps(create_bitmap: bool) -> String {
    format!("repack.writeBitmaps={create_bitmap}")
}

/// GarbageCollect: `git gc`, pruning every unreachable object when `prune`
/// and none otherwise, with bitmaps when `create_bitmap`.
pub async fn garbage_collect(
    repo: &RepoPath,
    create_bitmap: bool,
    prune: bool,
) -> Result<(), Status> {
    let prune = if prune { "--prune=now" } else { "--no-prune" };
    let bitmaps = bitmaps(create_bitmap);
    repo.git()
        .run(
            FOREGROUND
                .iter()
                .copied()
                .chain(["-c", &bitmaps, "gc", "--quiet", prune]),
        )
        .await?;
    Ok(())
}

/// RepackFull: every object into one pack, unreachable ones loosened.
pub async fn repack_full(repo: &RepoPath, create_bitmap: bool) -> Result<(), Status> {
    let bitmaps = bitmaps(create_bitmap);
    repo.git()
        .run(["-c", &bitmaps, "repack", "-A", "-d", "-l", "--quiet"])
        .await?;
    Ok(())
}

/// RepackIncremental: loose objects into a new pack.
pub async fn repack_incremental(repo: &RepoPath) -> Result<(), Status> {
    repo.git().run(["repack", "-d", "-l", "--quiet"]).await?;
    Ok(())
}

/// PackRefs: every ref into `packed-refs`.
pub async fn pack_refs(repo: &RepoPath) -> Result<(), Status> {
    repo.git().run(["pack-refs", "--all"]).await?;
    Ok(())
}

/// WriteCommitGraph: a split commit-graph chain over every reachable commit,
/// merged by size multiple (the only strategy Gitaly defines).
pub async fn write_commit_graph(repo: &RepoPath, strategy: i32) -> Result<(), Status> {
    match SplitStrategy::try_from(strategy) {
        Ok(SplitStrategy::SizeMultiple) => {}
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unsupported split strategy: {strategy}"
            )));
        }
    }
    // A monolithic graph (as `git gc` writes) is replaced by a chain, as
    // Gitaly does; a chain is extended and merged by size.
    let monolithic = repo.path.join("objects/info/commit-graph").is_file();
    let split = if monolithic {
        "--split=replace"
    } else {
        "--split"
    };
    repo.git()
        .run([
            "commit-graph",
            "write",
            "--reachable",
            split,
            "--size-multiple=4",
            "--changed-paths",
        ])
        .await?;
    Ok(())
}

/// MidxRepack: write the multi-pack index, drop packs it no longer needs,
/// and repack what it covers. A repository whose objects are all loose (a
/// small one after a fetch) has nothing to index: git refuses with "no pack
/// files to index", so its loose objects are packed first.
pub async fn midx_repack(repo: &RepoPath) -> Result<(), Status> {
    let git = repo.git();
    if !has_pack(repo) {
        git.run(["repack", "-d", "-l", "--quiet"]).await?;
    }
    let midx = ["-c", "core.multiPackIndex=true", "multi-pack-index"];
    git.run(midx.iter().copied().chain(["write"])).await?;
    git.run(midx.iter().copied().chain(["expire"])).await?;
    git.run(midx.iter().copied().chain(["repack", "--batch-size=0"]))
        .await?;
    Ok(())
}

fn has_pack(repo: &RepoPath) -> bool {
    std::fs::read_dir(repo.path.join("objects/pack"))
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".pack"))
        })
        .unwrap_or(false)
}

/// OptimizeRepository: what `git gc --auto` finds worth doing, then a fresh
/// commit-graph.
pub async fn optimize(repo: &RepoPath) -> Result<(), Status> {
    repo.git()
        .run(
            FOREGROUND
                .iter()
                .copied()
                .chain(["gc", "--auto", "--quiet"]),
        )
        .await?;
    write_commit_graph(repo, SplitStrategy::SizeMultiple as i32).await
}
