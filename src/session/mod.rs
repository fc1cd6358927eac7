//! The session table: one driver task per bot owns that bot's tunnels and their single timer.
//!
//! A driver receives the stanzas the router addressed to its bot, feeds them to the tunnel
//! engine, writes what the engines emit to the component link, runs the bot's handler on the
//! decrypted stanzas, and keeps the live session table and the store's history current.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use minidom::Element;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::config::{EventsConfig, Handler, LimitsConfig, WebhooksConfig};
use crate::delivery::webhook::{self, Deliverer, ReplySink};
use crate::store::{
    BotRecord, PeerIdentityRecord, Store, StoreError, StoredBot, TunnelRecord, now,
};
use crate::store::{NewEvent, OutMsg};
use xtls::certs::{BotIdentity, Fingerprints, normalize_bare};
use xtls::stanza::xtls::XtlsElement;
use xtls::stanza::{DefinedCondition, ErrorType, Iq, IqType, build_iq, error_reply, name, ns};
use xtls::tunnel::{
    BotCredentials, CloseReason, Event, PeerAuth, PeerPolicy, StartDecision, State, TrustMode,
    Tunnel, TunnelConfig, TunnelKey, TunnelParams, bare, classify_request, decide_start,
};

mod outbound;
mod rate;

pub use outbound::Submitted;

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
    /// Capacity caps.
    pub limits: LimitsConfig,
    /// The component domain.
    pub domain: String,
    /// Most events committed in one transaction.
    pub max_batch: usize,
    /// Webhook delivery settings.
    pub webhooks: Arc<WebhooksConfig>,
    /// Whether the component link is authenticated.
    pub link_up: std::sync::atomic::AtomicBool,
    /// Counters and histograms.
    pub metrics: crate::metrics::Metrics,
    start_rate: rate::StartRate,
    handshakes: AtomicUsize,
    tunnels: AtomicUsize,
}

impl Shared {
    /// Bundles the shared parts.
    pub fn new(
        store: Store,
        out: mpsc::Sender<Element>,
        tunnel_config: TunnelConfig,
        limits: LimitsConfig,
        domain: String,
        events: &EventsConfig,
        webhooks: WebhooksConfig,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            start_rate: rate::StartRate::new(
                limits.starts_per_peer_per_minute,
                limits.start_burst_per_peer,
            ),
            store,
            out,
            table: TunnelTable::default(),
            tunnel_config,
            limits,
            domain,
            max_batch: events.max_batch.max(1),
            webhooks: Arc::new(webhooks),
            link_up: Default::default(),
            metrics: Default::default(),
            handshakes: AtomicUsize::new(0),
            tunnels: AtomicUsize::new(0),
        })
    }
}

/// The live part of the session table, readable by the admin API.
#[derive(Debug, Clone, Default)]
pub struct TunnelTable(Arc<RwLock<HashMap<String, TunnelRecord>>>);

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
    pub fn get(&self, id: &str) -> Option<TunnelRecord> {
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

    fn remove(&self, id: &str) {
        self.0.write().expect("table lock").remove(id);
    }
}

/// What a driver is asked to do.
#[derive(Debug)]
pub enum BotCommand {
    /// A stanza addressed to the bot.
    Stanza(Element),
    /// Close one tunnel gracefully; answers whether it existed.
    CloseTunnel(String, oneshot::Sender<bool>),
    /// The server link was lost: every tunnel is gone.
    LinkDown,
    /// The server link is back: tell former peers their tunnels are gone.
    LinkUp,
    /// Inner stanzas to send into a live tunnel, by tunnel id.
    Reply(String, Vec<Element>),
    /// A message from the API.
    Submit(Box<OutMsg>, oneshot::Sender<Submitted>),
    /// Open a tunnel to a full JID.
    Open(String, oneshot::Sender<Submitted>),
    /// Close every tunnel and stop.
    Stop(CloseReason, oneshot::Sender<()>),
}

/// A running bot as the rest of the component sees it.
#[derive(Debug, Clone)]
pub struct BotHandle {
    /// The stored bot.
    pub record: BotRecord,
    /// Its certificate fingerprints.
    pub fingerprints: Fingerprints,
    /// Its identity (certificate PEM and validity for the API).
    pub identity: Arc<BotIdentity>,
    /// The `seq` of the newest committed event.
    pub events: watch::Receiver<u64>,
    /// Wakes the webhook deliverer when the webhook or the dead letters change.
    pub webhook_changed: Arc<tokio::sync::Notify>,
    tx: mpsc::Sender<BotCommand>,
}

impl ReplySink for BotHandle {
    async fn reply(&self, tunnel_id: String, stanzas: Vec<Element>) {
        let _ = self.tx.send(BotCommand::Reply(tunnel_id, stanzas)).await;
    }
}

impl BotHandle {
    /// Closes the bot's tunnels and stops its driver; returns once it stopped.
    async fn stop(&self, reason: CloseReason) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(BotCommand::Stop(reason, done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Hands a stored message to the driver; its first outcome, or `None` when the driver
    /// did not answer in time (the message stays accepted and is reported by its status).
    pub async fn submit(&self, msg: OutMsg) -> Option<Submitted> {
        self.ask(|tx| BotCommand::Submit(Box::new(msg), tx)).await
    }

    /// Asks the driver to open a tunnel to a full JID.
    pub async fn open(&self, peer: String) -> Option<Submitted> {
        self.ask(|tx| BotCommand::Open(peer, tx)).await
    }

    /// Sends a command and waits (bounded) for the driver's first answer to it.
    async fn ask(
        &self,
        command: impl FnOnce(oneshot::Sender<Submitted>) -> BotCommand,
    ) -> Option<Submitted> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(command(tx)).await.ok()?;
        tokio::time::timeout(Duration::from_secs(15), rx)
            .await
            .ok()?
            .ok()
    }

    /// Hands a stanza to the driver without waiting; `Err` when its queue is full or it stopped.
    pub fn try_deliver(
        &self,
        stanza: Element,
    ) -> Result<(), mpsc::error::TrySendError<BotCommand>> {
        self.tx.try_send(BotCommand::Stanza(stanza))
    }
}

/// Why a bot could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BotError {
    /// The localpart does not make a valid JID.
    #[error("'{0}' is not a valid localpart")]
    InvalidLocalpart(String),
    /// A bot with that JID exists.
    #[error("bot {0} already exists")]
    Duplicate(String),
    /// Certificate generation failed.
    #[error(transparent)]
    Cert(#[from] xtls::certs::CertError),
    /// The bot key is unusable for TLS.
    #[error(transparent)]
    Credentials(#[from] xtls::tunnel::CredentialsError),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for BotError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Duplicate(what) => BotError::Duplicate(what),
            other => BotError::Store(other),
        }
    }
}

/// What a new bot is.
#[derive(Debug, Clone)]
pub struct NewBot {
    /// The localpart.
    pub localpart: String,
    /// The handler.
    pub handler: Handler,
    /// Whether peers must present certificates.
    pub peer_auth: PeerAuth,
    /// How peer keys are trusted.
    pub trust: TrustMode,
}

/// The registry of running bots.
#[derive(Debug, Clone)]
pub struct BotTable {
    bots: Arc<RwLock<HashMap<String, BotHandle>>>,
    shared: Arc<Shared>,
}

fn peer_auth_str(p: PeerAuth) -> &'static str {
    match p {
        PeerAuth::Required => "required",
        PeerAuth::Optional => "optional",
    }
}

fn trust_str(t: TrustMode) -> &'static str {
    match t {
        TrustMode::Tofu => "tofu",
        TrustMode::Pinned => "pinned",
    }
}

/// What a bot's tasks start from.
struct Start {
    /// The highest event `seq` given so far.
    last_seq: u64,
    /// Whether messages of a previous run are unfinished.
    recover: bool,
    /// The webhook as loaded with every bot's (`None`: none set).
    webhook: Option<crate::store::Webhook>,
}

