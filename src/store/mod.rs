//! Durable state in SQLite or PostgreSQL: every SQL statement of the program.
//!
//! The store URL picks the backend (`store/db.rs`): `sqlite://FILE` (the default; the file is created
//! on first start) or `postgres://…` (a database several instances may share). The migrations
//! of the backend (`migrations/` for SQLite, `migrations/postgres/` for PostgreSQL, one twin
//! per version) are applied at every start. Queries are plain SQL over a small pool and one
//! writing connection; every write is one short transaction. One file per table family:
//!
//! | module | tables |
//! |---|---|
//! | [`bots`] | `bots`, `bot_keys` (keys, certificates) |
//! | [`rotation`] | `bot_next_keys`, `bot_retired_certs`: certificate rotation |
//! | [`pins`] | `peer_pins`, `trust_audit`: peers' keys and every decision about them |
//! | [`tunnels`] | `tunnels`: the session table's history |
//! | [`instances`] | `instances`: the processes serving the store, and their heartbeats |
//! | [`events`] | `events`: the per-bot logs, their delivery states and cursor |
//! | [`webhooks`] | `webhooks`, `delivery_attempts` |
//! | [`messages`] | `messages`: what bots send, and its status |
//! | [`tokens`] | `bot_tokens` |
//! | [`sealed`] | secrets at rest: private keys and webhook secrets sealed with the store key |
//!
//! Below it only the configuration's types (a handler, a secret) and the engine's enums: it
//! imports nothing of the component's layers above. A stored value that none of its type's
//! values matches is an error ([`StoreError::Unreadable`]), never a default.

// The tests' throwaway databases, on each backend (shared with the integration tests).
#[cfg(test)]
#[path = "../../tests/common/database.rs"]
#[macro_use]
mod test_database;

pub mod bots;
pub(crate) mod db;
pub mod events;
pub mod instances;
pub mod messages;
pub mod owners;
pub mod pins;
pub mod rotation;
pub mod sealed;
pub mod tokens;
pub mod tunnels;
pub mod webhooks;

pub use bots::{BotRecord, StoredBot};
pub use events::{EventRecord, NewEvent};
pub use instances::{InstanceRecord, serving_instance};
pub use messages::{MessageRecord, MessageStatus, OutMsg};
pub use owners::{BotOwner, Claim, Lease, OwnerRecord};
pub use pins::{AuditEntry, FirstUse, PeerPin, PinAction, PinChange};
pub use rotation::{NextCertificate, RetiredCertificate};
pub use sealed::StoreKey;
pub use tokens::TokenInfo;
pub use tunnels::{
    PeerIdentityRecord, PeerTrust, SasSide, SasState, SasStatus, TunnelFilter, TunnelId,
    TunnelRecord,
};
pub use webhooks::{Attempt, DeadLetter, Outcome, PendingEvent, Webhook};

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use crate::config::StoreBackend as Backend;
use db::{Pool, Row, query};

use xtls::certs::{CertError, rfc3339};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed a query.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// The migrations could not be applied.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored key or certificate is unreadable.
    #[error("stored bot identity unreadable: {0}")]
    Identity(#[from] CertError),
    /// A sealed secret cannot be opened: no store key, or another one.
    #[error("{0}")]
    Sealed(String),
    /// A row that must exist is missing.
    #[error("{0} not found")]
    NotFound(String),
    /// A row with the same key exists.
    #[error("{0} already exists")]
    Duplicate(String),
    /// A concurrent writer changed what this write depended on.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Another instance runs the bot now: this one may not write for it.
    #[error("not the owner: {0}")]
    NotOwner(String),
    /// A stored value is none of the values its column may hold.
    #[error("stored value unreadable: {0}")]
    Unreadable(String),
    /// The store URL names no backend this program has.
    #[error("{0}")]
    Unsupported(String),
    /// Another process holds the store ([`claim_sole_instance`]), or the claim failed.
    #[error("{0}")]
    InUse(String),
}

impl From<xtls::UnknownName> for StoreError {
    fn from(e: xtls::UnknownName) -> Self {
        StoreError::Unreadable(e.to_string())
    }
}

/// Reads a column holding one of the engine's enums by its stable name (the engine does not
/// depend on sqlx, so these are stored by name and parsed back); an unknown name is an error.
fn named<T>(row: &Row, column: &str) -> Result<T, StoreError>
where
    T: FromStr<Err = xtls::UnknownName>,
{
    Ok(row.try_get::<&str, _>(column)?.parse()?)
}

