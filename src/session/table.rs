//! The registry of running bots: create, load, find, delete, and the handle each one is
//! reached by.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use minidom::Element;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{BotTrust, Handler};
use crate::delivery::webhook::{self, Deliverer, ReplySink};
use crate::store::{BotRecord, NextCertificate, OutMsg, StoreError, StoredBot, TunnelId, now};
use xtls::certs::{BotIdentity, Fingerprints, normalize_bare};
use xtls::stanza::{DefinedCondition, ErrorType, error_reply, ns};
use xtls::tunnel::{BotCredentials, CloseReason, PeerAuth};

use super::Shared;
use super::driver::{BotDriver, normalize};
use super::outbound::{self, Submitted};

/// What a driver is asked to do.
#[derive(Debug)]
pub enum BotCommand {
    /// A stanza addressed to the bot (boxed: the channel's blocks hold 32 commands each,
    /// allocated with the channel, so the largest variant sizes every bot's queue).
    Stanza(Box<Element>),
    /// Close one tunnel gracefully; answers whether it existed.
    CloseTunnel(TunnelId, oneshot::Sender<bool>),
    /// The server link was lost: every tunnel is gone.
    LinkDown,
    /// The server link is back: tell former peers their tunnels are gone.
    LinkUp,
    /// Inner stanzas to send into a live tunnel, by tunnel id.
    Reply(TunnelId, Vec<Element>),
    /// A message from the API.
    Submit(Box<OutMsg>, oneshot::Sender<Submitted>),
    /// Open a tunnel to a full JID.
    Open(String, oneshot::Sender<Submitted>),
    /// Close every tunnel and stop.
    Stop(Box<CloseReason>, oneshot::Sender<()>),
    /// Apply a new clear-text policy and trust mode from now on; answers once applied.
    SetPolicy(BotPolicy, oneshot::Sender<()>),
    /// Add an event about the bot (not about a tunnel) to its log.
    Record(Box<crate::delivery::event::BotEvent>, Option<String>),
    /// A short authentication string request from the API for one tunnel.
    Sas(
        TunnelId,
        Box<super::sas::SasRequest>,
        oneshot::Sender<Result<crate::store::SasStatus, super::sas::SasRefusal>>,
    ),
    /// Serve these certificates from now on; answers once applied.
    SetCertificates(Box<super::rotation::Certificates>, oneshot::Sender<()>),
    /// Finish the messages another run left unfinished (this instance took the bot over).
    Recover,
    /// Tell the peers of these tunnels, which another instance ran for the bot, that they
    /// are gone (this instance took the bot over).
    TakenOver(Vec<xtls::tunnel::TunnelKey>),
}

/// The settings of a running bot that the API can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BotPolicy {
    /// Refuse messages sent in clear.
    pub encrypted_only: bool,
    /// Which peer keys are accepted.
    pub trust: BotTrust,
}

/// A change to a bot's policy: the settings named change, the others stay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyChange {
    /// A new clear-text policy.
    pub encrypted_only: Option<bool>,
    /// A new trust mode.
    pub trust: Option<BotTrust>,
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
    /// The announced next certificate, if a rotation is under way.
    pub next: Option<Arc<NextCertificate>>,
    /// The `seq` of the newest committed event.
    pub events: watch::Receiver<u64>,
    /// Wakes the webhook deliverer when the webhook or the dead letters change.
    pub(super) webhook_wake: Arc<tokio::sync::Notify>,
    /// The webhook deliverer of an `api` bot, started with its first webhook: what it
    /// starts from until then (`None` once started, and for other handlers).
    deliverer: Arc<std::sync::Mutex<Option<Arc<Shared>>>>,
    /// The driver, started by the first command sent to the bot.
    pub(super) driver: Arc<DriverSlot>,
    /// Tunnels whose `data` or `close` the router refused because the queue was full: the
    /// driver ends them at its next step (spec §1.11: after an error a tunnel is gone).
    pub(super) refused: Arc<RefusedTunnels>,
}

/// The keys of tunnels refused while their driver was busy, with when, at most [`Self::CAP`].
#[derive(Debug, Default)]
pub struct RefusedTunnels(std::sync::Mutex<HashMap<(String, String), tokio::time::Instant>>);