impl BotTable {
    /// Loads every stored bot and starts its driver.
    pub async fn load(shared: Arc<Shared>) -> Result<BotTable, BotError> {
        let table = BotTable {
            bots: Arc::default(),
            shared,
        };
        let stored = table.shared.store.load_bots().await?;
        // What each bot's tasks would otherwise ask the store one by one at start.
        let unfinished = table.shared.store.bots_with_unfinished_messages().await?;
        let mut webhooks = table.shared.store.webhooks().await?;
        // Parsing certificates and loading keys is CPU work: spread it over the cores, off
        // the async workers (10,000 bots must be ready within seconds).
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = stored.len().div_ceil(threads).max(1);
        let mut stored = stored.into_iter();
        let mut jobs = Vec::new();
        loop {
            let part: Vec<StoredBot> = stored.by_ref().take(chunk).collect();
            if part.is_empty() {
                break;
            }
            jobs.push(tokio::task::spawn_blocking(move || {
                part.into_iter()
                    .map(|b| {
                        let identity = BotIdentity::from_der(&b.record.jid, b.cert_der, b.key_der)?;
                        let creds = BotCredentials::new(identity)?;
                        Ok::<_, BotError>((b.record, creds, b.last_seq))
                    })
                    .collect::<Result<Vec<_>, BotError>>()
            }));
        }
        for job in jobs {
            for (record, creds, last_seq) in job.await.expect("bot loading does not panic")? {
                let start = Start {
                    last_seq,
                    recover: unfinished.contains(&record.jid),
                    webhook: webhooks.remove(&record.jid),
                };
                table.start(record, creds, start);
            }
        }
        Ok(table)
    }

    /// The shared parts.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Creates, stores and starts a bot.
    pub async fn create(&self, new: NewBot) -> Result<BotHandle, BotError> {
        let jid = normalize_bare(&format!("{}@{}", new.localpart, self.shared.domain))
            .filter(|_| !new.localpart.is_empty() && !new.localpart.contains(['/', '@']))
            .ok_or_else(|| BotError::InvalidLocalpart(new.localpart.clone()))?;
        let localpart = jid.split('@').next().unwrap_or_default().to_owned();
        if self.by_localpart(&localpart).is_some() {
            return Err(BotError::Duplicate(jid));
        }
        let identity = BotIdentity::generate(&jid)?;
        let record = BotRecord {
            jid,
            localpart,
            handler: new.handler.as_str().to_owned(),
            peer_auth: peer_auth_str(new.peer_auth).to_owned(),
            trust: trust_str(new.trust).to_owned(),
            created_at: now(),
        };
        self.shared.store.insert_bot(&record, &identity).await?;
        tracing::info!(bot = record.jid, spki_sha256 = %identity.info.fingerprints.spki_sha256, "bot created");
        let start = Start {
            last_seq: 0,
            recover: false,
            webhook: None,
        };
        Ok(self.start(record, BotCredentials::new(identity)?, start))
    }

    fn start(&self, record: BotRecord, creds: BotCredentials, start: Start) -> BotHandle {
        let Start {
            last_seq,
            recover,
            webhook,
        } = start;
        let (tx, rx) = mpsc::channel(self.shared.limits.bot_queue.max(1));
        let (events_tx, events) = watch::channel(last_seq);
        let handle = BotHandle {
            fingerprints: creds.identity.info.fingerprints.clone(),
            identity: creds.identity.clone(),
            record: record.clone(),
            events,
            webhook_changed: Arc::default(),
            tx,
        };
        let handler = Handler::parse(&record.handler).unwrap_or(Handler::Echo);
        let driver = BotDriver {
            recover_at_start: recover,
            stopping: None,
            started_at: crate::store::now(),
            handler,
            logging: handler == Handler::Api,
            last_seq,
            events_tx,
            pending_events: Vec::new(),
            held: Vec::new(),
            out: outbound::Outbound::default(),
            peer_auth: if record.peer_auth == "optional" {
                PeerAuth::Optional
            } else {
                PeerAuth::Required
            },
            trust: if record.trust == "pinned" {
                TrustMode::Pinned
            } else {
                TrustMode::Tofu
            },
            bot: record,
            creds,
            rx,
            shared: self.shared.clone(),
            tunnels: HashMap::new(),
            former_peers: Arc::default(),
            pacer_generation: Arc::default(),
        };
        self.bots
            .write()
            .expect("bots lock")
            .insert(handle.record.localpart.clone(), handle.clone());
        tokio::spawn(driver.run());
        if handler == Handler::Api {
            let deliverer = Deliverer {
                bot: handle.record.jid.clone(),
                store: self.shared.store.clone(),
                config: self.shared.webhooks.clone(),
                committed: handle.events.clone(),
                webhook_changed: handle.webhook_changed.clone(),
                replies: handle.clone(),
                counter: self.shared.metrics.webhook_deliveries.clone(),
            };
            tokio::spawn(webhook::run(deliverer, Some(webhook)));
        }
        handle
    }

    /// The bot with this localpart (case-insensitive per RFC 7622 preparation).
    pub fn by_localpart(&self, localpart: &str) -> Option<BotHandle> {
        let key = normalize_bare(&format!("{localpart}@{}", self.shared.domain))?;
        let lp = key.split('@').next()?.to_owned();
        self.bots.read().expect("bots lock").get(&lp).cloned()
    }

    /// The bot with this bare JID.
    pub fn by_jid(&self, jid: &str) -> Option<BotHandle> {
        let jid = normalize_bare(jid)?;
        let (lp, domain) = jid.split_once('@')?;
        (domain == self.shared.domain)
            .then(|| self.by_localpart(lp))
            .flatten()
    }

    /// Every bot, by JID.
    pub fn list(&self) -> Vec<BotHandle> {
        let mut bots: Vec<_> = self
            .bots
            .read()
            .expect("bots lock")
            .values()
            .cloned()
            .collect();
        bots.sort_by(|a, b| a.record.jid.cmp(&b.record.jid));
        bots
    }

    /// Closes a bot's tunnels, stops it and deletes it; `false` when it did not exist.
    pub async fn delete(&self, jid: &str) -> Result<bool, BotError> {
        let Some(handle) = self.by_jid(jid) else {
            return Ok(false);
        };
        self.bots
            .write()
            .expect("bots lock")
            .remove(&handle.record.localpart);
        handle.stop(CloseReason::BotDeleted).await;
        self.shared.store.delete_bot(&handle.record.jid).await?;
        tracing::info!(bot = handle.record.jid, "bot deleted");
        Ok(true)
    }

    /// Asks the owner of a live tunnel to close it; `false` when no live tunnel has that id.
    pub async fn close_tunnel(&self, id: &str) -> bool {
        let Some(record) = self.shared.table.get(id) else {
            return false;
        };
        let Some(handle) = self.by_jid(&record.bot) else {
            return false;
        };
        let (tx, rx) = oneshot::channel();
        if handle
            .tx
            .send(BotCommand::CloseTunnel(id.to_owned(), tx))
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Tells every driver about the link.
    pub async fn broadcast_link(&self, up: bool) {
        self.shared.link_up.store(up, Ordering::Relaxed);
        for bot in self.list() {
            let cmd = if up {
                BotCommand::LinkUp
            } else {
                BotCommand::LinkDown
            };
            let _ = bot.tx.send(cmd).await;
        }
    }

    /// Stops every driver, closing their tunnels.
    pub async fn stop_all(&self) {
        let bots = self.list();
        futures_util::future::join_all(bots.iter().map(|bot| bot.stop(CloseReason::Shutdown)))
            .await;
    }
}

struct Live {
    tunnel: Tunnel,
    /// When the tunnel was created (for the handshake duration).
    created: Instant,
    record: TunnelRecord,
    /// Whether this tunnel counts against the concurrent-handshake cap.
    in_handshake: bool,
}

impl Live {
    /// Whether the tunnel's counters or state moved since the record last took them.
    fn changed(&self) -> bool {
        let stats = self.tunnel.stats();
        let r = &self.record;
        (
            stats.stanzas_in,
            stats.stanzas_out,
            stats.bytes_in,
            stats.bytes_out,
        ) != (r.stanzas_in, r.stanzas_out, r.bytes_in, r.bytes_out)
            || self.tunnel.is_gone()
            || r.state != state_str(self.tunnel.state())
    }
}

/// A driver closing its tunnels before it stops.
struct Stopping {
    deadline: Instant,
    reason: CloseReason,
    done: Vec<oneshot::Sender<()>>,
}

/// How long a stopping driver waits for its peers to answer the graceful close.
const STOP_GRACE: Duration = Duration::from_secs(5);

struct BotDriver {
    bot: BotRecord,
    /// Whether a previous run left messages to recover (read once for all bots at start-up).
    recover_at_start: bool,
    /// Set once asked to stop: new work is refused while the tunnels close.
    stopping: Option<Stopping>,
    /// When this driver was made: messages accepted earlier belong to a previous run.
    started_at: String,
    handler: Handler,
    /// Whether this bot keeps an event log (the `api` handler).
    logging: bool,
    /// The `seq` of the newest committed event.
    last_seq: u64,
    events_tx: watch::Sender<u64>,
    /// Events of this step, committed before `held` goes out; stanza events name their tunnel.
    pending_events: Vec<(Option<TunnelKey>, NewEvent)>,
    /// Stanzas for the server, held until this step's events are committed (the durability
    /// rule: a `data` IQ is acknowledged only once what it carried is stored).
    held: Vec<(Option<TunnelKey>, Element)>,
    /// Messages the bot sends.
    out: outbound::Outbound,
    peer_auth: PeerAuth,
    trust: TrustMode,
    creds: BotCredentials,
    rx: mpsc::Receiver<BotCommand>,
    shared: Arc<Shared>,
    tunnels: HashMap<TunnelKey, Live>,
    /// Peers of tunnels lost with the link, told with `<close/>` once it is back.
    former_peers: Arc<std::sync::Mutex<std::collections::VecDeque<TunnelKey>>>,
    /// Which link session's pacer may send `<close/>`s to `former_peers`.
    pacer_generation: Arc<std::sync::atomic::AtomicU64>,
}

fn state_str(s: State) -> &'static str {
    match s {
        State::Starting => "starting",
        State::Handshaking => "handshaking",
        State::Open => "open",
        State::Closing => "closing",
        State::Closed => "closed",
    }
}

