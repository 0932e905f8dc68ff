//! How the store's statements reach Postgres. Straight through the pool, or,
//! when `[database]` is a pooler in transaction mode (PgBouncer's
//! `pool_mode = transaction`), each statement in a transaction of its own
//! with an unnamed prepared statement.
//!
//! Why: sqlx prepares a statement and runs it in two round trips, each ended
//! by a Sync. A transaction-mode pooler may hand the second to another server
//! connection, where the statement (named and cached, or the unnamed one) is
//! missing or, worse, another one. Inside a transaction the pooler keeps one
//! server connection until COMMIT, so both halves meet.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryFutureExt, TryStreamExt};
use sqlx::postgres::{PgArguments, PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{
    AssertSqlSafe, Either, Execute, Executor, PgPool, Postgres, SqlSafeStr, SqlStr, Transaction,
};

/// The pool and how to run a statement on it; cheap to clone.
#[derive(Debug, Clone)]
pub struct StatementPool {
    pool: PgPool,
    /// `Some` when transaction-pooled: what opens each statement's transaction.
    begin: Option<SqlStr>,
}

impl StatementPool {
    /// Statements go straight through `pool`.
    pub fn direct(pool: PgPool) -> Self {
        StatementPool { pool, begin: None }
    }

    /// Each statement in a transaction of its own, with
    /// `statement_timeout_ms` set in it (the startup parameter that would set
    /// it for the session is refused by PgBouncer).
    pub fn transaction_pooled(pool: PgPool, statement_timeout_ms: Option<u128>) -> Self {
        let begin = match statement_timeout_ms {
            // A number of ours spliced in: safe.
            Some(ms) => {
                AssertSqlSafe(format!("BEGIN; SET LOCAL statement_timeout = {ms}")).into_sql_str()
            }
            None => "BEGIN".into_sql_str(),
        };
        StatementPool {
            pool,
            begin: Some(begin),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// What a query run inside [`Self::begin`]'s transaction should pass to
    /// `persistent`: a statement kept on a pooled server connection would
    /// outlive the client connection that knows it.
    pub fn persistent(&self) -> bool {
        self.begin.is_none()
    }

    /// A transaction for several statements (with the statement timeout when
    /// transaction-pooled).
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        match &self.begin {
            None => self.pool.begin().await,
            Some(begin) => self.pool.begin_with(begin.clone()).await,
        }
    }
}

/// A query as given, except never kept as a named prepared statement.
struct Unnamed<E>(E);

impl<'q, E: Execute<'q, Postgres>> Execute<'q, Postgres> for Unnamed<E> {
    fn sql(self) -> SqlStr {
        self.0.sql()
    }

    fn statement(&self) -> Option<&PgStatement> {
        self.0.statement()
    }

    fn take_arguments(&mut self) -> Result<Option<PgArguments>, sqlx::error::BoxDynError> {
        self.0.take_arguments()
    }

    fn persistent(&self) -> bool {
        false
    }
}

impl<'p> Executor<'p> for &'_ StatementPool {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        let Some(begin) = self.begin.clone() else {
            return self.pool.fetch_many(query);
        };
        let pool = self.pool.clone();
        // The whole answer is read before COMMIT; the store's statements
        // return bounded batches.
        async move {
            let mut tx = pool.begin_with(begin).await?;
            let items: Vec<_> = (&mut *tx).fetch_many(Unnamed(query)).try_collect().await?;
            tx.commit().await?;
            Ok(futures::stream::iter(items.into_iter().map(Ok)))
        }
        .try_flatten_stream()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        let Some(begin) = self.begin.clone() else {
            return self.pool.fetch_optional(query);
        };
        let pool = self.pool.clone();
        async move {
            let mut tx = pool.begin_with(begin).await?;
            let row = (&mut *tx).fetch_optional(Unnamed(query)).await?;
            tx.commit().await?;
            Ok(row)
        }
        .boxed()
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement, sqlx::Error>>
    where
        'p: 'e,
    {
        self.pool.prepare_with(sql, parameters)
    }

    fn describe<'e>(
        self,
        sql: SqlStr,
    ) -> BoxFuture<'e, Result<sqlx::Describe<Postgres>, sqlx::Error>>
    where
        'p: 'e,
    {
        self.pool.describe(sql)
    }
}
