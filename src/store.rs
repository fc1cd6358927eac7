//! Durable state in SQLite: bots, bot keys, peer pins, tunnel history.
//!
//! The file is created on first start and the migrations in `migrations/` are applied at every
//! start. Queries are plain SQL over a small pool; every write is one short transaction.

use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use xtls::certs::{BotIdentity, CertError, Fingerprint, rfc3339};

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
    /// A row that must exist is missing.
    #[error("{0} not found")]
    NotFound(String),
    /// A row with the same key exists.
    #[error("{0} already exists")]
    Duplicate(String),
    /// A concurrent writer changed what this write depended on.
    #[error("conflict: {0}")]
    Conflict(String),
}

/// The current time as RFC 3339, with sub-second precision (listings sort on it).
pub fn now() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// A bot as stored.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BotRecord {
    /// Normalized bare JID.
    pub jid: String,
    /// The localpart.
    pub localpart: String,
    /// The handler name.
    pub handler: String,
    /// `required` or `optional`.
    pub peer_auth: String,
    /// `tofu` or `pinned`.
    pub trust: String,
    /// Creation time.
    pub created_at: String,
}

/// A pinned peer key.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PeerPin {
    /// The peer's bare JID.
    pub peer: String,
    /// SPKI SHA-256, colon hex.
    pub spki_sha256: String,
    /// Whether an operator confirmed the key out of band.
    pub verified: bool,
    /// When the key was first seen.
    pub first_seen: String,
    /// When the key was last seen.
    pub last_seen: String,
}

/// The peer identity part of a tunnel row.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default, utoipa::ToSchema)]
pub struct PeerIdentityRecord {
    /// SPKI SHA-256 of the peer's key, colon hex; `None` before the handshake or without one.
    pub spki_sha256: Option<String>,
    /// `pending`, `unauthenticated`, `tofu_new` or `pinned`.
    pub trust: String,
}

/// One row of the session table, live or historical (the admin API's tunnel object).
#[derive(Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct TunnelRecord {
    /// Tunnel id.
    pub id: String,
    /// The bot's bare JID.
    pub bot: String,
    /// Our JID as the peer addresses it.
    pub local: String,
    /// The peer's JID.
    pub peer: String,
    /// `initiator` or `responder`.
    pub role: String,
    /// `starting`, `handshaking`, `open`, `closing` or `closed`.
    pub state: String,
    /// Negotiated TLS version.
    pub tls_version: Option<String>,
    /// Negotiated cipher suite.
    pub cipher_suite: Option<String>,
    /// The peer's identity.
    pub peer_identity: PeerIdentityRecord,
    /// Inner stanzas received.
    pub stanzas_in: u64,
    /// Inner stanzas sent.
    pub stanzas_out: u64,
    /// TLS bytes received.
    pub bytes_in: u64,
    /// TLS bytes sent.
    pub bytes_out: u64,
    /// When the tunnel was created.
    pub opened_at: String,
    /// When the handshake finished.
    pub established_at: Option<String>,
    /// When it ended.
    pub closed_at: Option<String>,
    /// Why it ended.
    pub close_reason: Option<String>,
}

/// Field by field, so that `clone_from` reuses the strings' buffers: the live session table
/// refreshes a tunnel's row after every stanza that moves its counters.
impl Clone for TunnelRecord {
    fn clone(&self) -> Self {
        let mut copy = TunnelRecord::new(
            String::new(),
            "",
            &xtls::tunnel::TunnelKey {
                local: String::new(),
                peer: String::new(),
            },
            "",
            "",
            String::new(),
        );
        copy.clone_from(self);
        copy
    }

    fn clone_from(&mut self, source: &Self) {
        let TunnelRecord {
            id,
            bot,
            local,
            peer,
            role,
            state,
            tls_version,
            cipher_suite,
            peer_identity,
            stanzas_in,
            stanzas_out,
            bytes_in,
            bytes_out,
            opened_at,
            established_at,
            closed_at,
            close_reason,
        } = source;
        self.id.clone_from(id);
        self.bot.clone_from(bot);
        self.local.clone_from(local);
        self.peer.clone_from(peer);
        self.role.clone_from(role);
        self.state.clone_from(state);
        self.tls_version.clone_from(tls_version);
        self.cipher_suite.clone_from(cipher_suite);
        let PeerIdentityRecord { spki_sha256, trust } = peer_identity;
        self.peer_identity.spki_sha256.clone_from(spki_sha256);
        self.peer_identity.trust.clone_from(trust);
        self.stanzas_in = *stanzas_in;
        self.stanzas_out = *stanzas_out;
        self.bytes_in = *bytes_in;
        self.bytes_out = *bytes_out;
        self.opened_at.clone_from(opened_at);
        self.established_at.clone_from(established_at);
        self.closed_at.clone_from(closed_at);
        self.close_reason.clone_from(close_reason);
    }
}