impl RefusedTunnels {
    /// Keys held at most; beyond, a refused tunnel ends by its own timeouts instead.
    const CAP: usize = 4096;

    fn insert(&self, local: String, peer: String) {
        let mut refused = self.0.lock().expect("refused lock");
        if refused.len() < Self::CAP {
            refused.insert((local, peer), tokio::time::Instant::now());
        }
    }

    /// Takes every key recorded so far, with when it was refused.
    pub(super) fn take(&self) -> HashMap<(String, String), tokio::time::Instant> {
        std::mem::take(&mut *self.0.lock().expect("refused lock"))
    }
}

/// A bot's driver task, started by the first command sent to the bot: a bot that no one has
/// addressed since the start keeps no task and no queue, only its handle (docs/performance.md,
/// "Idle bots").
#[derive(Debug)]
pub(super) struct DriverSlot(std::sync::Mutex<Slot>);

#[derive(Debug)]
enum Slot {
    /// Not started yet: what the driver will take.
    Waiting(Box<Waiting>),
    /// Running: its queue.
    Running(mpsc::Sender<BotCommand>),
    /// Stopped for good (the bot was deleted, or the component stops).
    Stopped,
}

/// What a driver starts from: the bot as it is now (its policy, certificate and announced next
/// one, kept here while no driver runs, since handles elsewhere may be older).
#[derive(Debug)]
pub(super) struct Waiting {
    pub(super) shared: Arc<Shared>,
    /// The committed-event watch (the handle holds its receiver), at the bot's last `seq`.
    pub(super) events_tx: watch::Sender<u64>,
    pub(super) record: BotRecord,
    pub(super) identity: Arc<BotIdentity>,
    pub(super) next: Option<Arc<NextCertificate>>,
    pub(super) refused: Arc<RefusedTunnels>,
}

impl DriverSlot {
    /// Whether a driver task runs now.
    #[cfg(test)]
    pub(super) fn is_running(&self) -> bool {
        matches!(*self.0.lock().expect("driver slot lock"), Slot::Running(_))
    }

    /// Marks the driver stopped for good (its bot was let go).
    pub(super) fn stop(&self) {
        *self.0.lock().expect("driver slot lock") = Slot::Stopped;
    }

    /// The running driver's queue, if one runs (never starts one).
    fn running(&self) -> Option<mpsc::Sender<BotCommand>> {
        match &*self.0.lock().expect("driver slot lock") {
            Slot::Running(tx) => Some(tx.clone()),
            _ => None,
        }
    }

    /// The driver's queue, starting the driver (recovering the messages a previous run left
    /// unfinished when `recover`) when it waits; `None` once it stopped.
    fn sender(self: &Arc<Self>, recover: bool) -> Option<mpsc::Sender<BotCommand>> {
        let mut slot = self.0.lock().expect("driver slot lock");
        match &*slot {
            Slot::Running(tx) => return Some(tx.clone()),
            Slot::Stopped => return None,
            Slot::Waiting(_) => {}
        }
        let Slot::Waiting(waiting) = std::mem::replace(&mut *slot, Slot::Stopped) else {
            unreachable!("matched above");
        };
        let tx = spawn_driver(self, *waiting, recover)?;
        *slot = Slot::Running(tx.clone());
        Some(tx)
    }

    /// Parks the driver that owns `rx` (it has no tunnel and nothing pending): the bot waits
    /// again with `seed`. Commands that reached the queue meanwhile go, in order, to a new
    /// driver started for them, and senders holding the old queue find it closed and ask
    /// again ([`BotHandle::send`]).
    pub(super) fn park(self: &Arc<Self>, rx: &mut mpsc::Receiver<BotCommand>, seed: Waiting) {
        let mut slot = self.0.lock().expect("driver slot lock");
        rx.close();
        let mut late = Vec::new();
        while let Ok(command) = rx.try_recv() {
            late.push(command);
        }
        if late.is_empty() {
            *slot = Slot::Waiting(Box::new(seed));
            return;
        }
        *slot = match spawn_driver(self, seed, false) {
            Some(tx) => {
                // A fresh queue of the same size holds them all.
                for command in late {
                    let _ = tx.try_send(command);
                }
                Slot::Running(tx)
            }
            None => Slot::Stopped,
        };
    }
}

