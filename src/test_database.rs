//! For the crate's own tests: a database of the test's own (testkit's) with
//! the migrations applied, and the repository store on it.

use crate::store::RepositoryStore;

pub struct TestDatabase {
    pub store: RepositoryStore,
    /// URL of this test's own database.
    pub url: String,
    /// Dropping it drops the database.
    _database: testkit::db::TestDatabase,
}

impl TestDatabase {
    /// A fresh, migrated database.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        db.store.migrate().await.unwrap();
        db
    }

    /// A fresh database without migrations.
    pub async fn empty() -> Self {
        let database = testkit::db::TestDatabase::new().await;
        TestDatabase {
            store: RepositoryStore::new(database.pool.clone()),
            url: database.url.clone(),
            _database: database,
        }
    }
}
