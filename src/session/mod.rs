//! The session table: one driver task per bot owns that bot's tunnels and their single timer.
//!
//! A driver receives the stanzas the router addressed to its bot, feeds them to the tunnel
//! engine (the `xtls` crate), writes what the engines emit to the server link's outbound
//! channel, runs the bot's handler on the decrypted stanzas, appends the bot's events, and
//! keeps the live session table and the store's history current.
//!
//! Owns: the bots and their tunnels. Called by the router (stanzas) and the API (commands,
//! snapshots); calls down into [`crate::delivery`] (spawns each `api` bot's webhook deliverer)
//! and [`crate::store`]. It never calls the link: stanzas leave through a channel.
//!
//! | module | what |
//! |---|---|
//! | `table` | the registry of bots: create, load, find, delete; [`BotHandle`], [`BotCommand`] |
//! | `owners` | which bots this instance runs when instances share the store; their leases |
//! | `driver` | one bot's task and the order of a step: commands, engines, pump, commit, write |
//! | `inbound` | stanzas from the server: `start`, tunnel IQs, presence, disco, ping |
//! | `events` | what the engines report, turned into events, metrics and table rows |
//! | `outbound` | messages the bot sends: disco, opening tunnels as initiator, status history |
//! | `limits`, `rate` | capacity caps and the per-peer start rate |
//! | `pair` | pairing codes: minted for a peer, checked by SPAKE2 inside its tunnel |
//! | `sas` | short authentication strings: the exchange over a tunnel's inner IQs, the decision |
//! | `rotation` | the bots' own certificates: announce the next, activate it, rotate the expiring |

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use minidom::Element;
use tokio::sync::mpsc;

use crate::config::{CertificatesConfig, EventsConfig, LimitsConfig, Live, WebhooksConfig};
use crate::delivery::guard::WebhookNetworks;
use crate::delivery::webhook::webhook_client;
use crate::store::{Store, TunnelId, TunnelRecord};
use xtls::tunnel::TunnelConfig;

mod claims;
mod driver;
mod events;
mod inbound;
mod limits;
mod outbound;
mod owners;
mod pair;
mod rate;
mod rotation;
mod route;
mod sas;
mod table;
#[cfg(test)]
mod tests;

pub use inbound::bot_disco_info;
pub use outbound::Submitted;
pub use owners::{Admission, Ownership};
pub use pair::{MAX_ATTEMPTS, Minted, Pairings};
pub use rotation::{Certificates, Rotation};
pub use route::{ROUTE_WAIT, Route, RouteError, RouteProbes};
pub use sas::{SasRefusal, SasRequest};
pub use table::{
    BotCommand, BotError, BotHandle, BotPolicy, BotTable, NewBot, PolicyChange, is_request,
};

/// Everything the drivers share.
#[derive(Debug)]
pub struct Shared {
    /// The store.
    pub store: Store,
    /// Stanzas for the server.
    pub out: mpsc::Sender<Element>,
    /// Live tunnels, by id.
    pub table: TunnelTable,
    /// Timers and sizes of every tunnel.
    pub tunnel_config: TunnelConfig,
    /// Capacity caps (a reload may change them).
    pub limits: Live<LimitsConfig>,
    /// The component domain.
    pub domain: String,
    /// Most events committed in one transaction.
    pub max_batch: usize,
    /// Webhook delivery settings (a reload may change them).
    pub webhooks: Arc<Live<WebhooksConfig>>,
    /// The internal networks webhooks may reach.
    pub webhook_networks: WebhookNetworks,
    /// The HTTP client of webhook deliveries (connects only where the networks allow).
    pub webhook_client: reqwest::Client,
    /// Pairing codes waiting for their peers.
    pub pairings: pair::Pairings,
    /// Validity and rotation of the bots' certificates (the configuration's, set at start).
    pub certificates: Live<CertificatesConfig>,
    /// Whether the component link is authenticated.
    pub link_up: std::sync::atomic::AtomicBool,
    /// Counters and histograms.
    pub metrics: crate::metrics::Metrics,
    /// Route probes waiting to come back.
    pub routes: RouteProbes,
    /// Which bots this instance runs, when instances share the store.
    pub owners: Ownership,
    start_rate: rate::StartRate,
    /// How long a driver with nothing to do waits before it parks (milliseconds).
    park_after_ms: std::sync::atomic::AtomicU64,
    handshakes: AtomicUsize,
    tunnels: AtomicUsize,
}

