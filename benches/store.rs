//! Event-log commit benchmarks, each against a bare SQLite baseline measured in the same run.
//!
//! What is committed: `message.received` events for a ~200-byte chat message that arrived
//! through a tunnel, built once by [`BotEvent::stanza`] the way the session driver builds them,
//! in batches of 1, 16 and 64 (a driver step commits every stanza it acknowledges in one
//! batch). Throughput is reported in events per second.
//!
//! Each benchmark gets a fresh database file in a temporary directory.
//!
//! - `store/append_events/N`: the real [`Store::append_events`] on a SQLite file opened by
//!   [`Store::open`] (WAL journal, `synchronous = NORMAL`, foreign keys on, the
//!   one-connection writer pool): claim of the `seq` range, one INSERT per event, one
//!   transaction per batch.
//! - `store/bare_per_event/N`: a single sqlx connection with the same settings on a file
//!   migrated the same way, one INSERT of a comparable row (same table, same values, random ids from
//!   [`event_id`]) per event, each in its own (autocommit) transaction.
//! - `store/bare_batched/N`: the same INSERTs, one transaction per batch: the floor for
//!   `append_events`.
//!
//! Targets: `append_events` close to `bare_batched` at every batch size, and well above
//! `bare_per_event` from 16 events on (batching is what makes acknowledging stanzas cheap).
//! `scripts/bench` prints the ratios.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection};
use tokio::runtime::Runtime;
use xtls::certs::{BotIdentity, Fingerprint};
use xtls::stanza::chat_message;
use xtls::stanza::set_attr;
use xtls::tunnel::{Established, PeerIdentity, TrustVerdict};
use xtls_component::delivery::event::{BotEvent, Identity};
use xtls_component::store::NewEvent;
use xtls_component::store::events::event_id;
use xtls_component::store::{BotRecord, Store, now};

const BOT: &str = "weather@bots.example.org";
const ALICE: &str = "alice@example.net/laptop";
const BATCHES: [usize; 3] = [1, 16, 64];

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "xtls-bench-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn url(&self) -> String {
        format!("sqlite://{}/bench.db", self.0.display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The events of one batch: the same stanza event, as the driver makes it.
fn events(n: usize) -> Vec<NewEvent> {
    let mut stanza = chat_message(
        "The forecast for tomorrow: sunny, light wind. The forecast for tomorrow: sunny.",
        "chat",
    );
    set_attr(&mut stanza, "from", ALICE);
    set_attr(&mut stanza, "to", BOT);
    let established = Established {
        tls_version: "TLSv1.3".into(),
        cipher_suite: "TLS13_AES_256_GCM_SHA384".into(),
        peer: PeerIdentity {
            spki_sha256: Some(Fingerprint::sha256(b"alice's key")),
            cert_der: None,
            trust: TrustVerdict::TofuNew,
        },
    };
    let event = BotEvent::stanza(&stanza, Some(Identity::of(&established)))
        .into_row(Some("tun_0123456789abcdef".into()), Some(ALICE.into()));
    vec![event; n]
}

fn bot_record() -> BotRecord {
    BotRecord {
        jid: BOT.into(),
        localpart: "weather".into(),
        handler: xtls_component::config::Handler::Api,
        peer_auth: xtls::tunnel::PeerAuth::Required,
        trust: xtls_component::config::BotTrust::Tofu,
        encrypted_only: false,
        created_at: now(),
    }
}

/// The bare side: one connection with the store's settings, the same schema and bot row.
async fn bare_connection(dir: &TempDir, identity: &BotIdentity) -> SqliteConnection {
    // Migrate and create the bot through a store, then close it: the schema is the same.
    let store = Store::open(&dir.url()).await.expect("store");
    store
        .insert_bot(&bot_record(), identity)
        .await
        .expect("bot");
    store.close().await;
    let options = SqliteConnectOptions::from_str(&dir.url())
        .expect("url")
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5));
    SqliteConnection::connect_with(&options)
        .await
        .expect("connection")
}