fn normalize(jid: &str) -> Option<String> {
    jid::Jid::new(jid).ok().map(|j| j.to_string())
}

/// Events kept for the next commit while the store refuses them.
const MAX_RETAINED_EVENTS: usize = 10_000;

fn random_prefix() -> String {
    format!("x{:016x}-", rand::random::<u64>())
}

/// A `<close/>` for a tunnel that no engine holds any more (lost with the link, or dropped
/// at shutdown): its answer matches nothing and is dropped.
fn standalone_close(key: &TunnelKey) -> Element {
    build_iq(
        IqType::Set,
        &format!("{}1", random_prefix()),
        &key.local,
        &key.peer,
        Some(XtlsElement::Close.to_element()),
    )
}

impl BotDriver {
    async fn run(mut self) {
        if self.recover_at_start {
            self.recover_messages().await;
        }
        self.pump().await;
        self.flush().await;
        loop {
            let deadline = self
                .tunnels
                .values()
                .filter_map(|l| l.tunnel.poll_timeout())
                .min()
                .map(Instant::from_std)
                .into_iter()
                .chain(self.disco_deadline())
                .chain(self.stopping.as_ref().map(|s| s.deadline))
                .min();
            tokio::select! {
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    if self.dispatch(cmd).await {
                        return;
                    }
                    // Take what is already queued too, so one commit covers many `data` IQs.
                    for _ in 1..self.shared.max_batch {
                        let Ok(cmd) = self.rx.try_recv() else { break };
                        if self.dispatch(cmd).await {
                            return;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    let now = Instant::now().into_std();
                    for live in self.tunnels.values_mut() {
                        if live.tunnel.poll_timeout().is_some_and(|at| at <= now) {
                            live.tunnel.handle_timeout(now);
                        }
                    }
                    self.disco_timeouts(Instant::from_std(now)).await;
                }
            }
            self.pump().await;
            if !self.out.resubmit.is_empty() {
                self.resubmit().await;
                self.pump().await;
            }
            self.flush().await;
            if self.finish_stopping().await {
                return;
            }
        }
    }

    /// Handles one command; `true` once the driver has stopped.
    async fn dispatch(&mut self, cmd: BotCommand) -> bool {
        if let BotCommand::Stop(reason, done) = cmd {
            if let Some(stopping) = self.stopping.as_mut() {
                stopping.done.push(done);
                return false;
            }
            // Graceful: close_notify and `<close/>` on every tunnel, then wait (bounded)
            // for the peers' answers while the driver keeps running.
            let now = Instant::now();
            for (key, live) in self.tunnels.iter_mut() {
                if live.tunnel.state() == State::Open {
                    live.tunnel.close_because(now.into_std(), reason.clone());
                } else if live.tunnel.state() != State::Closed {
                    // Nothing to protect before the handshake is done: `<close/>` at once.
                    self.held.push((None, standalone_close(key)));
                    live.tunnel.abandon(reason.clone());
                }
            }
            self.stopping = Some(Stopping {
                deadline: now + STOP_GRACE,
                reason,
                done: vec![done],
            });
            return false;
        }
        self.handle(cmd).await;
        false
    }

    /// Once stopping and every tunnel is closed (or the grace period is over): stops.
    async fn finish_stopping(&mut self) -> bool {
        let Some(stopping) = self.stopping.as_ref() else {
            return false;
        };
        if !self.tunnels.is_empty() && Instant::now() < stopping.deadline {
            return false;
        }
        let stopping = self.stopping.take().expect("checked");
        self.stop(stopping.reason).await;
        for done in stopping.done {
            let _ = done.send(());
        }
        true
    }

    /// Queues a stanza for the server; it leaves at the end of this step.
    async fn send(&mut self, stanza: Element) {
        self.held.push((None, stanza));
    }

    /// Logs an event; `acked_by` names the tunnel whose `data` acknowledgement waits for it
    /// (a stanza that arrived), so a failed commit refuses that acknowledgement.
    fn log(&mut self, acked_by: Option<&TunnelKey>, event: NewEvent) {
        if self.logging {
            self.pending_events.push((acked_by.cloned(), event));
        }
    }

    /// Commits this step's events, then releases the held stanzas. When the commit fails,
    /// the acknowledgements of the tunnels whose stanzas were not stored become errors and
    /// those tunnels end: the peer must not believe they arrived.
    async fn flush(&mut self) {
        if !self.pending_events.is_empty() {
            let (keys, events): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.pending_events).into_iter().unzip();
            match self
                .shared
                .store
                .append_events(&self.bot.jid, self.last_seq, &events)
                .await
            {
                Ok(stored) => {
                    self.last_seq += stored.len() as u64;
                    self.events_tx.send_replace(self.last_seq);
                }
                Err(e) => {
                    tracing::error!(bot = self.bot.jid, error = %e, "cannot commit events; refusing the stanzas they carried");
                    if matches!(e, StoreError::Conflict(_))
                        && let Ok(last) = self.shared.store.last_seq(&self.bot.jid).await
                    {
                        self.last_seq = last;
                    }
                    let mut failed: HashSet<TunnelKey> = HashSet::new();
                    for (key, event) in keys.into_iter().zip(events) {
                        match key {
                            Some(key) => {
                                failed.insert(key);
                            }
                            // Nothing was acknowledged on its account: it waits for the next
                            // commit (within reason while the store stays down).
                            None if self.pending_events.len() < MAX_RETAINED_EVENTS => {
                                self.pending_events.push((None, event))
                            }
                            None => tracing::error!(
                                bot = self.bot.jid,
                                kind = event.kind,
                                "event dropped: the store stays unavailable"
                            ),
                        }
                    }
                    self.held = std::mem::take(&mut self.held)
                        .into_iter()
                        .filter_map(|(key, el)| match &key {
                            Some(k) if failed.contains(k) => {
                                refuse_ack(&el).map(|error| (key, error))
                            }
                            _ => Some((key, el)),
                        })
                        .collect();
                    for key in &failed {
                        if let Some(live) = self.tunnels.get_mut(key) {
                            live.tunnel.abandon(CloseReason::StoreUnavailable);
                        }
                    }
                }
            }
        }
        for (_, stanza) in std::mem::take(&mut self.held) {
            if self.shared.out.send(stanza).await.is_err() {
                tracing::debug!("outbound channel closed");
            }
        }
    }

