//! Heap held by idle bots: what one costs at rest once loaded, with no tunnel (the issue's
//! budget: 4 KiB per idle bot, for 100,000 bots on one instance; docs/performance.md).
//!
//! A counting allocator measures the bytes live after `BotTable::load` registered N stored
//! bots and their tasks settled, against the bytes live before. A bot no one has addressed
//! since the start keeps its handle only: no driver task, no queue, no TLS credentials.

#[path = "common/database.rs"]
mod database;

use std::time::Duration;

use tokio::sync::mpsc;

use xtls::certs::BotIdentity;
use xtls::tunnel::{PeerAuth, TunnelConfig};
use xtls_component::config::{BotTrust, EventsConfig, Handler, LimitsConfig, WebhooksConfig};
use xtls_component::session::{BotTable, Shared};
use xtls_component::store::{BotRecord, Store};

#[path = "common/counting.rs"]
mod counting;

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

const DOMAIN: &str = "bots.example.org";
const BOTS: usize = 300;

/// Bytes of heap per bot that `BotTable::load` keeps for `BOTS` stored bots of `handler`.
async fn heap_per_idle_bot(handler: Handler) -> isize {
    let db = database::TestDb::sqlite().await;
    let store = Store::open(&db.url).await.unwrap();
    for n in 0..BOTS {
        let jid = format!("bot{n}@{DOMAIN}");
        let record = BotRecord {
            jid: jid.clone(),
            localpart: format!("bot{n}"),
            handler,
            peer_auth: PeerAuth::Required,
            trust: BotTrust::Tofu,
            encrypted_only: false,
            created_at: xtls_component::store::now(),
        };
        store
            .insert_bot(&record, &BotIdentity::generate(&jid).unwrap())
            .await
            .unwrap();
    }
    let (out_tx, _out) = mpsc::channel(256);
    let shared = Shared::new(
        store,
        xtls_component::session::Ownership::sole(),
        out_tx,
        TunnelConfig::default(),
        LimitsConfig::default(),
        DOMAIN.into(),
        &EventsConfig::default(),
        WebhooksConfig::default(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = counting::live();
    let bots = BotTable::load(shared).await.unwrap();
    // The drivers' start-up (recovery checks, webhook loads) runs, then they wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = counting::live();
    bots.stop_all().await;
    (after - before) / BOTS as isize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_bots_keep_little_heap() {
    let echo = heap_per_idle_bot(Handler::Echo).await;
    let api = heap_per_idle_bot(Handler::Api).await;
    println!("heap per idle bot: echo {echo} bytes, api {api} bytes ({BOTS} bots each)");
    // Measured 2,397 and 2,395: a bot's driver starts with the first command sent to it (and
    // parks again when idle), an api bot's webhook deliverer with its first webhook (17,994
    // and 20,036 before).
    assert!(echo <= 2_600, "an idle echo bot keeps {echo} bytes");
    assert!(api <= 2_600, "an idle api bot keeps {api} bytes");
}
