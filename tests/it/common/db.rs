//! A test database with the replicator's migrations applied, and the
//! repository store on it.

use gitaly_replicator::RepositoryStore;

pub struct TestDatabase {
    pub store: RepositoryStore,
    /// URL of this test's own database.
    pub url: String,
    pub name: String,
    database: testkit::db::TestDatabase,
}

impl TestDatabase {
    /// A fresh, migrated database.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        db.store.migrate().await.unwrap();
        db
    }

    /// A fresh database without migrations, for tests that prepare the schema
    /// themselves first.
    pub async fn empty() -> Self {
        let database = testkit::db::TestDatabase::new().await;
        TestDatabase {
            store: RepositoryStore::new(database.pool.clone()),
            url: database.url.clone(),
            name: database.name.clone(),
            database,
        }
    }

    /// Another store on the same database with a pool of its own, as a
    /// second replicator process would have.
    pub async fn second_store(&self) -> RepositoryStore {
        RepositoryStore::new(self.database.second_pool().await)
    }

    /// The id of the repository at `relative_path`, if there is one.
    pub async fn repository_id(&self, virtual_storage: &str, relative_path: &str) -> Option<i64> {
        self.database
            .repository_id(virtual_storage, relative_path)
            .await
    }
}
