//! Praefect's generation rule, and recording generations.

use super::{REPO, VS, repository_generation};
use crate::store::ReplicatedGeneration;
use crate::test_database::TestDatabase;
use sqlx::Connection;

// --- replicated_generation ---

#[tokio::test]
async fn replicated_generation_is_up_to_date_when_the_target_holds_the_source_generation() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 3, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();

    let decision = db
        .store
        .replicated_generation(VS, REPO, "gitaly-1", "gitaly-2")
        .await
        .unwrap();

    assert_eq!(decision, ReplicatedGeneration::UpToDate { generation: 3 });
}

#[tokio::test]
async fn replicated_generation_refuses_a_downgrade() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 2, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    db.store
        .set_generation(VS, REPO, "gitaly-2", 5)
        .await
        .unwrap();

    let decision = db
        .store
        .replicated_generation(VS, REPO, "gitaly-1", "gitaly-2")
        .await
        .unwrap();

    assert_eq!(
        decision,
        ReplicatedGeneration::Downgrade {
            target_generation: 5,
            source_generation: 2
        }
    );
}

#[tokio::test]
async fn replicated_generation_refuses_a_downgrade_from_a_source_without_a_record() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-2", 0, &["gitaly-2"])
        .await
        .unwrap();

    let decision = db
        .store
        .replicated_generation(VS, REPO, "gitaly-1", "gitaly-2")
        .await
        .unwrap();

    assert_eq!(
        decision,
        ReplicatedGeneration::Downgrade {
            target_generation: 0,
            source_generation: -1
        }
    );
}

#[tokio::test]
async fn replicated_generation_replicates_to_a_target_without_a_record() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 4, &["gitaly-1"])
        .await
        .unwrap();

    let decision = db
        .store
        .replicated_generation(VS, REPO, "gitaly-1", "gitaly-2")
        .await
        .unwrap();

    assert_eq!(decision, ReplicatedGeneration::Replicate { generation: 4 });
}

#[tokio::test]
async fn replicated_generation_replicates_to_an_older_target() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    db.store
        .set_generation(VS, REPO, "gitaly-1", 2)
        .await
        .unwrap();

    let decision = db
        .store
        .replicated_generation(VS, REPO, "gitaly-1", "gitaly-2")
        .await
        .unwrap();

    assert_eq!(decision, ReplicatedGeneration::Replicate { generation: 2 });
}

#[tokio::test]
async fn replicated_generation_replicates_minus_one_when_neither_replica_has_a_record() {
    let db = TestDatabase::new().await;

    let decision = db
        .store
        .replicated_generation(VS, REPO, "gitaly-1", "gitaly-2")
        .await
        .unwrap();

    assert_eq!(decision, ReplicatedGeneration::Replicate { generation: -1 });
}

// --- set_generation ---

#[tokio::test]
async fn set_generation_inserts_a_missing_replica_and_raises_the_repository() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();

    assert!(
        db.store
            .set_generation(VS, REPO, "gitaly-2", 2)
            .await
            .unwrap()
    );

    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        Some(2)
    );
    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-1").await.unwrap(),
        Some(1)
    );
    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(2)));
}

#[tokio::test]
async fn set_generation_raises_an_older_replica_and_is_idempotent() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();

    assert!(
        db.store
            .set_generation(VS, REPO, "gitaly-2", 3)
            .await
            .unwrap()
    );
    // Redelivered: same answer, same state.
    assert!(
        db.store
            .set_generation(VS, REPO, "gitaly-2", 3)
            .await
            .unwrap()
    );

    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        Some(3)
    );
    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(3)));
}

#[tokio::test]
async fn set_generation_never_lowers_a_replica() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 5, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();

    assert!(
        !db.store
            .set_generation(VS, REPO, "gitaly-2", 4)
            .await
            .unwrap()
    );

    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        Some(5)
    );
    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(5)));
}

#[tokio::test]
async fn set_generation_does_not_lower_the_repository() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 5, &["gitaly-1"])
        .await
        .unwrap();

    assert!(
        db.store
            .set_generation(VS, REPO, "gitaly-2", 3)
            .await
            .unwrap()
    );

    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        Some(3)
    );
    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(5)));
}

#[tokio::test]
async fn set_generation_raises_a_repository_whose_generation_is_null() {
    let db = TestDatabase::new().await;
    sqlx::query("INSERT INTO repositories (virtual_storage, relative_path) VALUES ($1, $2)")
        .bind(VS)
        .bind(REPO)
        .execute(db.store.pool())
        .await
        .unwrap();

    assert!(
        db.store
            .set_generation(VS, REPO, "gitaly-1", 0)
            .await
            .unwrap()
    );

    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(0)));
    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-1").await.unwrap(),
        Some(0)
    );
}

