//! The two databases behind one statement type: SQLite (the default) and PostgreSQL.
//!
//! Each backend keeps its own sqlx driver, pool and types (PostgreSQL's `LISTEN`, SQLite's
//! single writer); a statement is written once, with numbered parameters (`$1`) that both read,
//! and run on either. Where the dialects differ a statement carries both texts
//! ([`query_each`]). Values are bound through [`Value`], rows read through [`Row::try_get`],
//! which decodes with the driver of the row at hand.

use std::borrow::Cow;

use sqlx::postgres::{PgPool, PgRow, Postgres};
use sqlx::sqlite::{Sqlite, SqlitePool, SqliteRow};
use sqlx::{Decode, Row as _, Type};

use super::Backend;

/// A connection pool of either backend.
#[derive(Debug, Clone)]
pub(crate) enum Pool {
    /// SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

impl Pool {
    /// The backend this pool talks to.
    pub(crate) fn backend(&self) -> Backend {
        match self {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Starts a transaction.
    pub(crate) async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Pool::Sqlite(p) => Tx::Sqlite(p.begin().await?),
            Pool::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    /// Closes the pool, waiting for running queries.
    pub(crate) async fn close(&self) {
        match self {
            Pool::Sqlite(p) => p.close().await,
            Pool::Postgres(p) => p.close().await,
        }
    }
}

/// A transaction of either backend; dropped without [`Tx::commit`], it rolls back.
#[derive(Debug)]
pub(crate) enum Tx {
    /// SQLite.
    Sqlite(sqlx::Transaction<'static, Sqlite>),
    /// PostgreSQL.
    Postgres(sqlx::Transaction<'static, Postgres>),
}

impl Tx {
    /// Commits the transaction.
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }
    }
}

/// Where a statement runs: on a pool (its own short transaction) or inside a transaction.
pub(crate) enum On<'c> {
    /// A pool.
    Pool(&'c Pool),
    /// An open transaction.
    Tx(&'c mut Tx),
}

impl<'c> From<&'c Pool> for On<'c> {
    fn from(pool: &'c Pool) -> Self {
        On::Pool(pool)
    }
}

impl<'c> From<&'c mut Tx> for On<'c> {
    fn from(tx: &'c mut Tx) -> Self {
        On::Tx(tx)
    }
}

/// A value bound to a parameter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// Text, or NULL.
    Text(Option<String>),
    /// A 64-bit integer, or NULL.
    Int(Option<i64>),
    /// Bytes, or NULL.
    Bytes(Option<Vec<u8>>),
    /// A boolean (SQLite stores 0 or 1).
    Bool(bool),
}

macro_rules! value_from {
    ($($t:ty => |$v:ident| $e:expr;)*) => {
        $(impl From<$t> for Value {
            fn from($v: $t) -> Self {
                $e
            }
        })*
    };
}

value_from! {
    &str => |v| Value::Text(Some(v.to_owned()));
    String => |v| Value::Text(Some(v));
    &String => |v| Value::Text(Some(v.clone()));
    Option<&str> => |v| Value::Text(v.map(str::to_owned));
    Option<String> => |v| Value::Text(v);
    &Option<String> => |v| Value::Text(v.clone());
    i64 => |v| Value::Int(Some(v));
    u32 => |v| Value::Int(Some(v.into()));
    Option<i64> => |v| Value::Int(v);
    bool => |v| Value::Bool(v);
    &[u8] => |v| Value::Bytes(Some(v.to_vec()));
    Vec<u8> => |v| Value::Bytes(Some(v));
    &Vec<u8> => |v| Value::Bytes(Some(v.clone()));
    Option<&[u8]> => |v| Value::Bytes(v.map(<[u8]>::to_vec));
}

/// The text of a statement: one for both backends, or one each.
#[derive(Debug, Clone)]
enum Sql {
    Same(Cow<'static, str>),
    Each {
        sqlite: &'static str,
        postgres: &'static str,
    },
}

/// A statement with its bound values, ready to run on either backend.
#[derive(Debug, Clone)]
#[must_use = "a query does nothing until it is run"]
pub(crate) struct Query {
    sql: Sql,
    args: Vec<Value>,
}

/// A statement both backends read alike.
pub(crate) fn query(sql: impl Into<Cow<'static, str>>) -> Query {
    Query {
        sql: Sql::Same(sql.into()),
        args: Vec::new(),
    }
}

/// A statement written once per dialect, the parameters numbered alike in both.
pub(crate) fn query_each(sqlite: &'static str, postgres: &'static str) -> Query {
    Query {
        sql: Sql::Each { sqlite, postgres },
        args: Vec::new(),
    }
}

/// What a statement that returns no rows did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Done(u64);

impl Done {
    /// How many rows it inserted, changed or deleted.
    pub(crate) fn rows_affected(self) -> u64 {
        self.0
    }
}

/// Binds every value of `args` to a native query, in order.
macro_rules! bind_all {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for value in $args {
            q = match value {
                Value::Text(v) => q.bind(v),
                Value::Int(v) => q.bind(v),
                Value::Bytes(v) => q.bind(v),
                Value::Bool(v) => q.bind(v),
            };
        }
        q
    }};
}