/// `$from, $from+1, …`: `count` numbered parameters for a list built at run time (`IN (…)`).
/// Statements number their parameters (`$1`), which SQLite and PostgreSQL both read.
fn params(from: usize, count: usize) -> String {
    (from..from + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The current time as RFC 3339, with sub-second precision (listings sort on it).
pub fn now() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    /// Readers.
    pool: Pool,
    /// The one writing connection: writers queue here, in order (and, on SQLite, without its
    /// sleep-and-retry busy handler).
    writer: Pool,
    /// The key secrets are sealed with, once in use ([`Store::use_key`]).
    sealing: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<StoreKey>>>,
    /// This process's instance id, once registered ([`Store::register_instance`]).
    instance: std::sync::Arc<std::sync::OnceLock<String>>,
}

/// Whether the writer connection may be reused: not inside a transaction, in SQLite's view
/// or in sqlx's. After a failed write (a full disk, an I/O error) SQLite may roll a
/// transaction back by itself or keep it open while sqlx believes otherwise; every later
/// "committed" write would then go into a transaction nobody commits. Such a connection is
/// closed (SQLite rolls back what it held) and the pool opens a fresh one.
async fn writer_is_clean(conn: &mut sqlx::SqliteConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Connection as _;
    // BEGIN fails inside a transaction; it takes no lock, so a busy database does not matter.
    let clean = sqlx::query("BEGIN").execute(&mut *conn).await.is_ok()
        && sqlx::query("ROLLBACK").execute(&mut *conn).await.is_ok()
        && !conn.is_in_transaction();
    if !clean {
        tracing::warn!("the store's writer connection was left inside a transaction; reopening it");
    }
    Ok(clean)
}

impl Store {
    /// Opens (creating a SQLite file when missing) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        match backend_of(url)? {
            Backend::Sqlite => Self::open_sqlite(url).await,
            Backend::Postgres => Self::open_postgres(url).await,
        }
    }

    /// Opens an existing database read-only, as it is (no migration): for the offline
    /// commands, which must neither leave an empty store behind a mistyped path nor change
    /// the schema under a running instance of another version.
    pub async fn open_read_only(url: &str) -> Result<Store, StoreError> {
        let pool = match backend_of(url)? {
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(url)?
                    .read_only(true)
                    .create_if_missing(false)
                    .busy_timeout(Duration::from_secs(5));
                Pool::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(1)
                        .connect_with(options)
                        .await?,
                )
            }
            Backend::Postgres => {
                let options = PgConnectOptions::from_str(url)?
                    .options([("default_transaction_read_only", "on")]);
                Pool::Postgres(
                    PgPoolOptions::new()
                        .max_connections(1)
                        .connect_with(options)
                        .await?,
                )
            }
        };
        Ok(Store {
            writer: pool.clone(),
            pool,
            sealing: Default::default(),
            instance: Default::default(),
        })
    }

    async fn open_sqlite(url: &str) -> Result<Store, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .after_release(|conn, _| Box::pin(writer_is_clean(conn)))
            .connect_with(options.clone())
            .await?;
        let migrating = lock_sqlite_migrations(url).await?;
        sqlx::migrate!("./migrations").run(&writer).await?;
        drop(migrating);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        Ok(Store {
            pool: Pool::Sqlite(pool),
            writer: Pool::Sqlite(writer),
            sealing: Default::default(),
            instance: Default::default(),
        })
    }

    async fn open_postgres(url: &str) -> Result<Store, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("xtls-component");
        let writer = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        // Several instances may start at once: the migrator holds an advisory lock meanwhile.
        sqlx::migrate!("./migrations/postgres").run(&writer).await?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        Ok(Store {
            pool: Pool::Postgres(pool),
            writer: Pool::Postgres(writer),
            sealing: Default::default(),
            instance: Default::default(),
        })
    }

    /// The backend this store runs on.
    pub fn backend(&self) -> Backend {
        self.pool.backend()
    }

    /// The reading pool.
    fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The writing connection (every INSERT, UPDATE and DELETE goes through it).
    fn writer(&self) -> &Pool {
        &self.writer
    }

    /// Closes the pool, waiting for running queries.
    pub async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }

    /// Proves the database accepts writes.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        query("INSERT INTO health (id, checked_at) VALUES (1, $1) ON CONFLICT(id) DO UPDATE SET checked_at = excluded.checked_at")
            .bind(now())
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

/// The backend a store URL names: `sqlite:` or `postgres:`/`postgresql:`.
pub fn backend_of(url: &str) -> Result<Backend, StoreError> {
    Backend::of_url(url).map_err(StoreError::Unsupported)
}

/// The store URL as it may be shown in logs and errors: a PostgreSQL URL without its
/// password and parameters (`postgres://USER@HOST:PORT/DATABASE`), a SQLite URL as it is.
pub fn display_url(url: &str) -> String {
    if !matches!(backend_of(url), Ok(Backend::Postgres)) {
        return url.to_owned();
    }
    match PgConnectOptions::from_str(url) {
        Ok(o) => format!(
            "postgres://{}@{}:{}/{}",
            o.get_username(),
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or_default()
        ),
        Err(_) => "postgres://(an unreadable URL)".into(),
    }
}

/// The claim of one process on a store, held while it lives, released however it ends: an
/// advisory lock on `<file>.instance` for SQLite (released by the system), a session advisory
/// lock for PostgreSQL (released by the server when the claiming connection ends).
#[derive(Debug)]
pub struct SoleInstance {
    _held: Held,
}