impl ReplySink for BotHandle {
    async fn reply(&self, tunnel_id: TunnelId, stanzas: Vec<Element>) {
        let _ = self.send(BotCommand::Reply(tunnel_id, stanzas)).await;
    }
}

impl BotHandle {
    /// Says that the bot's webhook or its dead letters changed: the deliverer reads them
    /// again (started now if the bot had no webhook until now).
    pub fn webhook_changed(&self) {
        self.start_deliverer(None);
        self.webhook_wake.notify_one();
    }

    /// Starts the webhook deliverer unless it runs, with the webhook when it is known.
    pub(super) fn start_deliverer(&self, webhook: Option<Option<crate::store::Webhook>>) {
        let Some(shared) = self.deliverer.lock().expect("deliverer lock").take() else {
            return;
        };
        let deliverer = Deliverer {
            bot: self.record.jid.clone(),
            store: shared.store.clone(),
            config: shared.webhooks.clone(),
            committed: self.events.clone(),
            webhook_changed: self.webhook_wake.clone(),
            replies: self.clone(),
            counter: shared.metrics.webhook_deliveries.clone(),
            client: shared.webhook_client.clone(),
            networks: shared.webhook_networks.clone(),
        };
        tokio::spawn(webhook::run(deliverer, webhook));
    }

    /// Tries of a command at a driver's queue: one found closed belonged to a driver that
    /// parked meanwhile, and the slot then holds the next one.
    const SEND_ATTEMPTS: usize = 3;

    /// The driver's queue, starting the driver when it waits; `None` once it stopped.
    fn driver(&self) -> Option<mpsc::Sender<BotCommand>> {
        self.driver.sender(false)
    }

    /// Sends a command to the driver, starting it when it waits; the command back when the
    /// driver stopped.
    pub(super) async fn send(&self, mut command: BotCommand) -> Result<(), BotCommand> {
        // A queue found closed belonged to a driver that parked meanwhile: ask again.
        for _ in 0..Self::SEND_ATTEMPTS {
            let Some(tx) = self.driver() else {
                return Err(command);
            };
            match tx.send(command).await {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => command = back,
            }
        }
        Err(command)
    }

    /// Closes the bot's tunnels and stops its driver; returns once it stopped.
    pub(super) async fn stop(&self, reason: CloseReason) {
        // A driver that parks meanwhile closes its queue, and late commands may start a new
        // one: look at the slot again and stop that one (as `send` retries).
        let mut reason = Box::new(reason);
        for _ in 0..Self::SEND_ATTEMPTS {
            let running = {
                let mut slot = self.driver.0.lock().expect("driver slot lock");
                match &*slot {
                    // It keeps taking commands while it closes: the peers' answers to the close.
                    Slot::Running(tx) => Some(tx.clone()),
                    // Not running: nothing to close.
                    Slot::Waiting(_) | Slot::Stopped => {
                        *slot = Slot::Stopped;
                        None
                    }
                }
            };
            let Some(tx) = running else { return };
            let (done, wait) = oneshot::channel();
            match tx.send(BotCommand::Stop(reason, done)).await {
                Ok(()) => {
                    let _ = wait.await;
                    break;
                }
                Err(mpsc::error::SendError(BotCommand::Stop(back, _))) => reason = back,
                Err(_) => break,
            }
        }
        *self.driver.0.lock().expect("driver slot lock") = Slot::Stopped;
    }

    /// Hands a stored message to the driver; its first outcome, or `None` when the driver
    /// did not answer in time (the message stays accepted and is reported by its status).
    pub async fn submit(&self, msg: OutMsg) -> Option<Submitted> {
        self.ask(|tx| BotCommand::Submit(Box::new(msg), tx)).await
    }

