//! Every maintenance change: the RPC the target receives, with its params.

use super::*;

// --- maintenance ---

#[tokio::test]
async fn gc_sends_garbage_collect_with_both_params_to_the_target_and_changes_no_rows() {
    let calls = run_maintenance(&[
        Change::GarbageCollect {
            create_bitmap: true,
            prune: false,
        },
        Change::GarbageCollect {
            create_bitmap: false,
            prune: true,
        },
    ])
    .await;

    assert_eq!(
        requests(&calls),
        [
            RecordedRequest::GarbageCollect(pb::GarbageCollectRequest {
                repository: target_repo(),
                create_bitmap: true,
                prune: false,
            }),
            RecordedRequest::GarbageCollect(pb::GarbageCollectRequest {
                repository: target_repo(),
                create_bitmap: false,
                prune: true,
            }),
        ]
    );
    assert_eq!(methods(&calls), ["GarbageCollect", "GarbageCollect"]);
}

#[tokio::test]
async fn repack_full_sends_create_bitmap_to_the_target_and_changes_no_rows() {
    let calls = run_maintenance(&[
        Change::RepackFull {
            create_bitmap: true,
        },
        Change::RepackFull {
            create_bitmap: false,
        },
    ])
    .await;

    assert_eq!(
        requests(&calls),
        [
            RecordedRequest::RepackFull(pb::RepackFullRequest {
                repository: target_repo(),
                create_bitmap: true,
            }),
            RecordedRequest::RepackFull(pb::RepackFullRequest {
                repository: target_repo(),
                create_bitmap: false,
            }),
        ]
    );
    assert_eq!(methods(&calls), ["RepackFull", "RepackFull"]);
}

#[tokio::test]
async fn repack_incremental_sends_repack_incremental_to_the_target_and_changes_no_rows() {
    let calls = run_maintenance(&[Change::RepackIncremental]).await;

    assert_eq!(
        requests(&calls),
        [RecordedRequest::RepackIncremental(
            pb::RepackIncrementalRequest {
                repository: target_repo(),
            }
        )]
    );
    assert_eq!(methods(&calls), ["RepackIncremental"]);
}

#[tokio::test]
async fn cleanup_sends_cleanup_to_the_target_and_changes_no_rows() {
    let calls = run_maintenance(&[Change::Cleanup]).await;

    assert_eq!(
        requests(&calls),
        [RecordedRequest::Cleanup(pb::CleanupRequest {
            repository: target_repo(),
        })]
    );
    assert_eq!(methods(&calls), ["Cleanup"]);
}

#[tokio::test]
async fn pack_refs_sends_all_refs_to_the_target_ref_service_and_changes_no_rows() {
    let calls = run_maintenance(&[
        Change::PackRefs { all_refs: true },
        Change::PackRefs { all_refs: false },
    ])
    .await;

    assert_eq!(
        requests(&calls),
        [
            RecordedRequest::PackRefs(pb::PackRefsRequest {
                repository: target_repo(),
                all_refs: true,
            }),
            RecordedRequest::PackRefs(pb::PackRefsRequest {
                repository: target_repo(),
                all_refs: false,
            }),
        ]
    );
    assert_eq!(methods(&calls), ["PackRefs", "PackRefs"]);
}

#[tokio::test]
async fn write_commit_graph_sends_the_size_multiple_split_strategy_to_the_target_and_changes_no_rows()
 {
    let calls = run_maintenance(&[Change::WriteCommitGraph {
        split_strategy: SplitStrategy::SizeMultiple,
    }])
    .await;

    assert_eq!(
        requests(&calls),
        [RecordedRequest::WriteCommitGraph(
            pb::WriteCommitGraphRequest {
                repository: target_repo(),
                // Gitaly's SplitStrategy enum: SizeMultiple = 0.
                split_strategy: 0,
            }
        )]
    );
    assert_eq!(methods(&calls), ["WriteCommitGraph"]);
}

#[tokio::test]
async fn midx_repack_sends_midx_repack_to_the_target_and_changes_no_rows() {
    let calls = run_maintenance(&[Change::MidxRepack]).await;

    assert_eq!(
        requests(&calls),
        [RecordedRequest::MidxRepack(pb::MidxRepackRequest {
            repository: target_repo(),
        })]
    );
    assert_eq!(methods(&calls), ["MidxRepack"]);
}

#[tokio::test]
async fn optimize_repository_sends_optimize_repository_to_the_target_and_changes_no_rows() {
    let calls = run_maintenance(&[Change::OptimizeRepository]).await;

    assert_eq!(
        requests(&calls),
        [RecordedRequest::OptimizeRepository(
            pb::OptimizeRepositoryRequest {
                repository: target_repo(),
            }
        )]
    );
    assert_eq!(methods(&calls), ["OptimizeRepository"]);
}

pub(super) fn maintenance_changes() -> [(Change, &'static str); 8] {
    [
        (
            Change::GarbageCollect {
                create_bitmap: true,
                prune: true,
            },
            "GarbageCollect",
        ),
        (
            Change::RepackFull {
                create_bitmap: true,
            },
            "RepackFull",
        ),
        (Change::RepackIncremental, "RepackIncremental"),
        (Change::Cleanup, "Cleanup"),
        (Change::PackRefs { all_refs: true }, "PackRefs"),
        (
            Change::WriteCommitGraph {
                split_strategy: SplitStrategy::SizeMultiple,
            },
            "WriteCommitGraph",
        ),
        (Change::MidxRepack, "MidxRepack"),
        (Change::OptimizeRepository, "OptimizeRepository"),
    ]
}

/// A job's dispatch future is allocated for every job in flight: it holds
/// only its kind's future, and a maintenance job's does not carry the size
/// of an update's.
#[tokio::test]
async fn a_maintenance_jobs_dispatch_future_is_small() {
    let n = TwoNodes::start().await;
    let maintenance = job(Change::OptimizeRepository);
    let update = job(Change::Update);
    let target = n.replicator.target(&maintenance).unwrap();
    let ctx = crate::gitaly::CallContext::new(None, None);
    let dispatch = std::mem::size_of_val(&n.replicator.replicate_in_order(&maintenance, None));
    let maintain = std::mem::size_of_val(&n.replicator.maintain(&maintenance, target, &ctx));
    let update = std::mem::size_of_val(&n.replicator.update(&update, target, &ctx, None));
    eprintln!("futures: dispatch {dispatch} B, maintenance {maintain} B, update {update} B");
    assert!(dispatch <= 256, "{dispatch} B");
    assert!(maintain * 2 <= update, "{maintain} B against {update} B");
}