#[tokio::test]
async fn set_generation_skips_minus_one() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();

    assert!(
        !db.store
            .set_generation(VS, REPO, "gitaly-2", -1)
            .await
            .unwrap()
    );

    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        None
    );
}

#[tokio::test]
async fn set_generation_writes_nothing_without_a_repository_row() {
    let db = TestDatabase::new().await;

    assert!(
        !db.store
            .set_generation(VS, REPO, "gitaly-2", 1)
            .await
            .unwrap()
    );

    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        None
    );
    assert_eq!(repository_generation(&db.store, REPO).await, None);
}

// --- create_repository ---

#[tokio::test]
async fn create_repository_again_keeps_the_id_and_never_lowers() {
    let db = TestDatabase::new().await;
    let id = db
        .store
        .create_repository(VS, REPO, "gitaly-1", 2, &["gitaly-1"])
        .await
        .unwrap();

    let again = db
        .store
        .create_repository(
            VS,
            REPO,
            "gitaly-2",
            1,
            &["gitaly-1", "gitaly-2", "gitaly-2"],
        )
        .await
        .unwrap();

    assert_eq!(again, id);
    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-1").await.unwrap(),
        Some(2)
    );
    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        Some(1)
    );
    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(2)));
}

// --- the write's plan ---

/// The nested loops of a text plan whose inner side is a CTE scan, and the
/// subplans over a CTE scan that are not hashed: each reads the whole CTE
/// again for every row of its outer side.
fn loops_over_a_cte(plan: &[String]) -> Vec<String> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut found = Vec::new();
    for (i, line) in plan.iter().enumerate() {
        let Some(col) = line
            .find("Nested Loop")
            .or_else(|| line.find("SubPlan ").filter(|_| indent(line) > 0))
        else {
            continue;
        };
        // Children are the `->` lines two columns in, up to the next line
        // at the node's own depth or shallower.
        let children: Vec<&str> = plan[i + 1..]
            .iter()
            .take_while(|l| indent(l) > col)
            .filter(|l| indent(l) == col + 2 && l.trim_start().starts_with("->"))
            .map(|l| l.trim_start())
            .collect();
        let rescans_a_cte = if line.contains("Nested Loop") {
            children
                .get(1)
                .is_some_and(|c| c.starts_with("->  CTE Scan"))
        } else {
            // The closing parenthesis: `SubPlan 9` is not `SubPlan 90`.
            let name = line.trim();
            children
                .first()
                .is_some_and(|c| c.starts_with("->  CTE Scan"))
                && !plan.iter().any(|l| l.contains(&format!("hashed {name})")))
        };
        if rescans_a_cte {
            found.push(format!("{}\n{}", line.trim(), children.join("\n")));
        }
    }
    found
}

/// The write runs on a plan made once per connection (a generic plan), which
/// expects about one row of each CTE: a join or check between two CTEs then
/// becomes a loop over one for every row of the other, n² for a batch of n
/// jobs (7 of 10 ms for a batch of 128, when the order check was a join).
#[tokio::test]
async fn the_generation_writes_generic_plan_never_rescans_a_cte_for_each_row() {
    let db = TestDatabase::new().await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("SET plan_cache_mode = force_generic_plan")
        .execute(&mut conn)
        .await
        .unwrap();
    let prepare = format!(
        "PREPARE write (text[], text[], text[], bigint[], text[], bigint[], int[], timestamptz[],
                        bigint[]) AS {}",
        crate::store::generations::set_generations_sql()
    );
    // Our own statement, with no input in it.
    sqlx::raw_sql(sqlx::AssertSqlSafe(prepare))
        .execute(&mut conn)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN EXECUTE write('{v}', '{r}', '{s}', '{1}', '{x}', '{1}', '{1}',
                               '{2026-01-01 00:00:00+00}', '{1}')",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();

    assert!(
        plan.iter().any(|l| l.contains("CTE ordered")),
        "not the write's plan:\n{}",
        plan.join("\n")
    );
    let loops = loops_over_a_cte(&plan);
    assert!(
        loops.is_empty(),
        "rescans a CTE per row:\n{}\n\nin:\n{}",
        loops.join("\n\n"),
        plan.join("\n")
    );
}