    /// Adds an event about `peer` (a bare JID) to the bot's log, committed with the driver's
    /// next batch; dropped when the bot stops first.
    pub async fn record(&self, event: crate::delivery::event::BotEvent, peer: Option<String>) {
        let _ = self.send(BotCommand::Record(Box::new(event), peer)).await;
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
        self.send(command(tx)).await.ok()?;
        tokio::time::timeout(Duration::from_secs(15), rx)
            .await
            .ok()?
            .ok()
    }

    /// Records that the router refused this `data` or `close` of a tunnel (the queue was full),
    /// so the driver ends that tunnel at its next step.
    pub fn tunnel_refused(&self, request: &Element) {
        let is_tunnel_request = request.name() == "iq"
            && request
                .children()
                .any(|c| c.ns() == ns::XTLS && matches!(c.name(), "data" | "close"));
        if let (true, Some(local), Some(peer)) = (
            is_tunnel_request,
            request.attr("to").and_then(normalize),
            request.attr("from").and_then(normalize),
        ) {
            self.refused.insert(local, peer);
        }
    }

    /// Hands a stanza to the driver without waiting; `Err` when its queue is full or it stopped.
    pub fn try_deliver(
        &self,
        stanza: Element,
    ) -> Result<(), mpsc::error::TrySendError<BotCommand>> {
        let mut command = BotCommand::Stanza(Box::new(stanza));
        // A queue found closed belonged to a driver that parked meanwhile: ask again.
        for _ in 0..Self::SEND_ATTEMPTS {
            let Some(tx) = self.driver() else { break };
            match tx.try_send(command) {
                Err(mpsc::error::TrySendError::Closed(back)) => command = back,
                sent => return sent,
            }
        }
        Err(mpsc::error::TrySendError::Closed(command))
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
    pub trust: BotTrust,
    /// Whether messages sent in clear are refused (else delivered, marked as such).
    pub encrypted_only: bool,
}

/// The registry of running bots.
#[derive(Debug, Clone)]
pub struct BotTable {
    bots: Arc<RwLock<HashMap<String, BotHandle>>>,
    shared: Arc<Shared>,
    /// Policy changes and rotations one at a time, so two changes of one bot cannot undo
    /// each other.
    pub(super) changes: Arc<tokio::sync::Mutex<()>>,
}

/// Starts a driver from what waited for it; returns its queue (`None`, logged, when the bot's
/// key does not work with TLS).
fn spawn_driver(
    slot: &Arc<DriverSlot>,
    waiting: Waiting,
    recover: bool,
) -> Option<mpsc::Sender<BotCommand>> {
    let Waiting {
        shared,
        events_tx,
        record,
        identity,
        next,
        refused,
    } = waiting;
    let creds = match BotCredentials::from_shared(identity) {
        Ok(creds) => creds,
        Err(e) => {
            tracing::error!(bot = record.jid, error = %e, "bot not started");
            return None;
        }
    };
    let last_seq = *events_tx.borrow();
    let (tx, rx) = mpsc::channel(shared.limits.get().bot_queue);
    let handler = record.handler;
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
        peer_auth: record.peer_auth,
        trust: record.trust,
        bot: record,
        creds,
        next,
        rx,
        shared,
        tunnels: HashMap::new(),
        former_peers: Arc::default(),
        pacer_generation: Arc::default(),
        refused,
        slot: slot.clone(),
        idle_since: tokio::time::Instant::now(),
        lost: false,
        lost_noticed: Default::default(),
    };
    tokio::spawn(driver.run());
    Some(tx)
}

/// Whether a stanza asks for an answer: an IQ get or set, or a message other than an error.
pub fn is_request(stanza: &Element) -> bool {
    match stanza.name() {
        "iq" => matches!(stanza.attr("type"), Some("get" | "set")),
        "message" => stanza.attr("type") != Some("error"),
        _ => false,
    }
}

/// Every announced next certificate, by bot.
pub(super) async fn next_by_bot(
    store: &crate::store::Store,
) -> Result<HashMap<String, Arc<NextCertificate>>, StoreError> {
    Ok(store
        .next_certificates()
        .await?
        .into_iter()
        .map(|n| (n.bot.clone(), Arc::new(n)))
        .collect())
}

/// Bots read from the store per query at start-up.
const LOAD_PAGE: i64 = 4096;