    async fn handle(&mut self, cmd: BotCommand) {
        match cmd {
            BotCommand::Stanza(el) => self.handle_stanza(el).await,
            BotCommand::CloseTunnel(id, done) => {
                let now = Instant::now().into_std();
                let found = self.tunnels.values_mut().find(|l| l.record.id == id);
                let exists = found.is_some();
                if let Some(live) = found {
                    live.tunnel.close(now);
                }
                let _ = done.send(exists);
            }
            BotCommand::LinkDown => {
                let mut former = self.former_peers.lock().expect("former peers lock");
                for (key, live) in self.tunnels.iter_mut() {
                    live.tunnel.abandon(CloseReason::ConnectionLost);
                    former.push_back(key.clone());
                }
            }
            BotCommand::LinkUp => {
                // Spec §3.5 rule 4: paced `<close/>` so peers drop zombie state.
                // A new tunnel to one of them takes it off the list (`adopt`): its `start`
                // replaces the stale state, and a late `<close/>` would end the new tunnel.
                // One pacer per link session: it stops when the link goes down again (the
                // rest waits for the next one), so no `<close/>` is spent on a dead link.
                let generation = self.pacer_generation.fetch_add(1, Ordering::Relaxed) + 1;
                let current = self.pacer_generation.clone();
                let peers = self.former_peers.clone();
                let shared = self.shared.clone();
                let out = self.shared.out.clone();
                tokio::spawn(async move {
                    loop {
                        if !shared.link_up.load(Ordering::Relaxed)
                            || current.load(Ordering::Relaxed) != generation
                        {
                            return;
                        }
                        let next = peers.lock().expect("former peers lock").pop_front();
                        let Some(key) = next else { return };
                        if out.send(standalone_close(&key)).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                });
            }
            BotCommand::Reply(id, stanzas) => {
                let now = Instant::now().into_std();
                match self.tunnels.values_mut().find(|l| l.record.id == id) {
                    Some(live) => {
                        let peer = live.record.peer.clone();
                        let failures: Vec<String> = stanzas
                            .into_iter()
                            .filter_map(|stanza| live.tunnel.send(now, stanza).err())
                            .map(|e| e.to_string())
                            .collect();
                        for e in failures {
                            self.reply_failed(&id, Some(peer.clone()), &e);
                        }
                    }
                    None => self.reply_failed(&id, None, "the tunnel is gone"),
                }
            }
            BotCommand::Submit(msg, reply) => self.submit(*msg, Some(reply)).await,
            BotCommand::Open(peer, reply) => self.open_to(peer, reply).await,
            BotCommand::Stop(..) => unreachable!("handled by dispatch"),
        }
    }

    /// A webhook's synchronous reply could not go into its tunnel: said in the log.
    fn reply_failed(&mut self, tunnel_id: &str, peer: Option<String>, why: &str) {
        tracing::warn!(
            bot = self.bot.jid,
            tunnel = tunnel_id,
            why,
            "webhook reply not sent"
        );
        self.log(
            None,
            NewEvent {
                kind: "delivery.status",
                tunnel_id: Some(tunnel_id.to_owned()),
                peer,
                data: serde_json::json!({
                    "message_id": null,
                    "status": "failed",
                    "reason": format!("webhook reply not sent: {why}"),
                }),
            },
        );
    }

    async fn stop(&mut self, reason: CloseReason) {
        for (key, live) in self.tunnels.iter_mut() {
            if live.tunnel.state() != State::Closed {
                let _ = self.shared.out.send(standalone_close(key)).await;
                live.tunnel.abandon(reason.clone());
            }
        }
        self.pump().await;
        self.flush().await;
    }

    async fn handle_stanza(&mut self, el: Element) {
        match el.name() {
            "iq" => self.handle_iq(el).await,
            "presence" => self.handle_presence(el).await,
            // The echo bot answers a plain message in plain: the baseline the load tool
            // measures tunnels against (docs/performance.md).
            "message" if self.handler == Handler::Echo => {
                let (Some(from), Some(to)) = (el.attr("from"), el.attr("to")) else {
                    return;
                };
                if let Some(mut reply) = echo(&el) {
                    reply.set_attr(rxml::Namespace::NONE, name("from"), to);
                    reply.set_attr(rxml::Namespace::NONE, name("to"), from);
                    self.send(reply).await;
                }
            }
            "message" => {
                tracing::debug!(
                    bot = self.bot.jid,
                    from = el.attr("from"),
                    "message in clear ignored"
                );
            }
            _ => {}
        }
    }

    async fn handle_presence(&mut self, el: Element) {
        self.track_presence(&el);
        let from = el.attr("from").unwrap_or_default().to_owned();
        let to = el.attr("to").unwrap_or(&self.bot.jid).to_owned();
        let presence = |type_: Option<&str>| {
            let mut p = Element::builder("presence", ns::CLIENT)
                .attr(name("from"), bare(&to))
                .attr(name("to"), bare(&from))
                .build();
            if let Some(t) = type_ {
                p.set_attr(rxml::Namespace::NONE, name("type"), t);
            }
            p
        };
        match el.attr("type") {
            Some("subscribe") => {
                self.send(presence(Some("subscribed"))).await;
                self.send(presence(None)).await;
            }
            Some("probe") => self.send(presence(None)).await,
            Some("unavailable") => {
                // Spec §1.13: the peer went away, its tunnels with it (no `<close/>`).
                let Some(from) = normalize(&from) else { return };
                for (key, live) in self.tunnels.iter_mut() {
                    if key.peer == from || (!from.contains('/') && bare(&key.peer) == from) {
                        live.tunnel.abandon(CloseReason::PeerGone);
                    }
                }
            }
            _ => {}
        }
    }

    async fn handle_iq(&mut self, el: Element) {
        let Ok(iq) = Iq::parse(&el) else {
            if el.attr("type") != Some("error") && el.attr("type") != Some("result") {
                self.send(error_reply(
                    &el,
                    ErrorType::Modify,
                    DefinedCondition::BadRequest,
                    "malformed IQ",
                ))
                .await;
            }
            return;
        };
        let now = Instant::now().into_std();
        let (Some(local), Some(peer)) = (normalize(&iq.to), normalize(&iq.from)) else {
            if iq.type_.is_request() {
                self.send(iq.error(ErrorType::Modify, DefinedCondition::JidMalformed, ""))
                    .await;
            }
            return;
        };
        let key = TunnelKey { local, peer };
        if !iq.type_.is_request() && self.on_disco_answer(&iq).await {
            return;
        }
        if !iq.type_.is_request() {
            if let Some(live) = self.tunnels.get_mut(&key) {
                live.tunnel.handle_iq(now, &iq);
            } else {
                tracing::debug!(
                    bot = self.bot.jid,
                    id = iq.id,
                    "answer for no tunnel dropped"
                );
            }
            return;
        }
        let xtls = iq.children.iter().any(|c| c.ns() == ns::XTLS);
        if xtls {
            match classify_request(&iq) {
                Err(reply) => {
                    self.send(reply).await;
                    // After any error about a tunnel, it is gone (spec §1.11).
                    if let Some(live) = self.tunnels.get_mut(&key) {
                        live.tunnel
                            .abandon(CloseReason::Protocol("malformed XTLS request".into()));
                    }
                }
                Ok(XtlsElement::Start { offer }) => self.handle_start(now, key, &iq, offer).await,
                Ok(_) => match self.tunnels.get_mut(&key) {
                    Some(live) if live.tunnel.state() != State::Closed => {
                        live.tunnel.handle_iq(now, &iq)
                    }
                    _ => {
                        self.send(iq.error(
                            ErrorType::Cancel,
                            DefinedCondition::ItemNotFound,
                            "no such tunnel",
                        ))
                        .await
                    }
                },
            }
            return;
        }
        let reply = match iq.single_payload() {
            None => iq.error(
                ErrorType::Modify,
                DefinedCondition::BadRequest,
                "an IQ request carries exactly one child",
            ),
            Some(p)
                if iq.type_ == IqType::Get
                    && p.is("query", ns::DISCO_INFO)
                    && p.attr("node").is_none() =>
            {
                iq.result(Some(bot_disco_info()))
            }
            Some(p) if iq.type_ == IqType::Get && p.is("ping", ns::PING) => iq.result(None),
            Some(_) => iq.error(ErrorType::Cancel, DefinedCondition::ServiceUnavailable, ""),
        };
        self.send(reply).await;
    }

    async fn handle_start(
        &mut self,
        now: std::time::Instant,
        key: TunnelKey,
        iq: &Iq,
        offer: Option<xtls::stanza::xtls::Offer>,
    ) {
        // Before anything else: a flood of starts must not replace a live tunnel either.
        if !self.shared.start_rate.allow(bare(&key.peer), now) {
            self.shared.metrics.rejected("start_rate");
            self.send(iq.error(
                ErrorType::Wait,
                DefinedCondition::ResourceConstraint,
                "too many starts from this peer",
            ))
            .await;
            return;
        }
        match decide_start(self.tunnels.get(&key).map(|live| &live.tunnel)) {
            StartDecision::Accept => {}
            StartDecision::Conflict => {
                self.send(iq.error(ErrorType::Cancel, DefinedCondition::Conflict, ""))
                    .await;
                return;
            }
            StartDecision::Replace => {
                if let Some(live) = self.tunnels.get_mut(&key) {
                    live.tunnel.abandon(CloseReason::Replaced);
                }
                self.pump().await;
            }
        }
        if let Some(text) = self.over_limit(&key) {
            self.send(iq.error(ErrorType::Wait, DefinedCondition::ResourceConstraint, text))
                .await;
            return;
        }
        let params = match self.tunnel_params(&key).await {
            Ok(params) => params,
            Err(e) => {
                tracing::error!(error = %e, "cannot read pins");
                self.send(iq.error(
                    ErrorType::Wait,
                    DefinedCondition::InternalServerError,
                    "store unavailable",
                ))
                .await;
                return;
            }
        };
        match Tunnel::accept(now, params, iq, offer.as_ref()) {
            Err(refusal) => {
                tracing::info!(bot = self.bot.jid, peer = key.peer, condition = ?refusal.condition, "start refused");
                self.send(refusal.reply).await;
            }
            Ok(tunnel) => {
                self.adopt(key, tunnel).await;
            }
        }
    }

    /// Which capacity cap a new tunnel to `key` would exceed.
    fn over_limit(&self, key: &TunnelKey) -> Option<&'static str> {
        let over = self.which_limit(key);
        if let Some((kind, _)) = over {
            self.shared.metrics.rejected(kind);
        }
        over.map(|(_, text)| text)
    }