#[derive(Debug)]
#[expect(dead_code, reason = "held, never read: dropping it releases the claim")]
enum Held {
    File(std::fs::File),
    Postgres(sqlx::PgConnection),
}

/// The PostgreSQL advisory lock an instance serving a store holds ("xtls" and 1).
const INSTANCE_LOCK: i64 = 0x7874_6c73_0000_0001;

/// Claims the store at `url` for this process alone: a second instance would close the first
/// one's tunnels as stale at its start and answer for bots the first one owns. `None` for an
/// in-memory SQLite store, which no one shares.
pub async fn claim_sole_instance(url: &str) -> Result<Option<SoleInstance>, StoreError> {
    match backend_of(url)? {
        Backend::Sqlite => claim_sqlite_file(url),
        Backend::Postgres => claim_postgres(url).await.map(Some),
    }
}

/// The connection that holds (or waits for) the instance lock. The server's TCP keepalive is
/// short on it, so that the server sees a vanished holder (a host that died without closing
/// its connections) in about 11 seconds, not the system's two hours, and releases its lock.
async fn claim_connection(url: &str) -> Result<sqlx::PgConnection, StoreError> {
    use sqlx::Connection as _;
    let options = PgConnectOptions::from_str(url)?
        .application_name("xtls-component")
        .options([
            ("tcp_keepalives_idle", "5"),
            ("tcp_keepalives_interval", "2"),
            ("tcp_keepalives_count", "3"),
        ]);
    Ok(sqlx::PgConnection::connect_with(&options).await?)
}

impl SoleInstance {
    /// Waits, as a standby, until this process holds the PostgreSQL store's instance lock:
    /// until the instance that holds it stops, or its connection is seen gone. A failed
    /// connection is retried every `retry`, with a warning.
    pub async fn wait_for(url: &str, retry: Duration) -> Result<SoleInstance, StoreError> {
        loop {
            let attempt = async {
                let mut conn = claim_connection(url).await?;
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(INSTANCE_LOCK)
                    .execute(&mut conn)
                    .await?;
                Ok::<_, StoreError>(conn)
            };
            match attempt.await {
                Ok(conn) => {
                    return Ok(SoleInstance {
                        _held: Held::Postgres(conn),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, store = %display_url(url), "standby: cannot reach the store; retrying");
                    tokio::time::sleep(retry).await;
                }
            }
        }
    }

    /// Resolves when the claim is lost: the connection that holds a PostgreSQL lock failed or
    /// stopped answering (checked every `every`), so another instance may hold it now. Never
    /// resolves for a SQLite file, whose lock lasts as long as the process.
    pub async fn lost(&mut self, every: Duration) -> StoreError {
        let Held::Postgres(conn) = &mut self._held else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(every).await;
            let check = sqlx::query("SELECT 1").execute(&mut *conn);
            match tokio::time::timeout(every * 3, check).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return StoreError::Db(e),
                Err(_) => {
                    return StoreError::InUse(format!(
                        "the store did not answer within {:?}",
                        every * 3
                    ));
                }
            }
        }
    }
}

async fn claim_postgres(url: &str) -> Result<SoleInstance, StoreError> {
    let mut conn = claim_connection(url).await?;
    let claimed: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(INSTANCE_LOCK)
        .fetch_one(&mut conn)
        .await?;
    if claimed {
        return Ok(SoleInstance {
            _held: Held::Postgres(conn),
        });
    }
    // Who holds it, as far as this account may see (pg_stat_activity hides other roles').
    let holder: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT a.client_addr::text, a.backend_start::text FROM pg_locks l \
         JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted \
         AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
    )
    .bind(INSTANCE_LOCK)
    .fetch_optional(&mut conn)
    .await
    .unwrap_or(None);
    let from = match holder {
        Some((Some(addr), Some(since))) => format!(" (connected from {addr} since {since})"),
        Some((None, Some(since))) => format!(" (connected since {since})"),
        _ => String::new(),
    };
    Err(StoreError::InUse(format!(
        "another xtls-component{from} already serves the store {}: one instance serves a store; \
         stop the other one, or give this one a database of its own",
        display_url(url)
    )))
}

/// The file `<store file><suffix>` beside a SQLite store, opened and created if missing, for
/// a lock; `None` for an in-memory database, which no other process can open.
fn sqlite_lock_file(
    url: &str,
    suffix: &str,
) -> Result<Option<(std::path::PathBuf, std::fs::File)>, StoreError> {
    if url.contains(":memory:") || url.contains("mode=memory") {
        return Ok(None);
    }
    let options = SqliteConnectOptions::from_str(url)?;
    let mut path = options.get_filename().as_os_str().to_owned();
    path.push(suffix);
    let path = std::path::PathBuf::from(path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::InUse(format!("cannot open {}: {e}", path.display())))?;
    Ok(Some((path, file)))
}