/// Parses stored certificates and keys, spread over the cores and off the async workers
/// (CPU work: 100,000 bots must be ready within seconds).
pub(super) async fn parse_identities(
    stored: Vec<StoredBot>,
) -> Result<Vec<(BotRecord, Arc<BotIdentity>, u64)>, BotError> {
    parse_each(stored).await.into_iter().collect()
}

/// A parsed bot: its record, identity and last event `seq`.
pub(super) type Parsed = (BotRecord, Arc<BotIdentity>, u64);

/// Parses each bot as [`parse_identities`] does, with each one's outcome, in order.
pub(super) async fn parse_each(stored: Vec<StoredBot>) -> Vec<Result<Parsed, BotError>> {
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
                    Ok::<_, BotError>((b.record, Arc::new(identity), b.last_seq))
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut parsed = Vec::new();
    for job in jobs {
        parsed.extend(job.await.expect("bot loading does not panic"));
    }
    parsed
}

/// What a bot's tasks start from.
pub(super) struct Start {
    /// The highest event `seq` given so far.
    pub(super) last_seq: u64,
    /// Whether messages of a previous run are unfinished.
    pub(super) recover: bool,
    /// The webhook as loaded with every bot's (`None`: none set).
    pub(super) webhook: Option<crate::store::Webhook>,
    /// The announced next certificate.
    pub(super) next: Option<Arc<NextCertificate>>,
}