impl TunnelRecord {
    /// A row for a tunnel that has just been created: no handshake facts, no counts yet.
    pub fn new(
        id: String,
        bot: &str,
        key: &xtls::tunnel::TunnelKey,
        role: &str,
        state: &str,
        opened_at: String,
    ) -> TunnelRecord {
        TunnelRecord {
            id,
            bot: bot.to_owned(),
            local: key.local.clone(),
            peer: key.peer.clone(),
            role: role.to_owned(),
            state: state.to_owned(),
            tls_version: None,
            cipher_suite: None,
            peer_identity: PeerIdentityRecord {
                spki_sha256: None,
                trust: "pending".into(),
            },
            stanzas_in: 0,
            stanzas_out: 0,
            bytes_in: 0,
            bytes_out: 0,
            opened_at,
            established_at: None,
            closed_at: None,
            close_reason: None,
        }
    }
}

/// Filter for tunnel listings.
#[derive(Debug, Clone, Default)]
pub struct TunnelFilter {
    /// Only this bot.
    pub bot: Option<String>,
    /// Only this peer (full JID, or bare to match every resource).
    pub peer: Option<String>,
    /// Only this state.
    pub state: Option<String>,
}

impl TunnelFilter {
    /// Whether a row passes the filter.
    pub fn matches(&self, t: &TunnelRecord) -> bool {
        self.bot.as_ref().is_none_or(|b| *b == t.bot)
            && self
                .peer
                .as_ref()
                .is_none_or(|p| *p == t.peer || xtls::tunnel::bare(&t.peer) == p)
            && self.state.as_ref().is_none_or(|s| *s == t.state)
    }
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    /// Readers.
    pool: SqlitePool,
    /// The one writing connection: writers queue here, in order and without SQLite's
    /// sleep-and-retry busy handler.
    writer: SqlitePool,
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
    /// Opens (creating when missing) and migrates the database.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
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
        sqlx::migrate!("./migrations").run(&writer).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        Ok(Store { pool, writer })
    }

    /// The reading pool, for the modules that keep their queries beside their types.
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The writing connection (every INSERT, UPDATE and DELETE goes through it).
    pub(crate) fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// Closes the pool, waiting for running queries.
    pub async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }

    /// Proves the database accepts writes.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO health (id, checked_at) VALUES (1, ?) ON CONFLICT(id) DO UPDATE SET checked_at = excluded.checked_at")
            .bind(now())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Marks tunnels left live by a previous process as closed.
    pub async fn close_stale_tunnels(&self) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE tunnels SET state = 'closed', closed_at = ?, close_reason = 'component_restart' WHERE state != 'closed'",
        )
        .bind(now())
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    /// Creates a bot with its identity in one transaction.
    pub async fn insert_bot(
        &self,
        bot: &BotRecord,
        identity: &BotIdentity,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO bots (jid, localpart, handler, peer_auth, trust, created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(&bot.jid)
        .bind(&bot.localpart)
        .bind(&bot.handler)
        .bind(&bot.peer_auth)
        .bind(&bot.trust)
        .bind(&bot.created_at)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Duplicate(format!("bot {}", bot.jid)));
        }
        sqlx::query(
            "INSERT INTO bot_keys (bot_jid, key_der, cert_der, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(&bot.jid)
        .bind(identity.key_der())
        .bind(identity.cert_der().as_ref())
        .bind(&bot.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every bot, by JID.
    pub async fn list_bots(&self) -> Result<Vec<BotRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT jid, localpart, handler, peer_auth, trust, created_at FROM bots ORDER BY jid",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(bot_from_row).collect())
    }

    /// Every bot with its stored key, certificate and last event `seq`, in one query (start-up).
    pub async fn load_bots(&self) -> Result<Vec<StoredBot>, StoreError> {
        let rows = sqlx::query(
            "SELECT b.jid, b.localpart, b.handler, b.peer_auth, b.trust, b.created_at, b.last_seq, \
             k.key_der, k.cert_der \
             FROM bots b LEFT JOIN bot_keys k ON k.bot_jid = b.jid ORDER BY b.jid",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let record = bot_from_row(r);
                let (Some(key_der), Some(cert_der)) = (
                    r.get::<Option<Vec<u8>>, _>("key_der"),
                    r.get::<Option<Vec<u8>>, _>("cert_der"),
                ) else {
                    return Err(StoreError::NotFound(format!("key of bot {}", record.jid)));
                };
                Ok(StoredBot {
                    last_seq: r.get::<i64, _>("last_seq") as u64,
                    record,
                    key_der,
                    cert_der,
                })
            })
            .collect()
    }

    /// The stored identity of a bot.
    pub async fn load_identity(&self, jid: &str) -> Result<BotIdentity, StoreError> {
        let row = sqlx::query("SELECT key_der, cert_der FROM bot_keys WHERE bot_jid = ?")
            .bind(jid)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key of bot {jid}")))?;
        Ok(BotIdentity::from_der(
            jid,
            row.get("cert_der"),
            row.get("key_der"),
        )?)
    }

    /// Deletes a bot, its key and its pins; `false` when it did not exist.
    pub async fn delete_bot(&self, jid: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM bots WHERE jid = ?")
            .bind(jid)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The SPKI pins a bot holds for a peer bare JID.
    pub async fn pins(&self, bot: &str, peer: &str) -> Result<Vec<Fingerprint>, StoreError> {
        let rows = sqlx::query("SELECT spki_sha256 FROM peer_pins WHERE bot_jid = ? AND peer = ?")
            .bind(bot)
            .bind(peer)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| Fingerprint::parse(r.get::<&str, _>("spki_sha256")))
            .collect())
    }

    /// Records that a peer presented a key (pinning it on first use).
    pub async fn record_pin(
        &self,
        bot: &str,
        peer: &str,
        spki: &Fingerprint,
        cert_der: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let at = now();
        sqlx::query(
            "INSERT INTO peer_pins (bot_jid, peer, spki_sha256, cert_der, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (bot_jid, peer, spki_sha256) DO UPDATE SET last_seen = excluded.last_seen, cert_der = excluded.cert_der",
        )
        .bind(bot)
        .bind(peer)
        .bind(spki.to_string())
        .bind(cert_der)
        .bind(&at)
        .bind(&at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The peers a bot knows, with their pins.
    pub async fn list_pins(&self, bot: &str) -> Result<Vec<PeerPin>, StoreError> {
        let rows = sqlx::query(
            "SELECT peer, spki_sha256, verified, first_seen, last_seen FROM peer_pins WHERE bot_jid = ? ORDER BY peer, first_seen",
        )
        .bind(bot)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| PeerPin {
                peer: r.get("peer"),
                spki_sha256: r.get("spki_sha256"),
                verified: r.get::<i64, _>("verified") != 0,
                first_seen: r.get("first_seen"),
                last_seen: r.get("last_seen"),
            })
            .collect())
    }

    /// Inserts or replaces a tunnel row.
    pub async fn save_tunnel(&self, t: &TunnelRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tunnels (id, bot_jid, local_jid, peer, role, state, tls_version, cipher_suite, peer_spki, trust, \
             stanzas_in, stanzas_out, bytes_in, bytes_out, opened_at, established_at, closed_at, close_reason) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, tls_version = excluded.tls_version, \
             cipher_suite = excluded.cipher_suite, peer_spki = excluded.peer_spki, trust = excluded.trust, \
             stanzas_in = excluded.stanzas_in, stanzas_out = excluded.stanzas_out, bytes_in = excluded.bytes_in, \
             bytes_out = excluded.bytes_out, established_at = excluded.established_at, closed_at = excluded.closed_at, \
             close_reason = excluded.close_reason",
        )
        .bind(&t.id)
        .bind(&t.bot)
        .bind(&t.local)
        .bind(&t.peer)
        .bind(&t.role)
        .bind(&t.state)
        .bind(&t.tls_version)
        .bind(&t.cipher_suite)
        .bind(&t.peer_identity.spki_sha256)
        .bind(&t.peer_identity.trust)
        .bind(t.stanzas_in as i64)
        .bind(t.stanzas_out as i64)
        .bind(t.bytes_in as i64)
        .bind(t.bytes_out as i64)
        .bind(&t.opened_at)
        .bind(&t.established_at)
        .bind(&t.closed_at)
        .bind(&t.close_reason)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Tunnel rows, newest first.
    pub async fn list_tunnels(
        &self,
        filter: &TunnelFilter,
        limit: i64,
    ) -> Result<Vec<TunnelRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM tunnels WHERE (?1 IS NULL OR bot_jid = ?1) AND (?2 IS NULL OR state = ?2) \
             AND (?3 IS NULL OR peer = ?3 OR substr(peer, 1, length(?3) + 1) = ?3 || '/') \
             ORDER BY opened_at DESC, id DESC LIMIT ?4",
        )
        .bind(&filter.bot)
        .bind(&filter.state)
        .bind(&filter.peer)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(tunnel_from_row)
            .filter(|t| filter.matches(t))
            .collect())
    }

    /// One tunnel row.
    pub async fn tunnel(&self, id: &str) -> Result<Option<TunnelRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM tunnels WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(tunnel_from_row))
    }
}