    /// The limit (kind and text) a new tunnel to `key` would exceed.
    fn which_limit(&self, key: &TunnelKey) -> Option<(&'static str, &'static str)> {
        if self.stopping.is_some() {
            return Some(("stopping", "the bot is stopping"));
        }
        let limits = &self.shared.limits;
        let peer_bare = bare(&key.peer);
        let per_peer = self
            .tunnels
            .keys()
            .filter(|k| bare(&k.peer) == peer_bare)
            .count();
        if self.tunnels.len() >= limits.tunnels_per_bot {
            Some(("tunnels_per_bot", "too many tunnels for this bot"))
        } else if per_peer >= limits.tunnels_per_peer {
            Some(("tunnels_per_peer", "too many tunnels for this peer"))
        } else if self.shared.tunnels.load(Ordering::Relaxed) >= limits.tunnels_total {
            Some(("tunnels_total", "too many tunnels"))
        } else if self.shared.handshakes.load(Ordering::Relaxed) >= limits.handshakes {
            Some(("handshakes", "too many handshakes in progress"))
        } else {
            None
        }
    }

    /// What a new tunnel to `key` is made of, with the pins held for the peer.
    async fn tunnel_params(&self, key: &TunnelKey) -> Result<TunnelParams, StoreError> {
        let pins = self
            .shared
            .store
            .pins(&self.bot.jid, bare(&key.peer))
            .await?;
        Ok(TunnelParams {
            config: self.shared.tunnel_config.clone(),
            key: key.clone(),
            creds: self.creds.clone(),
            policy: PeerPolicy {
                peer_auth: self.peer_auth,
                trust: self.trust,
                pins,
            },
            id_prefix: random_prefix(),
        })
    }

    /// Takes a new tunnel into the session table; returns its id.
    async fn adopt(&mut self, key: TunnelKey, tunnel: Tunnel) -> String {
        let role = match tunnel.role() {
            xtls::tunnel::Role::Initiator => "initiator",
            xtls::tunnel::Role::Responder => "responder",
        };
        let record = TunnelRecord::new(
            format!("{:016x}", rand::random::<u64>()),
            &self.bot.jid,
            &key,
            role,
            state_str(tunnel.state()),
            crate::store::now(),
        );
        tracing::info!(
            bot = self.bot.jid,
            peer = key.peer,
            tunnel = record.id,
            role,
            "tunnel created"
        );
        self.former_peers
            .lock()
            .expect("former peers lock")
            .retain(|k| *k != key);
        self.save(&record).await;
        self.shared.table.put(&record);
        // Tied to the tunnel: while the store cannot take it, the `proceed` (or our `start`)
        // is held back, the peer is told to wait, and the tunnel ends before it begins.
        self.log(
            Some(&key),
            NewEvent {
                kind: "tunnel.opened",
                tunnel_id: Some(record.id.clone()),
                peer: Some(key.peer.clone()),
                data: serde_json::json!({ "role": role }),
            },
        );
        self.shared.handshakes.fetch_add(1, Ordering::Relaxed);
        self.shared.tunnels.fetch_add(1, Ordering::Relaxed);
        let id = record.id.clone();
        self.tunnels.insert(
            key,
            Live {
                tunnel,
                record,
                created: Instant::now(),
                in_handshake: true,
            },
        );
        id
    }

    async fn save(&self, record: &TunnelRecord) {
        if let Err(e) = self.shared.store.save_tunnel(record).await {
            tracing::error!(error = %e, tunnel = record.id, "cannot record tunnel");
        }
    }