impl BotTable {
    /// Loads every stored bot. Its driver starts with the first command sent to it; at once
    /// when it has messages to recover, and then (with its webhook deliverer) only for bots
    /// this instance runs: with a shared store, those it claims later (`run_claims`).
    pub async fn load(shared: Arc<Shared>) -> Result<BotTable, BotError> {
        let table = BotTable {
            bots: Arc::default(),
            shared,
            changes: Arc::default(),
        };
        // What each bot's tasks would otherwise ask the store one by one at start. With a
        // shared store, the owner-only work waits for the claims.
        let sole = !table.shared.owners.is_shared();
        let unfinished = match sole {
            true => table.shared.store.bots_with_unfinished_messages().await?,
            false => Default::default(),
        };
        let mut webhooks = match sole {
            true => table.shared.store.webhooks().await?,
            false => Default::default(),
        };
        let mut next = next_by_bot(&table.shared.store).await?;
        // A page of bots at a time: the memory start-up needs is a page's rows and keys, not
        // every bot's at once (100,000 bots peaked at 567 MiB that way, 400 MiB now).
        let mut after = String::new();
        loop {
            let page = table
                .shared
                .store
                .load_bots_after(&after, LOAD_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after.clone_from(&last.record.jid);
            let full = page.len() as i64 == LOAD_PAGE;
            for (record, identity, last_seq) in parse_identities(page).await? {
                let start = Start {
                    last_seq,
                    recover: unfinished.contains(&record.jid),
                    webhook: webhooks.remove(&record.jid),
                    next: next.remove(&record.jid),
                };
                table.start(record, identity, start);
            }
            if !full {
                break;
            }
        }
        Ok(table)
    }

    /// Hands a stanza that reached the component to `bot`'s driver without waiting; the
    /// error to answer when the driver cannot take it (`None`: taken, or nothing to answer).
    pub fn deliver(&self, bot: &BotHandle, stanza: Element) -> Option<Element> {
        match bot.try_deliver(stanza) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(BotCommand::Stanza(stanza))) => {
                tracing::warn!(bot = bot.record.jid, "bot queue full");
                self.busy(bot, &stanza)
            }
            Err(e) => match e.into_inner() {
                BotCommand::Stanza(stanza) => is_request(&stanza).then(|| {
                    error_reply(
                        &stanza,
                        ErrorType::Cancel,
                        DefinedCondition::ServiceUnavailable,
                        "",
                    )
                }),
                _ => None,
            },
        }
    }

    /// Refuses a stanza `bot` cannot take now: a tunnel request ends its tunnel (spec §1.11),
    /// and a request is answered `resource-constraint` (type `wait`).
    pub fn busy(&self, bot: &BotHandle, stanza: &Element) -> Option<Element> {
        self.shared.metrics.rejected("bot_queue");
        bot.tunnel_refused(stanza);
        is_request(stanza).then(|| {
            error_reply(
                stanza,
                ErrorType::Wait,
                DefinedCondition::ResourceConstraint,
                "bot busy",
            )
        })
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
        let validity = self.shared.certificates.get().validity();
        let identity = BotIdentity::generate_valid_for(&jid, validity)?;
        let record = BotRecord {
            jid,
            localpart,
            handler: new.handler,
            peer_auth: new.peer_auth,
            trust: new.trust,
            encrypted_only: new.encrypted_only,
            created_at: now(),
        };
        self.shared.store.insert_bot(&record, &identity).await?;
        tracing::info!(bot = record.jid, spki_sha256 = %identity.info.fingerprints.spki_sha256, "bot created");
        let start = Start {
            last_seq: 0,
            recover: false,
            webhook: None,
            next: None,
        };
        // The key must work with TLS before the bot exists.
        let identity = Arc::new(identity);
        BotCredentials::from_shared(identity.clone())?;
        let handle = self.start(record, identity, start);
        // With a shared store, the bot's stanzas may reach another instance: that one claims it.
        self.probe(&handle.record.jid);
        Ok(handle)
    }

    /// Runs a bot this instance just took over, as the store has it now: whatever ran it here
    /// before (a driver of an earlier turn, from older data) is stopped first.
    pub(super) async fn take_over(
        &self,
        record: BotRecord,
        identity: Arc<BotIdentity>,
        start: Start,
    ) -> BotHandle {
        if let Some(old) = self.by_jid(&record.jid) {
            old.stop(CloseReason::ConnectionLost).await;
        }
        self.start(record, identity, start)
    }

    /// Drops a bot from the table without touching the store (it is no longer there).
    pub fn forget(&self, jid: &str) {
        let Some(handle) = self.by_jid(jid) else {
            return;
        };
        self.bots
            .write()
            .expect("bots lock")
            .remove(&handle.record.localpart);
        tokio::spawn(async move { handle.stop(CloseReason::BotDeleted).await });
    }

    /// Registers a bot; its driver starts with the first command sent to it (at once when
    /// messages of a previous run are to be recovered).
    pub(super) fn start(
        &self,
        record: BotRecord,
        identity: Arc<BotIdentity>,
        start: Start,
    ) -> BotHandle {
        let Start {
            last_seq,
            recover,
            webhook,
            next,
        } = start;
        let handle = self.handle_for(record, identity, last_seq, next);
        if recover {
            handle.driver.sender(true);
        }
        self.bots
            .write()
            .expect("bots lock")
            .insert(handle.record.localpart.clone(), handle.clone());
        // An api bot's deliverer runs from its first webhook on (loaded with the others).
        if webhook.is_some() {
            handle.start_deliverer(Some(webhook));
        }
        handle
    }

    /// Adds a bot that runs elsewhere (its driver starts only if this instance takes it over),
    /// unless the table has it already.
    pub(super) fn learn(
        &self,
        record: BotRecord,
        identity: Arc<BotIdentity>,
        last_seq: u64,
        next: Option<Arc<NextCertificate>>,
    ) {
        let handle = self.handle_for(record, identity, last_seq, next);
        self.bots
            .write()
            .expect("bots lock")
            .entry(handle.record.localpart.clone())
            .or_insert(handle);
    }

    /// A handle for a bot whose driver waits for the first command sent to it.
    fn handle_for(
        &self,
        record: BotRecord,
        identity: Arc<BotIdentity>,
        last_seq: u64,
        next: Option<Arc<NextCertificate>>,
    ) -> BotHandle {
        let (events_tx, events) = watch::channel(last_seq);
        let record_handler = record.handler;
        let refused: Arc<RefusedTunnels> = Arc::default();
        let waiting = Waiting {
            shared: self.shared.clone(),
            events_tx,
            record: record.clone(),
            identity: identity.clone(),
            next: next.clone(),
            refused: refused.clone(),
        };
        BotHandle {
            fingerprints: identity.info.fingerprints.clone(),
            identity,
            next,
            record,
            events,
            webhook_wake: Arc::default(),
            deliverer: Arc::new(std::sync::Mutex::new(
                (record_handler == Handler::Api).then(|| self.shared.clone()),
            )),
            driver: Arc::new(DriverSlot(std::sync::Mutex::new(Slot::Waiting(Box::new(
                waiting,
            ))))),
            refused,
        }
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

    /// Changes a running bot's clear-text policy and trust mode (what `change` names), stored
    /// first, then applied by its driver to the next message and the next tunnel; the bot as
    /// it is now, or `None` when there is no such bot.
    pub async fn set_policy(
        &self,
        jid: &str,
        change: PolicyChange,
        actor: &str,
    ) -> Result<Option<BotHandle>, BotError> {
        let _one_at_a_time = self.changes.lock().await;
        let Some(handle) = self.by_jid(jid) else {
            return Ok(None);
        };
        let policy = BotPolicy {
            encrypted_only: change
                .encrypted_only
                .unwrap_or(handle.record.encrypted_only),
            trust: change.trust.unwrap_or(handle.record.trust),
        };
        if !self
            .shared
            .store
            .set_policy(
                &handle.record.jid,
                policy.encrypted_only,
                policy.trust,
                actor,
            )
            .await?
        {
            return Ok(None);
        }
        let (done, applied) = oneshot::channel();
        if handle
            .send(BotCommand::SetPolicy(policy, done))
            .await
            .is_ok()
        {
            let _ = applied.await;
        }
        Ok(self.update(&handle.record.localpart, |entry| {
            entry.record.encrypted_only = policy.encrypted_only;
            entry.record.trust = policy.trust;
        }))
    }

    /// Changes the handle of a running bot; the handle as changed, `None` when it is gone.
    pub(super) fn update(
        &self,
        localpart: &str,
        change: impl FnOnce(&mut BotHandle),
    ) -> Option<BotHandle> {
        let mut bots = self.bots.write().expect("bots lock");
        let entry = bots.get_mut(localpart)?;
        change(entry);
        Some(entry.clone())
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
    pub async fn close_tunnel(&self, id: &TunnelId) -> bool {
        let Some(record) = self.shared.table.get(id) else {
            return false;
        };
        let Some(handle) = self.by_jid(&record.bot) else {
            return false;
        };
        let (tx, rx) = oneshot::channel();
        if handle
            .send(BotCommand::CloseTunnel(id.clone(), tx))
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Hands a short authentication string request to the driver of the live tunnel `id`.
    pub async fn sas(
        &self,
        id: &TunnelId,
        request: super::sas::SasRequest,
    ) -> Result<crate::store::SasStatus, super::sas::SasRefusal> {
        use super::sas::SasRefusal;
        let record = self.shared.table.get(id).ok_or(SasRefusal::NoTunnel)?;
        let handle = self.by_jid(&record.bot).ok_or(SasRefusal::NoTunnel)?;
        let (tx, rx) = oneshot::channel();
        handle
            .send(BotCommand::Sas(id.clone(), Box::new(request), tx))
            .await
            .map_err(|_| SasRefusal::NoTunnel)?;
        rx.await.unwrap_or(Err(SasRefusal::NoTunnel))
    }

    /// Tells every running driver about the link (one not started has no tunnel to lose and
    /// no peer to tell). The bots run here stay this instance's: if the next connection takes
    /// another slot, the instance that claims them fences this one's writes out.
    pub async fn broadcast_link(&self, up: bool) {
        self.shared.link_up.store(up, Ordering::Relaxed);
        for bot in self.list() {
            let Some(tx) = bot.driver.running() else {
                continue;
            };
            let cmd = if up {
                BotCommand::LinkUp
            } else {
                BotCommand::LinkDown
            };
            let _ = tx.send(cmd).await;
        }
    }

    /// Stops every driver, closing their tunnels.
    pub async fn stop_all(&self) {
        let bots = self.list();
        futures_util::future::join_all(bots.iter().map(|bot| bot.stop(CloseReason::Shutdown)))
            .await;
    }
}