/// A bot as stored: its record, its key and certificate (DER), its last event `seq`.
#[derive(Debug, Clone)]
pub struct StoredBot {
    /// The bot's row.
    pub record: BotRecord,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The highest `seq` given to an event of this bot.
    pub last_seq: u64,
}

fn bot_from_row(r: &sqlx::sqlite::SqliteRow) -> BotRecord {
    BotRecord {
        jid: r.get("jid"),
        localpart: r.get("localpart"),
        handler: r.get("handler"),
        peer_auth: r.get("peer_auth"),
        trust: r.get("trust"),
        created_at: r.get("created_at"),
    }
}

fn tunnel_from_row(r: &sqlx::sqlite::SqliteRow) -> TunnelRecord {
    TunnelRecord {
        id: r.get("id"),
        bot: r.get("bot_jid"),
        local: r.get("local_jid"),
        peer: r.get("peer"),
        role: r.get("role"),
        state: r.get("state"),
        tls_version: r.get("tls_version"),
        cipher_suite: r.get("cipher_suite"),
        peer_identity: PeerIdentityRecord {
            spki_sha256: r.get("peer_spki"),
            trust: r
                .get::<Option<String>, _>("trust")
                .unwrap_or_else(|| "pending".into()),
        },
        stanzas_in: r.get::<i64, _>("stanzas_in") as u64,
        stanzas_out: r.get::<i64, _>("stanzas_out") as u64,
        bytes_in: r.get::<i64, _>("bytes_in") as u64,
        bytes_out: r.get::<i64, _>("bytes_out") as u64,
        opened_at: r.get("opened_at"),
        established_at: r.get("established_at"),
        closed_at: r.get("closed_at"),
        close_reason: r.get("close_reason"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

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
            "responder",
            "open",
            now(),
        );
        full.tls_version = Some("TLSv1_3".into());
        full.cipher_suite = Some("TLS13_AES_128_GCM_SHA256".into());
        full.peer_identity = PeerIdentityRecord {
            spki_sha256: Some("AA:BB".into()),
            trust: "tofu_new".into(),
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
        let mut other = TunnelRecord::new("t2".into(), "b@c", &key, "initiator", "starting", now());
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

    #[tokio::test]
    async fn bots_keys_pins_and_tunnels_round_trip() {
        let (store, dir) = temp_store().await;
        store.check_writable().await.unwrap();
        let id = BotIdentity::generate("echo@bots.example.org").unwrap();
        let bot = BotRecord {
            jid: "echo@bots.example.org".into(),
            localpart: "echo".into(),
            handler: "echo".into(),
            peer_auth: "required".into(),
            trust: "tofu".into(),
            created_at: now(),
        };
        store.insert_bot(&bot, &id).await.unwrap();
        assert!(matches!(
            store.insert_bot(&bot, &id).await,
            Err(StoreError::Duplicate(_))
        ));
        assert_eq!(store.list_bots().await.unwrap(), vec![bot.clone()]);
        let loaded = store.load_identity(&bot.jid).await.unwrap();
        assert_eq!(loaded.info.fingerprints, id.info.fingerprints);

        let fp = Fingerprint::sha256(b"key");
        store
            .record_pin(&bot.jid, "alice@example.net", &fp, None)
            .await
            .unwrap();
        store
            .record_pin(&bot.jid, "alice@example.net", &fp, None)
            .await
            .unwrap();
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
            "responder",
            "handshaking",
            now(),
        );
        store.save_tunnel(&t).await.unwrap();
        t.state = "closed".into();
        t.stanzas_in = 7;
        store.save_tunnel(&t).await.unwrap();
        assert_eq!(store.tunnel("t1").await.unwrap(), Some(t.clone()));
        let by_peer = TunnelFilter {
            peer: Some("alice@example.net".into()),
            ..Default::default()
        };
        assert_eq!(store.list_tunnels(&by_peer, 10).await.unwrap().len(), 1);
        let other = TunnelFilter {
            state: Some("open".into()),
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
            store.tunnel("t1").await.unwrap().is_some(),
            "history outlives the bot"
        );
        store.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }
}