    /// Drains every tunnel's output and events until nothing moves; drops finished tunnels.
    async fn pump(&mut self) {
        // Only the tunnels with output or news: a stanza touches one tunnel of many, and
        // copying every record on every stanza made a busy bot's cost grow with its tunnels.
        let keys: Vec<TunnelKey> = self
            .tunnels
            .iter()
            .filter(|(_, live)| live.tunnel.has_output() || live.changed())
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            while let Some(live) = self.tunnels.get_mut(&key) {
                let mut stanzas = Vec::new();
                while let Some(el) = live.tunnel.poll_transmit() {
                    stanzas.push(el);
                }
                let mut events = Vec::new();
                while let Some(ev) = live.tunnel.poll_event() {
                    events.push(ev);
                }
                if stanzas.is_empty() && events.is_empty() {
                    break;
                }
                self.held
                    .extend(stanzas.into_iter().map(|el| (Some(key.clone()), el)));
                for ev in events {
                    self.on_event(&key, ev).await;
                }
            }
            if let Some(live) = self.tunnels.get_mut(&key) {
                let stats = live.tunnel.stats();
                let r = &live.record;
                self.shared.metrics.traffic(
                    stats.stanzas_in - r.stanzas_in,
                    stats.stanzas_out - r.stanzas_out,
                    stats.bytes_in - r.bytes_in,
                    stats.bytes_out - r.bytes_out,
                );
                live.record.stanzas_in = stats.stanzas_in;
                live.record.stanzas_out = stats.stanzas_out;
                live.record.bytes_in = stats.bytes_in;
                live.record.bytes_out = stats.bytes_out;
                live.record.state = state_str(live.tunnel.state()).into();
                if live.tunnel.is_gone() {
                    let live = self.tunnels.remove(&key).expect("present");
                    self.shared.table.remove(&live.record.id);
                    self.shared.tunnels.fetch_sub(1, Ordering::Relaxed);
                    if live.in_handshake {
                        self.shared.handshakes.fetch_sub(1, Ordering::Relaxed);
                    }
                    self.save(&live.record).await;
                } else {
                    self.shared.table.put(&live.record);
                }
            }
        }
    }

    async fn on_event(&mut self, key: &TunnelKey, event: Event) {
        let now = Instant::now().into_std();
        let Some(live) = self.tunnels.get_mut(key) else {
            return;
        };
        match event {
            Event::Established(est) => {
                let r = &mut live.record;
                r.state = "open".into();
                r.tls_version = Some(est.tls_version.clone());
                r.cipher_suite = Some(est.cipher_suite.clone());
                r.peer_identity = PeerIdentityRecord {
                    spki_sha256: est.peer.spki_sha256.as_ref().map(ToString::to_string),
                    trust: est.peer.trust.as_str().into(),
                };
                r.established_at = Some(crate::store::now());
                if live.in_handshake {
                    live.in_handshake = false;
                    self.shared.handshakes.fetch_sub(1, Ordering::Relaxed);
                }
                let metrics = &self.shared.metrics;
                metrics.opened(&r.role, true);
                metrics
                    .handshake_seconds
                    .observe(live.created.elapsed().as_secs_f64());
                let record = r.clone();
                tracing::info!(
                    bot = self.bot.jid,
                    peer = key.peer,
                    tunnel = record.id,
                    trust = record.peer_identity.trust,
                    "tunnel open"
                );
                let identity = crate::delivery::log::identity_json(Some(&est));
                self.log(
                    None,
                    NewEvent {
                        kind: "tunnel.established",
                        tunnel_id: Some(record.id.clone()),
                        peer: Some(key.peer.clone()),
                        data: serde_json::json!({
                            "tls_version": est.tls_version,
                            "cipher_suite": est.cipher_suite,
                            "identity": identity,
                        }),
                    },
                );
                if est.peer.trust == xtls::tunnel::TrustVerdict::TofuNew {
                    self.log(
                        None,
                        NewEvent {
                            kind: "peer.identity_new",
                            tunnel_id: Some(record.id.clone()),
                            peer: Some(key.peer.clone()),
                            data: serde_json::json!({
                                "peer": bare(&key.peer),
                                "spki_sha256": record.peer_identity.spki_sha256,
                            }),
                        },
                    );
                }
                if let Some(spki) = &est.peer.spki_sha256
                    && let Err(e) = self
                        .shared
                        .store
                        .record_pin(
                            &self.bot.jid,
                            bare(&key.peer),
                            spki,
                            est.peer.cert_der.as_deref(),
                        )
                        .await
                {
                    tracing::error!(error = %e, "cannot record peer pin");
                }
                self.save(&record).await;
                self.send_waiting(key).await;
            }
            Event::Stanza(stanza) => match self.handler {
                Handler::Echo => {
                    if let Some(reply) = echo(&stanza)
                        && let Err(e) = live.tunnel.send(now, reply)
                    {
                        tracing::warn!(error = %e, tunnel = live.record.id, "echo not sent");
                    }
                }
                Handler::Api => {
                    let event = crate::delivery::log::stanza_event(
                        &stanza,
                        &live.record.id,
                        &key.peer,
                        crate::delivery::log::identity_json(live.tunnel.established()),
                    );
                    self.log(Some(key), event);
                }
            },
            Event::Writable => self.send_waiting(key).await,
            Event::Acknowledged(mark) => self.on_acknowledged(key, mark).await,
            Event::Closed(reason) => {
                self.shared.metrics.closed(&reason);
                let r = &mut live.record;
                let stage = if r.state == "starting" {
                    "start"
                } else {
                    "handshake"
                };
                let event = crate::delivery::log::close_event(
                    &reason,
                    r.established_at.is_some(),
                    stage,
                    &r.id,
                    &key.peer,
                );
                let changed = reason.identity_change();
                if r.established_at.is_none() {
                    self.shared.metrics.opened(&r.role, false);
                }
                if changed.is_some() {
                    self.shared.metrics.identity_changes.inc();
                }
                let id = r.id.clone();
                r.state = "closed".into();
                r.closed_at = Some(crate::store::now());
                r.close_reason = Some(reason.to_string());
                tracing::info!(bot = self.bot.jid, peer = key.peer, tunnel = r.id, reason = %reason, "tunnel closed");
                if let Some((presented, pinned)) = changed {
                    self.log(
                        None,
                        NewEvent {
                            kind: "peer.identity_changed",
                            tunnel_id: Some(id),
                            peer: Some(key.peer.clone()),
                            data: serde_json::json!({
                                "peer": bare(&key.peer),
                                "presented_spki_sha256": presented.to_string(),
                                "pinned_spki_sha256": pinned.iter().map(ToString::to_string).collect::<Vec<_>>(),
                                "reason": reason.to_string(),
                            }),
                        },
                    );
                }
                self.log(None, event);
                self.on_closed_outbound(key, &reason).await;
            }
        }
    }
}

/// The `resource-constraint` (wait) error that replaces an IQ result of a tunnel whose events
/// could not be stored (the acknowledgement of a `data`, the `proceed` of a `start`); `None`
/// for anything else of that tunnel, which is dropped with it.
fn refuse_ack(stanza: &Element) -> Option<Element> {
    if stanza.name() != "iq" || stanza.attr("type") != Some("result") {
        return None;
    }
    let request = Element::builder("iq", ns::CLIENT)
        .attr(name("type"), "set")
        .attr(name("id"), stanza.attr("id").unwrap_or_default())
        .attr(name("from"), stanza.attr("to").unwrap_or_default())
        .attr(name("to"), stanza.attr("from").unwrap_or_default())
        .build();
    Some(error_reply(
        &request,
        ErrorType::Wait,
        DefinedCondition::ResourceConstraint,
        "the event log is unavailable",
    ))
}

/// The echo handler: a message with a body comes back with the same body; an inner IQ
/// request gets `service-unavailable` (spec §1.9 rule 7).
fn echo(stanza: &Element) -> Option<Element> {
    match stanza.name() {
        "message" if stanza.attr("type") != Some("error") => {
            let body = stanza.get_child("body", ns::CLIENT)?;
            let mut reply = Element::builder("message", ns::CLIENT).build();
            for attr in ["type", "id"] {
                if let Some(v) = stanza.attr(attr) {
                    reply.set_attr(rxml::Namespace::NONE, name(attr), v);
                }
            }
            let mut b = Element::bare("body", ns::CLIENT);
            b.append_text(body.text());
            reply.append_child(b);
            Some(reply)
        }
        "iq" if matches!(stanza.attr("type"), Some("get" | "set")) => Some(error_reply(
            stanza,
            ErrorType::Cancel,
            DefinedCondition::ServiceUnavailable,
            "",
        )),
        _ => None,
    }
}