/// Waits for, then holds, an exclusive lock on the file `<store>.migrate`, for one process at
/// a time to migrate a SQLite store: two processes opening a new store at once would otherwise
/// both create its tables, and one would fail. `None` for an in-memory database.
async fn lock_sqlite_migrations(url: &str) -> Result<Option<std::fs::File>, StoreError> {
    let Some((path, file)) = sqlite_lock_file(url, ".migrate")? else {
        return Ok(None);
    };
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .map_err(std::io::Error::other)
        .flatten()
        .map(Some)
        .map_err(|e| {
            StoreError::InUse(format!(
                "cannot lock {} to migrate the store: {e}",
                path.display()
            ))
        })
}

fn claim_sqlite_file(url: &str) -> Result<Option<SoleInstance>, StoreError> {
    let Some((path, lock)) = sqlite_lock_file(url, ".instance")? else {
        return Ok(None);
    };
    match lock.try_lock() {
        Ok(()) => {
            use std::io::Write as _;
            let mut writing = &lock;
            let _ = lock.set_len(0);
            let _ = writeln!(writing, "{}", std::process::id());
            Ok(Some(SoleInstance {
                _held: Held::File(lock),
            }))
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let pid = if holder.is_empty() {
                String::new()
            } else {
                format!(" (pid {holder})")
            };
            Err(StoreError::InUse(format!(
                "another xtls-component{pid} already uses the store {}: a SQLite store serves one \
                 instance; stop the other one, or give this one a store of its own",
                path.with_extension("").display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::InUse(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    pub(crate) use super::test_database::TestDb;
    use super::*;
    use crate::config::{BotTrust, Handler};
    use xtls::certs::{BotIdentity, Fingerprint};
    use xtls::tunnel::{PeerAuth, Role, State};

    /// A bot record on `bots.example.org` with the defaults tests rely on.
    pub(crate) fn test_bot(localpart: &str, handler: Handler) -> BotRecord {
        BotRecord {
            jid: format!("{localpart}@bots.example.org"),
            localpart: localpart.into(),
            handler,
            peer_auth: PeerAuth::Required,
            trust: BotTrust::Tofu,
            encrypted_only: false,
            created_at: now(),
        }
    }

    #[test]
    fn a_tunnel_record_clones_every_field() {
        let key = xtls::tunnel::TunnelKey {
            local: "echo@bots.example.org".into(),
            peer: "alice@example.net/x".into(),
        };
        let mut full = TunnelRecord::new(
            "t1".into(),
            "echo@bots.example.org",
            &key,
            Role::Responder,
            State::Open,
            now(),
        );
        full.tls_version = Some("TLSv1_3".into());
        full.cipher_suite = Some("TLS13_AES_128_GCM_SHA256".into());
        full.peer_identity = PeerIdentityRecord {
            spki_sha256: Some("AA:BB".into()),
            trust: PeerTrust::TofuNew,
        };
        (
            full.stanzas_in,
            full.stanzas_out,
            full.bytes_in,
            full.bytes_out,
        ) = (1, 2, 3, 4);
        full.established_at = Some(now());
        full.closed_at = Some(now());
        full.close_reason = Some("idle".into());
        assert_eq!(full.clone(), full);
        let mut other = TunnelRecord::new(
            "t2".into(),
            "b@c",
            &key,
            Role::Initiator,
            State::Starting,
            now(),
        );
        other.clone_from(&full);
        assert_eq!(other, full);
    }

    /// A store in a fresh directory; the caller removes the directory.
    pub(crate) async fn temp_store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "xtls-store-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}/test.db", dir.display());
        (Store::open(&url).await.unwrap(), dir)
    }

    on_each_backend!(
        private_keys_and_webhook_secrets_are_sealed_with_the_store_key,
        pins_set_over_the_api_are_audited,
        bots_keys_pins_and_tunnels_round_trip,
        an_unknown_stored_value_is_an_error_not_a_default,
        messages_keep_their_history_and_webhook_attempts_their_outcomes,
        bots_are_read_a_page_at_a_time,
        two_instances_migrate_an_empty_database_at_once,
    );

    async fn two_instances_migrate_an_empty_database_at_once(db: TestDb) {
        let (a, b) = tokio::join!(Store::open(&db.url), Store::open(&db.url));
        let (a, b) = (a.unwrap(), b.unwrap());
        let (first, second) = tokio::join!(a.register_instance(None), b.register_instance(None));
        assert_ne!(first.unwrap(), second.unwrap());
        assert_eq!(a.instances().await.unwrap().len(), 2);
        let bot = test_bot("echo", Handler::Echo);
        a.insert_bot(&bot, &BotIdentity::generate(&bot.jid).unwrap())
            .await
            .unwrap();
        assert_eq!(b.list_bots().await.unwrap().len(), 1);
    }

    async fn bots_are_read_a_page_at_a_time(db: TestDb) {
        let store = Store::open(&db.url).await.unwrap();
        for name in ["delta", "alpha", "echo", "charlie", "bravo"] {
            let bot = test_bot(name, Handler::Echo);
            let id = BotIdentity::generate(&bot.jid).unwrap();
            store.insert_bot(&bot, &id).await.unwrap();
        }
        let mut pages = Vec::new();
        let mut after = String::new();
        loop {
            let page = store.load_bots_after(&after, 2).await.unwrap();
            let Some(last) = page.last() else { break };
            after.clone_from(&last.record.jid);
            pages.push(
                page.iter()
                    .map(|b| b.record.localpart.clone())
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(
            pages,
            [
                vec!["alpha", "bravo"],
                vec!["charlie", "delta"],
                vec!["echo"]
            ]
        );
        assert_eq!(store.load_bots().await.unwrap().len(), 5);
        store.close().await;
    }

    async fn messages_keep_their_history_and_webhook_attempts_their_outcomes(db: TestDb) {
        let store = Store::open(&db.url).await.unwrap();
        let bot = test_bot("news", Handler::Api);
        let id = BotIdentity::generate(&bot.jid).unwrap();
        store.insert_bot(&bot, &id).await.unwrap();
        let msg = |n: u32| OutMsg {
            id: format!("msg_{n}"),
            to: "alice@example.net".into(),
            stanza: xtls::xml::parse_stanza(
                "<message xmlns='jabber:client'><body>hi</body></message>",
            )
            .unwrap(),
            reopen: n.is_multiple_of(2),
        };
        store
            .insert_message(&bot.jid, &msg(1), Some("k1"))
            .await
            .unwrap();
        assert!(matches!(
            store.insert_message(&bot.jid, &msg(2), Some("k1")).await,
            Err(StoreError::Duplicate(_))
        ));
        store.insert_message(&bot.jid, &msg(2), None).await.unwrap();
        store
            .update_message("msg_1", MessageStatus::Sent, None, None)
            .await
            .unwrap();
        store
            .update_message("msg_1", MessageStatus::Failed, Some("peer gone"), None)
            .await
            .unwrap();
        store
            .set_message_tunnel("msg_1", &"t9".into(), None)
            .await
            .unwrap();
        let one = store.message_by_key(&bot.jid, "k1").await.unwrap().unwrap();
        assert_eq!(
            (one.id.as_str(), one.status),
            ("msg_1", MessageStatus::Failed)
        );
        assert_eq!(one.reason.as_deref(), Some("peer gone"));
        assert_eq!(one.tunnel_id, Some("t9".into()));
        let history: Vec<(&str, &serde_json::Value)> = one
            .history
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["status"].as_str().unwrap(), &h["reason"]))
            .collect();
        assert_eq!(
            history,
            [
                ("accepted", &serde_json::Value::Null),
                ("sent", &serde_json::Value::Null),
                ("failed", &serde_json::json!("peer gone"))
            ]
        );
        let unfinished = store
            .unfinished_messages(&bot.jid, "9999-01-01T00:00:00Z")
            .await
            .unwrap();
        assert_eq!(
            unfinished
                .iter()
                .map(|m| (m.id.as_str(), m.reopen))
                .collect::<Vec<_>>(),
            [("msg_2", true)]
        );
        assert_eq!(
            store.bots_with_unfinished_messages().await.unwrap(),
            [bot.jid.clone()].into()
        );

        let hook = Webhook {
            url: "https://hooks.example.org/x".into(),
            secret: crate::config::Secret::new("whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ="),
            timeout_ms: 5000,
            max_in_flight: 8,
            last_success_at: None,
            last_error: None,
        };
        store.put_webhook(&bot.jid, &hook).await.unwrap();
        let event = NewEvent {
            kind: "message.received",
            tunnel_id: None,
            peer: None,
            data: serde_json::json!({}),
        };
        store
            .append_events(&bot.jid, 0, &[event.clone(), event.clone(), event], None)
            .await
            .unwrap();
        let pending = store.pending_events(&bot.jid, 0, 10).await.unwrap();
        assert_eq!(pending.len(), 3);
        let attempt = |seq: u64, status: Option<u16>| Attempt {
            event_id: pending[seq as usize - 1].event.id.clone(),
            seq,
            at: now(),
            status,
            error: status.is_none().then(|| "timed out".to_owned()),
            duration_ms: 12,
        };
        let retry = Outcome::Retry { at_ms: 1_000 };
        store
            .record_attempt(&bot.jid, &attempt(1, None), 500, &retry)
            .await
            .unwrap();
        store
            .record_attempt(&bot.jid, &attempt(1, Some(204)), 500, &Outcome::Delivered)
            .await
            .unwrap();
        store
            .record_attempt(&bot.jid, &attempt(2, None), 600, &Outcome::Dead)
            .await
            .unwrap();
        store
            .record_attempt(&bot.jid, &attempt(3, None), 700, &Outcome::Dead)
            .await
            .unwrap();
        assert_eq!(store.event_counts(&bot.jid).await.unwrap(), (0, 2));
        let attempts = store.attempts(&bot.jid, 10).await.unwrap();
        assert_eq!(
            attempts
                .iter()
                .map(|a| (a.seq, a.status))
                .collect::<Vec<_>>(),
            [(3, None), (2, None), (1, Some(204)), (1, None)],
            "newest first"
        );
        let dead = store.dead_letters(&bot.jid).await.unwrap();
        assert_eq!(
            dead.iter().map(|d| (d.seq, d.attempts)).collect::<Vec<_>>(),
            [(2, 1), (3, 1)]
        );
        let stored = store.webhook(&bot.jid).await.unwrap().unwrap();
        assert!(stored.last_success_at.is_some());
        assert_eq!(stored.last_error.as_deref(), Some("timed out"));
        assert_eq!(store.retry_dead(&bot.jid, Some(&[2, 7])).await.unwrap(), 1);
        assert_eq!(store.event_counts(&bot.jid).await.unwrap(), (1, 1));
        assert_eq!(store.drop_dead(&bot.jid, None).await.unwrap(), 1);
        assert_eq!(store.event_counts(&bot.jid).await.unwrap(), (1, 0));
        let again = store.pending_events(&bot.jid, 0, 10).await.unwrap();
        assert_eq!(
            (again.len(), again[0].attempts, again[0].first_attempt_ms),
            (1, 0, None)
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_sqlite_store_is_claimed_by_one_instance_at_a_time() {
        let dir = std::env::temp_dir().join(format!("xtls-claim-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}/x.db", dir.display());
        let first = claim_sole_instance(&url).await.unwrap();
        assert!(first.is_some());
        let refused = claim_sole_instance(&url).await.unwrap_err().to_string();
        assert!(
            refused.contains(&format!("(pid {})", std::process::id()))
                && refused.contains("x.db")
                && refused.contains("serves one instance"),
            "{refused}"
        );
        drop(first);
        assert!(
            claim_sole_instance(&url).await.unwrap().is_some(),
            "released with its holder"
        );
        assert!(
            claim_sole_instance("sqlite::memory:")
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_postgres_store_is_claimed_by_one_instance_at_a_time() {
        let db = TestDb::postgres().await;
        let first = claim_sole_instance(&db.url).await.unwrap();
        assert!(first.is_some());
        let refused = claim_sole_instance(&db.url).await.unwrap_err().to_string();
        assert!(
            refused.contains("already serves the store postgres://")
                && refused.contains("connected from 127.0.0.1"),
            "{refused}"
        );
        drop(first);
        // The server releases the lock when it sees the connection end.
        let mut again = None;
        for _ in 0..100 {
            if let Ok(claim) = claim_sole_instance(&db.url).await {
                again = claim;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(again.is_some(), "released with its holder");
    }

    #[test]
    fn a_postgres_url_is_shown_without_its_password() {
        let url = "postgres://xtls:s3cret@db.example.org:5433/bots?sslmode=disable&password=s3cret";
        assert_eq!(display_url(url), "postgres://xtls@db.example.org:5433/bots");
        assert_eq!(display_url("sqlite://x.db"), "sqlite://x.db");
        let err = backend_of("mysql://root:s3cret@h/db")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"mysql\"") && !err.contains("s3cret"),
            "{err}"
        );
    }

    async fn private_keys_and_webhook_secrets_are_sealed_with_the_store_key(db: TestDb) {
        let store = Store::open(&db.url).await.unwrap();
        let url = &db.url;
        let id = BotIdentity::generate("echo@bots.example.org").unwrap();
        let bot = test_bot("echo", Handler::Echo);
        // Written before any key is in use (a store from an earlier version): plain.
        store.insert_bot(&bot, &id).await.unwrap();
        let hook = Webhook {
            url: "https://hooks.example.org/x".into(),
            secret: crate::config::Secret::new("whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ="),
            timeout_ms: 5000,
            max_in_flight: 8,
            last_success_at: None,
            last_error: None,
        };
        store.put_webhook(&bot.jid, &hook).await.unwrap();
        let raw = |store: Store| async move {
            let row = query("SELECT k.key_der, w.secret FROM bot_keys k JOIN webhooks w ON w.bot_jid = k.bot_jid")
                .fetch_one(&store.pool)
                .await
                .unwrap();
            (row.get::<Vec<u8>, _>(0), row.get::<String, _>(1))
        };
        assert_eq!(raw(store.clone()).await.0, id.key_der(), "plain before");

        let (key, text) = StoreKey::generate();
        assert_eq!(store.use_key(key).await.unwrap(), 2, "both sealed in place");
        let (key_der, secret) = raw(store.clone()).await;
        assert!(sealed::is_sealed(&key_der) && sealed::is_sealed(secret.as_bytes()));
        assert!(
            !key_der
                .windows(16)
                .any(|w| id.key_der().windows(16).any(|k| k == w))
        );
        assert!(!secret.contains("c2VjcmV0"));
        // Read back through the key; new writes are sealed too.
        let loaded = store.load_identity(&bot.jid).await.unwrap();
        assert_eq!(loaded.key_der(), id.key_der());
        assert_eq!(
            store.webhook(&bot.jid).await.unwrap().unwrap().secret,
            hook.secret
        );
        store.put_webhook(&bot.jid, &hook).await.unwrap();
        assert!(sealed::is_sealed(raw(store.clone()).await.1.as_bytes()));
        store.close().await;

        // The same file with the same key: everything opens. Without it, or with another
        // key: no private key, and the error says why.
        let again = Store::open(url).await.unwrap();
        assert_eq!(
            again
                .use_key(StoreKey::from_text(&text).unwrap())
                .await
                .unwrap(),
            0
        );
        assert_eq!(again.load_bots().await.unwrap()[0].key_der, id.key_der());
        again.close().await;
        let keyless = Store::open(url).await.unwrap();
        let err = keyless
            .load_identity(&bot.jid)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no store key"), "{err}");
        assert!(
            keyless.load_certificate(&bot.jid).await.is_ok(),
            "the certificate is public"
        );
        let err = keyless
            .use_key(StoreKey::generate().0)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("another key"), "{err}");
        keyless.close().await;
    }

    async fn pins_set_over_the_api_are_audited(db: TestDb) {
        let store = Store::open(&db.url).await.unwrap();
        let id = BotIdentity::generate("echo@bots.example.org").unwrap();
        let bot = test_bot("echo", Handler::Echo);
        store.insert_bot(&bot, &id).await.unwrap();
        let (alice, laptop, phone) = (
            "alice@example.net",
            Fingerprint::sha256(b"laptop"),
            Fingerprint::sha256(b"phone"),
        );
        store
            .pin_first_use(&bot.jid, alice, &laptop, Some(b"laptop cert"))
            .await
            .unwrap();
        // Offers name certificates (spec §1.6): both digests of the one seen with the pin.
        assert_eq!(
            store.accepted_pins(&bot.jid, alice, false).await.unwrap().1,
            [
                Fingerprint::sha1(b"laptop cert").to_lower_hex(),
                Fingerprint::sha256(b"laptop cert").to_lower_hex()
            ]
        );
        assert!(
            store
                .accepted_pins(&bot.jid, alice, true)
                .await
                .unwrap()
                .1
                .is_empty()
        );
        // A second device, approved; then verified with the fingerprint compared.
        let approve = PinChange {
            bot: &bot.jid,
            peer: alice,
            spki: &phone,
            verified: false,
            compared: None,
            actor: "bot-token:t1",
        };
        let (pin, created, _) = store.set_pin(&approve).await.unwrap();
        assert!(created && !pin.verified && pin.verified_by.is_none());
        let verify = PinChange {
            verified: true,
            compared: Some(phone.to_string()),
            actor: "admin",
            ..approve.clone()
        };
        let (pin, created, action) = store.set_pin(&verify).await.unwrap();
        assert_eq!(action, PinAction::Verified);
        assert!(!created && pin.verified);
        assert_eq!(pin.verified_by.as_deref(), Some("admin"));
        assert_eq!(pin.compared, Some(phone.to_string()));
        store.set_pin(&approve).await.unwrap();
        assert_eq!(store.peer_pins(&bot.jid, alice).await.unwrap().len(), 2);

        assert!(
            store
                .remove_pin(&bot.jid, alice, &laptop, "admin")
                .await
                .unwrap()
        );
        assert!(
            !store
                .remove_pin(&bot.jid, alice, &laptop, "admin")
                .await
                .unwrap()
        );
        assert_eq!(
            store.pins(&bot.jid, alice).await.unwrap(),
            vec![phone.clone()]
        );

        let log = store.audit_log(Some(&bot.jid), 10).await.unwrap();
        let actions: Vec<(PinAction, &str)> = log
            .iter()
            .rev()
            .map(|e| (e.action, e.actor.as_str()))
            .collect();
        assert_eq!(
            actions,
            [
                (PinAction::PinnedOnFirstUse, "component"),
                (PinAction::Approved, "bot-token:t1"),
                (PinAction::Verified, "admin"),
                (PinAction::Unverified, "bot-token:t1"),
                (PinAction::Removed, "admin"),
            ]
        );
        assert!(log.windows(2).all(|w| w[0].seq > w[1].seq), "newest first");
        assert_eq!(log[2].compared, Some(phone.to_string()));
        assert!(
            store
                .audit_log(Some("other@bots.example.org"), 10)
                .await
                .unwrap()
                .is_empty()
        );
        store.close().await;
    }

    async fn bots_keys_pins_and_tunnels_round_trip(db: TestDb) {
        let store = Store::open(&db.url).await.unwrap();
        store.check_writable().await.unwrap();
        let id = BotIdentity::generate("echo@bots.example.org").unwrap();
        let bot = test_bot("echo", Handler::Echo);
        store.insert_bot(&bot, &id).await.unwrap();
        assert!(matches!(
            store.insert_bot(&bot, &id).await,
            Err(StoreError::Duplicate(_))
        ));
        assert_eq!(store.list_bots().await.unwrap(), vec![bot.clone()]);
        let loaded = store.load_identity(&bot.jid).await.unwrap();
        assert_eq!(loaded.info.fingerprints, id.info.fingerprints);

        let fp = Fingerprint::sha256(b"key");
        let alice = "alice@example.net";
        assert_eq!(
            store
                .pin_first_use(&bot.jid, alice, &fp, None)
                .await
                .unwrap(),
            FirstUse::Pinned
        );
        assert_eq!(
            store
                .pin_first_use(&bot.jid, alice, &fp, None)
                .await
                .unwrap(),
            FirstUse::AlreadyPinned
        );
        // A second key racing for the first pin loses to the one stored.
        let late = Fingerprint::sha256(b"other device");
        assert_eq!(
            store
                .pin_first_use(&bot.jid, alice, &late, None)
                .await
                .unwrap(),
            FirstUse::Lost(vec![fp.clone()])
        );
        assert!(store.pin_seen(&bot.jid, alice, &fp, None).await.unwrap());
        assert!(!store.pin_seen(&bot.jid, alice, &late, None).await.unwrap());
        assert_eq!(
            store.pins(&bot.jid, "alice@example.net").await.unwrap(),
            vec![fp]
        );
        assert_eq!(store.list_pins(&bot.jid).await.unwrap().len(), 1);

        let key = xtls::tunnel::TunnelKey {
            local: bot.jid.clone(),
            peer: "alice@example.net/laptop".into(),
        };
        let mut t = TunnelRecord::new(
            "t1".into(),
            &bot.jid,
            &key,
            Role::Responder,
            State::Handshaking,
            now(),
        );
        store.save_tunnel(&t, None).await.unwrap();
        t.state = State::Closed;
        t.stanzas_in = 7;
        store.save_tunnel(&t, None).await.unwrap();
        assert_eq!(store.tunnel(&"t1".into()).await.unwrap(), Some(t.clone()));
        let by_peer = TunnelFilter {
            peer: Some("alice@example.net".into()),
            ..Default::default()
        };
        assert_eq!(store.list_tunnels(&by_peer, 10).await.unwrap().len(), 1);
        let other = TunnelFilter {
            state: Some(State::Open),
            ..Default::default()
        };
        assert!(store.list_tunnels(&other, 10).await.unwrap().is_empty());

        assert!(store.delete_bot(&bot.jid).await.unwrap());
        assert!(
            store
                .pins(&bot.jid, "alice@example.net")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store.tunnel(&"t1".into()).await.unwrap().is_some(),
            "history outlives the bot"
        );
        store.close().await;
    }

    async fn an_unknown_stored_value_is_an_error_not_a_default(db: TestDb) {
        let store = Store::open(&db.url).await.unwrap();
        let id = BotIdentity::generate("odd@bots.example.org").unwrap();
        let bot = test_bot("odd", Handler::Echo);
        store.insert_bot(&bot, &id).await.unwrap();
        let key = xtls::tunnel::TunnelKey {
            local: bot.jid.clone(),
            peer: "alice@example.net/laptop".into(),
        };
        let t = TunnelRecord::new(
            "t1".into(),
            &bot.jid,
            &key,
            Role::Responder,
            State::Open,
            now(),
        );
        store.save_tunnel(&t, None).await.unwrap();

        // A later version (or a hand edit) wrote values this one does not know.
        for (sql, column) in [
            ("UPDATE bots SET handler = 'webhook'", "handler"),
            (
                "UPDATE bots SET handler = 'echo', trust = 'verified-only'",
                "trust",
            ),
        ] {
            query(sql).execute(&store.writer).await.unwrap();
            let err = store.list_bots().await.unwrap_err().to_string();
            assert!(
                err.contains(column) || err.contains("verified-only"),
                "{err}"
            );
            assert!(store.load_bots().await.is_err());
        }
        query("UPDATE tunnels SET state = 'half-open'")
            .execute(&store.writer)
            .await
            .unwrap();
        let err = store.tunnel(&"t1".into()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "stored value unreadable: unknown tunnel state 'half-open'"
        );
        // No pin is skipped: trust on first use would then pin whatever key came next.
        store
            .pin_first_use(
                &bot.jid,
                "alice@example.net",
                &Fingerprint::sha256(b"k"),
                None,
            )
            .await
            .unwrap();
        query("UPDATE peer_pins SET spki_sha256 = 'AB:CD'")
            .execute(&store.writer)
            .await
            .unwrap();
        assert!(matches!(
            store.pins(&bot.jid, "alice@example.net").await,
            Err(StoreError::Unreadable(_))
        ));
        // Rows before the handshake hold 'pending' (NULL in the earliest versions): pending.
        for stored in ["'pending'", "NULL"] {
            query(format!(
                "UPDATE tunnels SET state = 'open', trust = {stored}"
            ))
            .execute(&store.writer)
            .await
            .unwrap();
            let row = store.tunnel(&"t1".into()).await.unwrap().unwrap();
            assert_eq!(row.peer_identity.trust, PeerTrust::Pending, "{stored}");
        }
        query("UPDATE tunnels SET state = 'open', trust = 'trusted'")
            .execute(&store.writer)
            .await
            .unwrap();
        assert!(
            store
                .list_tunnels(&TunnelFilter::default(), 10)
                .await
                .is_err()
        );
        store.close().await;
    }
}