/// Runs `$query` wherever `$on` points with the native call `$run` (e.g. `fetch_all`),
/// mapping the native result with `$map` (which sees the backend's row constructor).
macro_rules! run {
    ($query:expr, $on:expr, $run:ident, |$res:ident, $row:ident| $map:expr) => {{
        let Query { sql, args } = $query;
        match $on.into() {
            On::Pool(Pool::Sqlite(p)) => {
                let q = bind_all!(sqlx::query(sql.sqlite()), args);
                let $res = q.$run(p).await?;
                let $row = Row::Sqlite;
                $map
            }
            On::Pool(Pool::Postgres(p)) => {
                let q = bind_all!(sqlx::query(sql.postgres()), args);
                let $res = q.$run(p).await?;
                let $row = Row::Postgres;
                $map
            }
            On::Tx(Tx::Sqlite(t)) => {
                let q = bind_all!(sqlx::query(sql.sqlite()), args);
                let $res = q.$run(&mut **t).await?;
                let $row = Row::Sqlite;
                $map
            }
            On::Tx(Tx::Postgres(t)) => {
                let q = bind_all!(sqlx::query(sql.postgres()), args);
                let $res = q.$run(&mut **t).await?;
                let $row = Row::Postgres;
                $map
            }
        }
    }};
}

impl Sql {
    fn sqlite(&self) -> &str {
        match self {
            Sql::Same(s) => s,
            Sql::Each { sqlite, .. } => sqlite,
        }
    }

    fn postgres(&self) -> &str {
        match self {
            Sql::Same(s) => s,
            Sql::Each { postgres, .. } => postgres,
        }
    }
}

impl Query {
    /// Binds the next parameter.
    pub(crate) fn bind(mut self, value: impl Into<Value>) -> Self {
        self.args.push(value.into());
        self
    }

    /// Runs a statement that returns no rows.
    pub(crate) async fn execute<'c>(self, on: impl Into<On<'c>>) -> Result<Done, sqlx::Error> {
        run!(self, on, execute, |done, _row| Ok(Done(
            done.rows_affected()
        )))
    }

    /// Every row.
    pub(crate) async fn fetch_all<'c>(
        self,
        on: impl Into<On<'c>>,
    ) -> Result<Vec<Row>, sqlx::Error> {
        run!(self, on, fetch_all, |rows, row| Ok(rows
            .into_iter()
            .map(row)
            .collect()))
    }

    /// The first row, if any.
    pub(crate) async fn fetch_optional<'c>(
        self,
        on: impl Into<On<'c>>,
    ) -> Result<Option<Row>, sqlx::Error> {
        run!(self, on, fetch_optional, |found, row| Ok(found.map(row)))
    }

    /// The first row; [`sqlx::Error::RowNotFound`] when there is none.
    pub(crate) async fn fetch_one<'c>(self, on: impl Into<On<'c>>) -> Result<Row, sqlx::Error> {
        run!(self, on, fetch_one, |found, row| Ok(row(found)))
    }
}

/// A row of either backend.
pub(crate) enum Row {
    /// From SQLite.
    Sqlite(SqliteRow),
    /// From PostgreSQL.
    Postgres(PgRow),
}

impl Row {
    /// The value of a column (by name or position), decoded by the row's own driver.
    pub(crate) fn try_get<'r, T, I>(&'r self, index: I) -> Result<T, sqlx::Error>
    where
        I: sqlx::ColumnIndex<SqliteRow> + sqlx::ColumnIndex<PgRow>,
        T: Decode<'r, Sqlite> + Type<Sqlite> + Decode<'r, Postgres> + Type<Postgres>,
    {
        match self {
            Row::Sqlite(r) => r.try_get(index),
            Row::Postgres(r) => r.try_get(index),
        }
    }

    /// The value of a column the statement itself selects with this type; panics otherwise
    /// (a mistake in the program, never in the data: stored names go through `try_get`).
    pub(crate) fn get<'r, T, I>(&'r self, index: I) -> T
    where
        I: sqlx::ColumnIndex<SqliteRow> + sqlx::ColumnIndex<PgRow>,
        T: Decode<'r, Sqlite> + Type<Sqlite> + Decode<'r, Postgres> + Type<Postgres>,
    {
        match self {
            Row::Sqlite(r) => r.get(index),
            Row::Postgres(r) => r.get(index),
        }
    }
}