impl Shared {
    /// Bundles the shared parts.
    #[expect(
        clippy::too_many_arguments,
        reason = "one per part, each named at the call"
    )]
    pub fn new(
        store: Store,
        owners: Ownership,
        out: mpsc::Sender<Element>,
        tunnel_config: TunnelConfig,
        limits: LimitsConfig,
        domain: String,
        events: &EventsConfig,
        webhooks: WebhooksConfig,
    ) -> Arc<Shared> {
        let networks = WebhookNetworks::new(webhooks.allowed_networks.clone());
        Arc::new(Shared {
            start_rate: rate::StartRate::new(
                limits.starts_per_peer_per_minute,
                limits.start_burst_per_peer,
            ),
            store,
            out,
            table: TunnelTable::default(),
            tunnel_config,
            limits: Live::new(limits),
            domain,
            max_batch: events.max_batch,
            // One list for the client's resolver and the URL checks, so a reload reaches both.
            webhook_client: webhook_client(networks.clone()),
            webhook_networks: networks,
            webhooks: Arc::new(Live::new(webhooks)),
            pairings: Default::default(),
            certificates: Live::new(CertificatesConfig::default()),
            link_up: Default::default(),
            metrics: Default::default(),
            routes: Default::default(),
            owners,
            park_after_ms: std::sync::atomic::AtomicU64::new(PARK_AFTER.as_millis() as u64),
            handshakes: AtomicUsize::new(0),
            tunnels: AtomicUsize::new(0),
        })
    }
}

/// How long a bot's driver with no tunnel and nothing pending waits before it parks: its task,
/// queue and TLS credentials are dropped until the next command reaches the bot.
pub const PARK_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

impl Shared {
    /// How long an idle driver waits before it parks ([`PARK_AFTER`] unless changed).
    pub fn park_after(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.park_after_ms.load(Ordering::Relaxed))
    }

    /// Changes how long an idle driver waits before it parks (tests use a short one).
    pub fn set_park_after(&self, after: std::time::Duration) {
        self.park_after_ms
            .store(after.as_millis() as u64, Ordering::Relaxed);
    }

    /// Puts new caps and a new start rate in effect; the queue sizes stay as they were
    /// ([`LimitsConfig::fixed_changes`]).
    pub fn reload_limits(&self, new: &LimitsConfig) {
        let limits = self.limits.get().reloadable(new);
        self.start_rate.set_rate(
            limits.starts_per_peer_per_minute,
            limits.start_burst_per_peer,
        );
        self.limits.set(limits);
    }

    /// Puts new webhook settings in effect: back-off and age for the next attempt, defaults
    /// for the next registration, the allowed networks for the next connection.
    pub fn reload_webhooks(&self, new: &WebhooksConfig) {
        self.webhook_networks.set(new.allowed_networks.clone());
        self.webhooks.set(new.clone());
    }
}

/// The live part of the session table, readable by the admin API.
#[derive(Debug, Clone, Default)]
pub struct TunnelTable(Arc<RwLock<HashMap<TunnelId, TunnelRecord>>>);

impl TunnelTable {
    /// A snapshot of every live tunnel.
    pub fn snapshot(&self) -> Vec<TunnelRecord> {
        self.0
            .read()
            .expect("table lock")
            .values()
            .cloned()
            .collect()
    }

    /// One live tunnel.
    pub fn get(&self, id: &TunnelId) -> Option<TunnelRecord> {
        self.0.read().expect("table lock").get(id).cloned()
    }

    fn put(&self, record: &TunnelRecord) {
        let mut table = self.0.write().expect("table lock");
        match table.get_mut(&record.id) {
            Some(row) => row.clone_from(record),
            None => {
                table.insert(record.id.clone(), record.clone());
            }
        }
    }

    fn remove(&self, id: &TunnelId) {
        self.0.write().expect("table lock").remove(id);
    }
}