/// A row comparable to what `append_events` inserts, values prepared beforehand.
struct Row {
    kind: &'static str,
    tunnel_id: Option<String>,
    peer: Option<String>,
    data: String,
}

const INSERT: &str = "INSERT INTO events (bot_jid, seq, id, type, tunnel_id, peer, occurred_at, data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

async fn bare_insert<'c, E>(executor: E, row: &Row, seq: u64, occurred_at: &str)
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    sqlx::query(INSERT)
        .bind(BOT)
        .bind(seq as i64)
        .bind(event_id())
        .bind(row.kind)
        .bind(&row.tunnel_id)
        .bind(&row.peer)
        .bind(occurred_at)
        .bind(&row.data)
        .execute(executor)
        .await
        .expect("insert");
}

fn store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let identity = BotIdentity::generate(BOT).expect("key generation");
    let batch = events(*BATCHES.iter().max().expect("batches"));
    let rows: Vec<Row> = batch
        .iter()
        .map(|e| Row {
            kind: e.kind,
            tunnel_id: e.tunnel_id.as_ref().map(|t| t.to_string()),
            peer: e.peer.clone(),
            data: e.data.to_string(),
        })
        .collect();

    // A fresh database file per benchmark: none inherits the rows (and the WAL) of another.
    let mut group = c.benchmark_group("store");
    for n in BATCHES {
        group.throughput(Throughput::Elements(n as u64));

        let dir = TempDir::new("store");
        let store = rt.block_on(async {
            let store = Store::open(&dir.url()).await.expect("store");
            store
                .insert_bot(&bot_record(), &identity)
                .await
                .expect("bot");
            store
        });
        let mut seq = 0u64;
        group.bench_with_input(BenchmarkId::new("append_events", n), &n, |b, &n| {
            b.iter(|| append(&rt, &store, &mut seq, &batch[..n]))
        });
        rt.block_on(async {
            assert_eq!(store.last_seq(BOT).await.expect("last seq"), seq);
            store.close().await;
        });

        let dir = TempDir::new("bare");
        let mut conn = rt.block_on(bare_connection(&dir, &identity));
        let mut seq = 0u64;
        group.bench_with_input(BenchmarkId::new("bare_per_event", n), &n, |b, &n| {
            b.iter(|| bare_per_event(&rt, &mut conn, &mut seq, &rows[..n]))
        });
        rt.block_on(conn.close()).expect("close");

        let dir = TempDir::new("bare");
        let mut conn = rt.block_on(bare_connection(&dir, &identity));
        let mut seq = 0u64;
        group.bench_with_input(BenchmarkId::new("bare_batched", n), &n, |b, &n| {
            b.iter(|| bare_batched(&rt, &mut conn, &mut seq, &rows[..n]))
        });
        rt.block_on(conn.close()).expect("close");
    }
    group.finish();
}

#[inline(never)]
fn append(rt: &Runtime, store: &Store, seq: &mut u64, events: &[NewEvent]) {
    let after = *seq;
    let stored = rt
        .block_on(store.append_events(BOT, after, events, None))
        .expect("committed");
    *seq += stored.len() as u64;
}

#[inline(never)]
fn bare_per_event(rt: &Runtime, conn: &mut SqliteConnection, seq: &mut u64, rows: &[Row]) {
    rt.block_on(async {
        let occurred_at = now();
        for row in rows {
            *seq += 1;
            bare_insert(&mut *conn, row, *seq, &occurred_at).await;
        }
    });
}

#[inline(never)]
fn bare_batched(rt: &Runtime, conn: &mut SqliteConnection, seq: &mut u64, rows: &[Row]) {
    rt.block_on(async {
        let occurred_at = now();
        let mut tx = conn.begin().await.expect("begin");
        for row in rows {
            *seq += 1;
            bare_insert(&mut *tx, row, *seq, &occurred_at).await;
        }
        tx.commit().await.expect("commit");
    });
}

criterion_group!(benches, store);
criterion_main!(benches);