/// disco#info of a bot (spec §1.4).
pub fn bot_disco_info() -> Element {
    let mut q = Element::bare("query", ns::DISCO_INFO);
    q.append_child(
        Element::builder("identity", ns::DISCO_INFO)
            .attr(name("category"), "client")
            .attr(name("type"), "bot")
            .build(),
    );
    for var in [ns::DISCO_INFO, ns::XTLS, ns::PING] {
        q.append_child(
            Element::builder("feature", ns::DISCO_INFO)
                .attr(name("var"), var)
                .build(),
        );
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_answers_messages_and_refuses_inner_iqs() {
        let m: Element = "<message xmlns='jabber:client' type='chat' id='7' from='a@b/c' to='e@bots'><body>hi</body></message>".parse().unwrap();
        let r = echo(&m).unwrap();
        assert_eq!(r.attr("id"), Some("7"));
        assert_eq!(r.attr("type"), Some("chat"));
        assert_eq!(r.get_child("body", ns::CLIENT).unwrap().text(), "hi");
        let iq: Element = "<iq xmlns='jabber:client' type='get' id='q' from='a@b/c' to='e@bots'><query xmlns='urn:x'/></iq>".parse().unwrap();
        assert_eq!(
            Iq::parse(&echo(&iq).unwrap()).unwrap().error_condition(),
            "service-unavailable"
        );
        let err: Element = "<message xmlns='jabber:client' type='error'><body>x</body></message>"
            .parse()
            .unwrap();
        assert!(echo(&err).is_none());
    }

    #[test]
    fn disco_lists_the_xtls_feature() {
        let q = bot_disco_info();
        assert!(q.children().any(|c| c.attr("var") == Some(ns::XTLS)));
    }
}

#[cfg(test)]
mod driver_tests {
    use super::*;
    use xtls::tunnel::PeerPolicy;

    async fn table(
        limits: LimitsConfig,
    ) -> (BotTable, mpsc::Receiver<Element>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "xtls-session-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&format!("sqlite://{}/t.db", dir.display()))
            .await
            .unwrap();
        let (out, rx) = mpsc::channel(64);
        let shared = Shared::new(
            store,
            out,
            TunnelConfig::default(),
            limits,
            "bots.example.org".into(),
            &EventsConfig::default(),
            WebhooksConfig::default(),
        );
        (BotTable::load(shared).await.unwrap(), rx, dir)
    }

    fn start(from: &str, id: &str) -> Element {
        format!(
            "<iq xmlns='jabber:client' type='set' id='{id}' from='{from}' to='echo@bots.example.org'><start xmlns='urn:xmpp:tmp:xtls'/></iq>"
        )
        .parse()
        .unwrap()
    }

    async fn next(rx: &mut mpsc::Receiver<Element>) -> Iq {
        let el = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the driver answers")
            .expect("channel open");
        Iq::parse(&el).unwrap()
    }

    #[tokio::test]
    async fn limits_answer_resource_constraint_wait_and_unknown_tunnels_item_not_found() {
        let limits = LimitsConfig {
            tunnels_per_peer: 1,
            ..LimitsConfig::default()
        };
        let (bots, mut rx, dir) = table(limits).await;
        let bot = bots
            .create(NewBot {
                localpart: "Echo".into(),
                handler: Handler::Echo,
                peer_auth: PeerAuth::Required,
                trust: TrustMode::Tofu,
            })
            .await
            .unwrap();
        assert_eq!(
            bot.record.jid, "echo@bots.example.org",
            "localparts are normalized"
        );
        assert!(matches!(
            bots.create(NewBot {
                localpart: "echo".into(),
                handler: Handler::Echo,
                peer_auth: PeerAuth::Required,
                trust: TrustMode::Tofu,
            })
            .await,
            Err(BotError::Duplicate(_))
        ));

        bot.try_deliver(start("alice@example.net/a", "s1")).unwrap();
        let proceed = next(&mut rx).await;
        assert_eq!((proceed.type_, proceed.id.as_str()), (IqType::Result, "s1"));
        assert_eq!(bots.shared().table.snapshot().len(), 1);

        // A second tunnel for the same bare JID exceeds tunnels_per_peer = 1.
        bot.try_deliver(start("alice@example.net/b", "s2")).unwrap();
        let refused = next(&mut rx).await;
        assert_eq!(refused.error_condition(), "resource-constraint");
        let error = refused
            .children
            .iter()
            .find(|c| c.name() == "error")
            .unwrap();
        assert_eq!(error.attr("type"), Some("wait"));

        // data and close for a key with no tunnel.
        for payload in [
            "<data xmlns='urn:xmpp:tmp:xtls'>AAAA</data>",
            "<close xmlns='urn:xmpp:tmp:xtls'/>",
        ] {
            let el: Element = format!(
                "<iq xmlns='jabber:client' type='set' id='d' from='bob@example.net/x' to='echo@bots.example.org'>{payload}</iq>"
            )
            .parse()
            .unwrap();
            bot.try_deliver(el).unwrap();
            assert_eq!(next(&mut rx).await.error_condition(), "item-not-found");
        }

        // Deleting the bot tells the peer and empties the session table.
        assert!(bots.delete("echo@bots.example.org").await.unwrap());
        let close = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(close.has_child("close", ns::XTLS));
        assert!(bots.shared().table.snapshot().is_empty());
        let history = bots
            .shared()
            .store
            .list_tunnels(&Default::default(), 10)
            .await
            .unwrap();
        assert_eq!(history[0].state, "closed");
        assert!(
            history[0]
                .close_reason
                .as_deref()
                .unwrap()
                .starts_with("bot_deleted")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The `api` bot weather@bots.example.org.
    async fn api_bot(bots: &BotTable) -> BotHandle {
        bots.create(NewBot {
            localpart: "weather".into(),
            handler: Handler::Api,
            peer_auth: PeerAuth::Required,
            trust: TrustMode::Tofu,
        })
        .await
        .unwrap()
    }

    /// alice@example.net/phone's engine, with a tunnel to the bot open.
    async fn open_peer(bot: &BotHandle, rx: &mut mpsc::Receiver<Element>) -> Tunnel {
        let mut peer = Tunnel::initiate(
            std::time::Instant::now(),
            TunnelParams {
                config: TunnelConfig::default(),
                key: TunnelKey {
                    local: "alice@example.net/phone".into(),
                    peer: bot.record.jid.clone(),
                },
                creds: BotCredentials::new(BotIdentity::generate("alice@example.net").unwrap())
                    .unwrap(),
                policy: PeerPolicy::default(),
                id_prefix: "alice-".into(),
            },
        );
        until_open(&mut peer, bot, rx).await;
        peer
    }

    /// Feeds the peer's stanzas to the bot and the bot's to the peer until the peer is open.
    async fn until_open(peer: &mut Tunnel, bot: &BotHandle, rx: &mut mpsc::Receiver<Element>) {
        for _ in 0..100 {
            while let Some(el) = peer.poll_transmit() {
                bot.try_deliver(el).unwrap();
            }
            if peer.state() == State::Open {
                return;
            }
            let el = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("the driver answers")
                .expect("channel open");
            peer.handle_iq(std::time::Instant::now(), &Iq::parse(&el).unwrap());
        }
        panic!("the tunnel never opened");
    }

    #[tokio::test]
    async fn an_api_bot_commits_events_before_acknowledging_data() {
        let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
        let bot = api_bot(&bots).await;
        let store = bots.shared().store.clone();
        let mut peer = open_peer(&bot, &mut rx).await;

        let message: Element =
            "<message xmlns='jabber:client' type='chat'><body>forecast?</body></message>"
                .parse()
                .unwrap();
        peer.send(std::time::Instant::now(), message).unwrap();
        let data = peer.poll_transmit().expect("a data IQ");
        let data_id = data.attr("id").unwrap().to_owned();
        bot.try_deliver(data).unwrap();
        loop {
            let el = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            if el.attr("id") == Some(data_id.as_str()) {
                assert_eq!(el.attr("type"), Some("result"));
                break;
            }
            peer.handle_iq(std::time::Instant::now(), &Iq::parse(&el).unwrap());
            while let Some(el) = peer.poll_transmit() {
                bot.try_deliver(el).unwrap();
            }
        }
        // The acknowledgement left only after the event was committed.
        let events = store
            .read_events(&bot.record.jid, 0, 100, false)
            .await
            .unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "tunnel.opened",
                "tunnel.established",
                "peer.identity_new",
                "message.received"
            ]
        );
        let received = &events[3];
        assert_eq!(received.data["body"], "forecast?");
        assert_eq!(received.peer.as_deref(), Some("alice@example.net/phone"));
        assert_eq!(received.data["identity"]["trust"], "tofu_new");
        assert!(
            received.data["stanza"]
                .as_str()
                .unwrap()
                .contains("from='alice@example.net/phone'"),
            "routing restored: {}",
            received.data["stanza"]
        );
        assert_eq!(*bot.events.borrow(), 4);
        assert_eq!(store.cursor(&bot.record.jid).await.unwrap(), 0);
        assert_eq!(store.ack_through(&bot.record.jid, 3).await.unwrap(), 3);
        std::fs::remove_dir_all(dir).unwrap();
    }

    async fn recv(rx: &mut mpsc::Receiver<Element>) -> Element {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the driver sends")
            .expect("channel open")
    }

    fn disco_answer(request: &Element, xtls: bool) -> Element {
        let iq = Iq::parse(request).unwrap();
        assert!(iq.children[0].is("query", ns::DISCO_INFO));
        let mut q = Element::bare("query", ns::DISCO_INFO);
        if xtls {
            q.append_child(
                Element::builder("feature", ns::DISCO_INFO)
                    .attr(name("var"), ns::XTLS)
                    .build(),
            );
        }
        iq.result(Some(q))
    }

    #[tokio::test]
    async fn a_bot_opens_a_tunnel_after_disco_and_reports_the_peer_acknowledgement() {
        let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
        bots.shared().link_up.store(true, Ordering::Relaxed);
        let bot = api_bot(&bots).await;
        let store = bots.shared().store.clone();
        let alice = "alice@example.net/phone";
        let msg = |id: &str, to: &str| OutMsg {
            id: id.into(),
            to: to.into(),
            stanza: xtls::stanza::chat_message("sunny", "chat"),
            reopen: false,
        };

        // A client without XTLS: no start is ever sent.
        let m0 = msg("msg_0", "bob@example.net/pc");
        store
            .insert_message(&bot.record.jid, &m0, None)
            .await
            .unwrap();
        let submitting = tokio::spawn({
            let bot = bot.clone();
            async move { bot.submit(m0).await }
        });
        let disco = recv(&mut rx).await;
        assert_eq!(disco.attr("to"), Some("bob@example.net/pc"));
        bot.try_deliver(disco_answer(&disco, false)).unwrap();
        assert_eq!(submitting.await.unwrap().unwrap().status, "no_xtls_support");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), rx.recv())
                .await
                .is_err(),
            "nothing follows a negative disco answer"
        );

        // A client with XTLS: disco, start, handshake, the message, its acknowledgement.
        let m1 = msg("msg_1", alice);
        store
            .insert_message(&bot.record.jid, &m1, None)
            .await
            .unwrap();
        let submitting = tokio::spawn({
            let bot = bot.clone();
            async move { bot.submit(m1).await }
        });
        let disco = recv(&mut rx).await;
        bot.try_deliver(disco_answer(&disco, true)).unwrap();
        let outcome = submitting.await.unwrap().unwrap();
        assert_eq!(outcome.status, "opening");
        let start = Iq::parse(&recv(&mut rx).await).unwrap();
        let Ok(XtlsElement::Start { offer }) = classify_request(&start) else {
            panic!("a start follows the disco answer")
        };
        let mut peer = Tunnel::accept(
            std::time::Instant::now(),
            TunnelParams {
                config: TunnelConfig::default(),
                key: TunnelKey {
                    local: alice.into(),
                    peer: bot.record.jid.clone(),
                },
                creds: BotCredentials::new(BotIdentity::generate("alice@example.net").unwrap())
                    .unwrap(),
                policy: PeerPolicy::default(),
                id_prefix: "alice-".into(),
            },
            &start,
            offer.as_ref(),
        )
        .unwrap();
        let mut got = None;
        for _ in 0..100 {
            while let Some(el) = peer.poll_transmit() {
                bot.try_deliver(el).unwrap();
            }
            while let Some(ev) = peer.poll_event() {
                if let Event::Stanza(s) = ev {
                    got = Some(s);
                }
            }
            let status = store
                .message(&bot.record.jid, "msg_1")
                .await
                .unwrap()
                .unwrap()
                .status;
            if got.is_some() && status == "acknowledged" {
                break;
            }
            if let Ok(Some(el)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
            {
                peer.handle_iq(std::time::Instant::now(), &Iq::parse(&el).unwrap());
            }
        }
        let got = got.expect("the message arrived through the tunnel");
        assert_eq!(got.get_child("body", ns::CLIENT).unwrap().text(), "sunny");
        assert_eq!(got.attr("from"), Some(bot.record.jid.as_str()));
        let record = store
            .message(&bot.record.jid, "msg_1")
            .await
            .unwrap()
            .unwrap();
        let history: Vec<&str> = record
            .history
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["status"].as_str().unwrap())
            .collect();
        assert_eq!(history, ["accepted", "opening", "sent", "acknowledged"]);
        assert!(record.tunnel_id.is_some());
        // The driver settles the message, then commits its event with the next batch: wait
        // for the event rather than read the log the instant the status changed.
        let mut kinds: Vec<String> = Vec::new();
        for _ in 0..100 {
            kinds = store
                .read_events(&bot.record.jid, 0, 100, false)
                .await
                .unwrap()
                .into_iter()
                .map(|e| format!("{}:{}", e.kind, e.data["status"].as_str().unwrap_or("")))
                .collect();
            if kinds.contains(&"delivery.status:acknowledged".to_owned()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            kinds.contains(&"delivery.status:no_xtls_support".to_owned()),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&"delivery.status:acknowledged".to_owned()),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&"tunnel.established:".to_owned()),
            "{kinds:?}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_changed_peer_key_raises_the_event_the_metric_and_the_message_status() {
        let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
        bots.shared().link_up.store(true, Ordering::Relaxed);
        let bot = api_bot(&bots).await;
        let store = bots.shared().store.clone();
        // First use pins the key of alice@example.net/phone.
        let _phone = open_peer(&bot, &mut rx).await;
        let pinned = store
            .pins(&bot.record.jid, "alice@example.net")
            .await
            .unwrap();
        assert_eq!(pinned.len(), 1);

        // The bot writes to her laptop, which answers its start with another key.
        let laptop = "alice@example.net/laptop";
        let m = OutMsg {
            id: "msg_1".into(),
            to: laptop.into(),
            stanza: xtls::stanza::chat_message("sunny", "chat"),
            reopen: false,
        };
        store
            .insert_message(&bot.record.jid, &m, None)
            .await
            .unwrap();
        let submitting = tokio::spawn({
            let bot = bot.clone();
            async move { bot.submit(m).await }
        });
        let disco = recv(&mut rx).await;
        bot.try_deliver(disco_answer(&disco, true)).unwrap();
        assert_eq!(submitting.await.unwrap().unwrap().status, "opening");
        let start = Iq::parse(&recv(&mut rx).await).unwrap();
        let Ok(XtlsElement::Start { offer }) = classify_request(&start) else {
            panic!("a start follows the disco answer")
        };
        let new_key = BotIdentity::generate("alice@example.net").unwrap();
        let presented = new_key.info.fingerprints.spki_sha256.clone();
        let mut peer = Tunnel::accept(
            std::time::Instant::now(),
            TunnelParams {
                config: TunnelConfig::default(),
                key: TunnelKey {
                    local: laptop.into(),
                    peer: bot.record.jid.clone(),
                },
                creds: BotCredentials::new(new_key).unwrap(),
                policy: PeerPolicy::default(),
                id_prefix: "laptop-".into(),
            },
            &start,
            offer.as_ref(),
        )
        .unwrap();
        let mut status = String::new();
        for _ in 0..100 {
            while let Some(el) = peer.poll_transmit() {
                bot.try_deliver(el).unwrap();
            }
            status = store
                .message(&bot.record.jid, "msg_1")
                .await
                .unwrap()
                .unwrap()
                .status;
            if status == "identity_changed" {
                break;
            }
            if let Ok(Some(el)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
            {
                peer.handle_iq(std::time::Instant::now(), &Iq::parse(&el).unwrap());
            }
        }
        assert_eq!(status, "identity_changed");
        assert_eq!(bots.shared().metrics.identity_changes.get(), 1);
        // The status is settled before the batch holding the event commits: wait for it.
        let mut changed = None;
        for _ in 0..100 {
            changed = store
                .read_events(&bot.record.jid, 0, 100, false)
                .await
                .unwrap()
                .into_iter()
                .find(|e| e.kind == "peer.identity_changed");
            if changed.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let changed = changed.expect("peer.identity_changed is logged");
        assert_eq!(changed.data["peer"], "alice@example.net");
        assert_eq!(changed.data["presented_spki_sha256"], presented.to_string());
        assert_eq!(
            changed.data["pinned_spki_sha256"],
            serde_json::json!([pinned[0].to_string()])
        );
        // The changed key was not pinned beside the old one.
        assert_eq!(
            store
                .pins(&bot.record.jid, "alice@example.net")
                .await
                .unwrap(),
            pinned
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn stopping_closes_tunnels_with_close_notify_then_close() {
        let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
        let bot = api_bot(&bots).await;
        let mut peer = open_peer(&bot, &mut rx).await;
        let stopped = tokio::spawn({
            let bot = bot.clone();
            async move { bot.stop(CloseReason::Shutdown).await }
        });
        let mut saw_close = false;
        let mut data_before_close = false;
        let mut closed = None;
        for _ in 0..50 {
            while let Some(el) = peer.poll_transmit() {
                bot.try_deliver(el).unwrap();
            }
            while let Some(ev) = peer.poll_event() {
                if let Event::Closed(reason) = ev {
                    closed = Some(reason);
                }
            }
            if closed.is_some() {
                break;
            }
            let Ok(Some(el)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await else {
                break;
            };
            saw_close |= el.has_child("close", ns::XTLS);
            data_before_close |= !saw_close && el.has_child("data", ns::XTLS);
            peer.handle_iq(std::time::Instant::now(), &Iq::parse(&el).unwrap());
        }
        while let Some(el) = peer.poll_transmit() {
            bot.try_deliver(el).unwrap();
        }
        assert!(saw_close, "the bot sent <close/>");
        assert!(
            data_before_close,
            "close_notify travelled in a data IQ before <close/>"
        );
        assert_eq!(
            closed,
            Some(CloseReason::PeerClosed),
            "the peer saw a graceful close (close_notify first, then <close/>)"
        );
        tokio::time::timeout(Duration::from_secs(5), stopped)
            .await
            .expect("the driver stops once its tunnels are closed")
            .unwrap();
        let events = bots
            .shared()
            .store
            .read_events(&bot.record.jid, 0, 100, false)
            .await
            .unwrap();
        let last = events.last().unwrap();
        assert_eq!(
            (last.kind.as_str(), last.data["code"].as_str()),
            ("tunnel.closed", Some("shutdown")),
            "the close was logged before the driver stopped"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
