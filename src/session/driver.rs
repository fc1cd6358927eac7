//! One bot's driver: the task that owns the bot's tunnels and their single timer, and the
//! order of a step (take commands, feed the engines, pump their output, commit the events,
//! write what waited for the commit).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use minidom::Element;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::config::{BotTrust, Handler};
use crate::delivery::event::BotEvent;
use crate::store::MessageStatus;
use crate::store::{BotRecord, NewEvent, StoreError, TunnelId, TunnelRecord};
use xtls::stanza::xtls::XtlsElement;
use xtls::stanza::{IqType, build_iq, name, ns};
use xtls::tunnel::{BotCredentials, CloseReason, PeerAuth, State, Tunnel, TunnelKey, bare};

use super::Shared;
use super::events::refuse_ack;
use super::outbound;
use super::table::BotCommand;

pub(super) struct Live {
    pub(super) tunnel: Tunnel,
    /// When the tunnel was created (for the handshake duration).
    pub(super) created: Instant,
    pub(super) record: TunnelRecord,
    /// Whether this tunnel counts against the concurrent-handshake cap.
    pub(super) in_handshake: bool,
    /// Whether the store refused the peer's key after the handshake: the tunnel is closing
    /// and nothing more of it reaches the bot.
    pub(super) refused: bool,
    /// The short authentication string exchange's state (its status is in `record.sas`).
    pub(super) sas: super::sas::SasEngine,
    /// The ids of the IQs the short authentication string exchange sent (the newest few):
    /// their answers, however late, and their local failures are the exchange's.
    pub(super) sas_ids: Vec<String>,
    /// A pairing exchange waiting for the peer's confirmation, with the code it used.
    pub(super) pair: Option<(xtls::pair::Verifier, String)>,
}

impl Live {
    /// Whether the bot may send into this tunnel: its peer's key was not refused, and the
    /// tunnel is not one admitted to pair with a code and not paired yet.
    pub(super) fn trusted(&self) -> bool {
        !self.refused && self.record.peer_identity.trust != crate::store::PeerTrust::Pairing
    }

    /// Whether the tunnel's counters or state moved since the record last took them.
    pub(super) fn changed(&self) -> bool {
        let stats = self.tunnel.stats();
        let r = &self.record;
        (
            stats.stanzas_in,
            stats.stanzas_out,
            stats.bytes_in,
            stats.bytes_out,
        ) != (r.stanzas_in, r.stanzas_out, r.bytes_in, r.bytes_out)
            || self.tunnel.is_gone()
            || r.state != self.tunnel.state()
    }
}

/// A driver closing its tunnels before it stops.
pub(super) struct Stopping {
    pub(super) deadline: Instant,
    pub(super) reason: CloseReason,
    pub(super) done: Vec<oneshot::Sender<()>>,
}

/// How long a stopping driver waits for its peers to answer the graceful close.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub(super) struct BotDriver {
    pub(super) bot: BotRecord,
    /// Whether a previous run left messages to recover (read once for all bots at start-up).
    pub(super) recover_at_start: bool,
    /// Set once asked to stop: new work is refused while the tunnels close.
    pub(super) stopping: Option<Stopping>,
    /// When this driver was made: messages accepted earlier belong to a previous run.
    pub(super) started_at: String,
    pub(super) handler: Handler,
    /// Whether this bot keeps an event log (the `api` handler).
    pub(super) logging: bool,
    /// The `seq` of the newest committed event.
    pub(super) last_seq: u64,
    pub(super) events_tx: watch::Sender<u64>,
    /// Events of this step, committed before `held` goes out; stanza events name their tunnel.
    pub(super) pending_events: Vec<(Option<TunnelKey>, NewEvent)>,
    /// Stanzas for the server, held until this step's events are committed (the durability
    /// rule: a `data` IQ is acknowledged only once what it carried is stored).
    pub(super) held: Vec<(Option<TunnelKey>, Element)>,
    /// Messages the bot sends.
    pub(super) out: outbound::Outbound,
    pub(super) peer_auth: PeerAuth,
    pub(super) trust: BotTrust,
    pub(super) creds: BotCredentials,
    /// The announced next certificate, shown in disco#info.
    pub(super) next: Option<Arc<crate::store::NextCertificate>>,
    pub(super) rx: mpsc::Receiver<BotCommand>,
    pub(super) shared: Arc<Shared>,
    pub(super) tunnels: HashMap<TunnelKey, Live>,
    /// Peers of tunnels lost with the link, told with `<close/>` once it is back.
    pub(super) former_peers: Arc<std::sync::Mutex<std::collections::VecDeque<TunnelKey>>>,
    /// Which link session's pacer may send `<close/>`s to `former_peers`.
    pub(super) pacer_generation: Arc<std::sync::atomic::AtomicU64>,
    /// Tunnels the router refused a request of while this driver was busy.
    pub(super) refused: Arc<super::table::RefusedTunnels>,
    /// Where this driver parks when it has nothing to do.
    pub(super) slot: Arc<super::table::DriverSlot>,
    /// When the last command or timer was handled.
    pub(super) idle_since: Instant,
    /// Whether another instance took the bot over: nothing more is written for it.
    pub(super) lost: bool,
    /// Set by a write the store refused because another instance runs the bot now.
    pub(super) lost_noticed: std::sync::atomic::AtomicBool,
}

pub(super) fn normalize(jid: &str) -> Option<String> {
    jid::Jid::new(jid).ok().map(|j| j.to_string())
}

/// Events kept for the next commit while the store refuses them.
pub(super) const MAX_RETAINED_EVENTS: usize = 10_000;

pub(super) fn random_prefix() -> String {
    format!("x{:016x}-", rand::random::<u64>())
}

/// A `<close/>` for a tunnel that no engine holds any more (lost with the link, or dropped
/// at shutdown): its answer matches nothing and is dropped.
pub(super) fn standalone_close(key: &TunnelKey) -> Element {
    build_iq(
        IqType::Set,
        &format!("{}1", random_prefix()),
        &key.local,
        &key.peer,
        Some(XtlsElement::Close.to_element()),
    )
}

impl BotDriver {
    /// Runs until stopped. Every step's work is boxed: the task itself keeps only the driver's
    /// state and its wait for the next command, which is what an idle bot costs (the steps'
    /// own futures, inlined, made the task 10.6 KiB whether busy or not).
    pub(super) async fn run(mut self) {
        if self.recover_at_start {
            Box::pin(self.recover_messages()).await;
        }
        Box::pin(self.pump()).await;
        Box::pin(self.flush()).await;
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
            let park_at = self.idle_since + self.shared.park_after();
            tokio::select! {
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    if Box::pin(self.dispatch(cmd)).await {
                        return;
                    }
                    // Take what is already queued too, so one commit covers many `data` IQs.
                    for _ in 1..self.shared.max_batch {
                        let Ok(cmd) = self.rx.try_recv() else { break };
                        if Box::pin(self.dispatch(cmd)).await {
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
                    Box::pin(self.disco_timeouts(Instant::from_std(now))).await;
                }
                _ = tokio::time::sleep_until(park_at), if deadline.is_none() && self.parkable() => {
                    self.park();
                    return;
                }
            }
            self.idle_since = Instant::now();
            self.end_refused();
            Box::pin(self.pump()).await;
            if !self.out.resubmit.is_empty() {
                Box::pin(self.resubmit()).await;
                Box::pin(self.pump()).await;
            }
            Box::pin(self.flush()).await;
            if self.lost_noticed.swap(false, Ordering::Relaxed) {
                self.lost_bot();
            }
            if Box::pin(self.finish_stopping()).await {
                return;
            }
        }
    }

    /// Whether nothing would be lost if this driver's task ended now: no tunnel, nothing to
    /// commit or send, no message on its way, no peer's presence to announce again.
    pub(super) fn parkable(&self) -> bool {
        self.tunnels.is_empty()
            && self.stopping.is_none()
            && self.pending_events.is_empty()
            && self.held.is_empty()
            && self.out.is_idle()
            && self
                .former_peers
                .lock()
                .expect("former peers lock")
                .is_empty()
            && self.rx.is_empty()
    }

    /// Hands the bot back to its slot as it is now, and ends
    /// ([`DriverSlot::park`](super::table::DriverSlot::park)).
    fn park(mut self) {
        let (events_tx, _) = watch::channel(0);
        let mut record = self.bot.clone();
        record.trust = self.trust;
        record.peer_auth = self.peer_auth;
        let seed = super::table::Waiting {
            shared: self.shared.clone(),
            events_tx: std::mem::replace(&mut self.events_tx, events_tx),
            record,
            identity: self.creds.identity.clone(),
            next: self.next.clone(),
            refused: self.refused.clone(),
        };
        tracing::debug!(bot = self.bot.jid, "driver parked");
        let slot = self.slot.clone();
        slot.park(&mut self.rx, seed);
    }

    /// Handles one command; `true` once the driver has stopped.
    pub(super) async fn dispatch(&mut self, cmd: BotCommand) -> bool {
        if let BotCommand::Stop(reason, done) = cmd {
            let reason = *reason;
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

    /// Spec §3.5 rule 4, once the link is back (or the bot was taken over from another
    /// instance): the bot's presence again to the peers it knows, then paced `<close/>`s to
    /// its former tunnels' peers.
    fn tell_former_peers(&mut self) {
        // Spec §3.5 rule 4: first the bot's presence, again, to the peers it knows (its
        // former tunnel peers and those who told it they are available); then paced
        // `<close/>` so peers drop zombie state.
        // A new tunnel to one of them takes it off the list (`adopt`): its `start`
        // replaces the stale state, and a late `<close/>` would end the new tunnel.
        // One pacer per link session: it stops when the link goes down again (the
        // rest waits for the next one), so no `<close/>` is spent on a dead link.
        let generation = self.pacer_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let current = self.pacer_generation.clone();
        let peers = self.former_peers.clone();
        let shared = self.shared.clone();
        let out = self.shared.out.clone();
        let mut announce: Vec<Element> = Vec::new();
        let mut told = HashSet::new();
        let former: Vec<String> = peers
            .lock()
            .expect("former peers lock")
            .iter()
            .map(|k| bare(&k.peer).to_owned())
            .collect();
        for peer in former.into_iter().chain(self.out.presence.keys().cloned()) {
            if told.insert(peer.clone()) {
                announce.push(
                    Element::builder("presence", ns::CLIENT)
                        .attr(name("from"), self.bot.jid.as_str())
                        .attr(name("to"), peer.as_str())
                        .build(),
                );
            }
        }
        tokio::spawn(async move {
            // Paced like the closes (10 per second), so a bot that knows many peers
            // does not crowd the link all other bots share.
            for presence in announce {
                if !shared.link_up.load(Ordering::Relaxed)
                    || current.load(Ordering::Relaxed) != generation
                    || out.send(presence).await.is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
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

    /// Once stopping and every tunnel is closed (or the grace period is over): stops.
    pub(super) async fn finish_stopping(&mut self) -> bool {
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
        if self.lost {
            // Nothing starts from this slot again: a claim of the bot starts it afresh.
            self.slot.stop();
        }
        true
    }

    /// Ends the tunnels whose `data` or `close` the router refused while this driver was
    /// busy: the peer got an error, and after an error a tunnel is gone (spec §1.11).
    pub(super) fn end_refused(&mut self) {
        for ((local, peer), refused_at) in self.refused.take() {
            // Only the tunnel the refusal was about: one the peer started afterwards (its
            // answer to the error) lives on.
            if let Some(live) = self.tunnels.get_mut(&TunnelKey { local, peer })
                && !live.tunnel.is_gone()
                && live.created <= refused_at
            {
                live.tunnel.abandon(CloseReason::Overloaded);
            }
        }
    }

    /// Queues a stanza for the server; it leaves at the end of this step.
    pub(super) async fn send(&mut self, stanza: Element) {
        self.held.push((None, stanza));
    }

    /// Logs an event; `acked_by` names the tunnel whose `data` acknowledgement waits for it
    /// (a stanza that arrived), so a failed commit refuses that acknowledgement.
    pub(super) fn log(&mut self, acked_by: Option<&TunnelKey>, event: NewEvent) {
        if self.logging {
            self.pending_events.push((acked_by.cloned(), event));
        }
    }

    /// Commits this step's events, then releases the held stanzas. When the commit fails,
    /// the acknowledgements of the tunnels whose stanzas were not stored become errors and
    /// those tunnels end: the peer must not believe they arrived.
    pub(super) async fn flush(&mut self) {
        if !self.pending_events.is_empty() {
            let (keys, events): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.pending_events).into_iter().unzip();
            let store = &self.shared.store;
            let committed = match self.shared.owners.lease(&self.bot.jid) {
                Ok(lease) => {
                    store
                        .append_events(&self.bot.jid, self.last_seq, &events, lease.as_ref())
                        .await
                }
                Err(e) => Err(e),
            };
            match committed {
                Ok(stored) => {
                    self.last_seq += stored.len() as u64;
                    self.events_tx.send_replace(self.last_seq);
                }
                Err(e) => {
                    tracing::error!(bot = self.bot.jid, error = %e, "cannot commit events; refusing the stanzas they carried");
                    if matches!(e, StoreError::NotOwner(_)) {
                        self.lost_bot();
                    }
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

    pub(super) async fn handle(&mut self, cmd: BotCommand) {
        match cmd {
            BotCommand::Stanza(el) => self.handle_stanza(*el).await,
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
            BotCommand::LinkUp => self.tell_former_peers(),
            BotCommand::TakenOver(lost) => {
                // The tunnels another instance ran for this bot: their peers are told as
                // after a link loss (the new owner's presence, then paced `<close/>`s).
                self.former_peers
                    .lock()
                    .expect("former peers lock")
                    .extend(lost);
                self.tell_former_peers();
            }
            BotCommand::Reply(id, stanzas) => {
                let now = Instant::now().into_std();
                match self.tunnels.values_mut().find(|l| l.record.id == id) {
                    Some(live) if live.trusted() => {
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
                    Some(_) => self.reply_failed(&id, None, "the tunnel's peer is not trusted"),
                    None => self.reply_failed(&id, None, "the tunnel is gone"),
                }
            }
            BotCommand::Submit(msg, reply) => self.submit(*msg, Some(reply)).await,
            BotCommand::Open(peer, reply) => self.open_to(peer, reply).await,
            BotCommand::Record(event, peer) => self.log(None, event.into_row(None, peer)),
            BotCommand::SetPolicy(policy, done) => {
                self.bot.encrypted_only = policy.encrypted_only;
                self.trust = policy.trust;
                tracing::info!(
                    bot = self.bot.jid,
                    encrypted_only = policy.encrypted_only,
                    trust = policy.trust.as_str(),
                    "policy set"
                );
                let _ = done.send(());
            }
            BotCommand::Sas(id, request, done) => {
                let _ = done.send(self.sas_request(&id, *request).await);
            }
            BotCommand::Recover => self.recover_messages().await,
            BotCommand::SetCertificates(certificates, done) => {
                if let Some(active) = certificates.active {
                    self.creds = active;
                }
                self.next = certificates.next;
                let _ = done.send(());
            }
            BotCommand::Stop(..) => unreachable!("handled by dispatch"),
        }
    }

    /// A webhook's synchronous reply could not go into its tunnel: said in the log.
    pub(super) fn reply_failed(&mut self, tunnel_id: &TunnelId, peer: Option<String>, why: &str) {
        tracing::warn!(
            bot = self.bot.jid,
            tunnel = %tunnel_id,
            why,
            "webhook reply not sent"
        );
        let event = BotEvent::DeliveryStatus {
            message_id: None,
            to: None,
            status: MessageStatus::Failed,
            reason: Some(format!("webhook reply not sent: {why}")),
        };
        self.log(None, event.into_row(Some(tunnel_id.clone()), peer));
    }

    pub(super) async fn stop(&mut self, reason: CloseReason) {
        for (key, live) in self.tunnels.iter_mut() {
            if live.tunnel.state() != State::Closed {
                let _ = self.shared.out.send(standalone_close(key)).await;
                live.tunnel.abandon(reason.clone());
            }
        }
        self.pump().await;
        self.flush().await;
    }

    /// Takes a new tunnel into the session table; returns its id.
    pub(super) async fn adopt(&mut self, key: TunnelKey, tunnel: Tunnel) -> TunnelId {
        let role = tunnel.role();
        let record = TunnelRecord::new(
            TunnelId::random(),
            &self.bot.jid,
            &key,
            role,
            tunnel.state(),
            crate::store::now(),
        );
        tracing::info!(
            bot = self.bot.jid,
            peer = key.peer,
            tunnel = %record.id,
            role = role.as_str(),
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
        let event = BotEvent::TunnelOpened { role };
        let row = event.into_row(Some(record.id.clone()), Some(key.peer.clone()));
        self.log(Some(&key), row);
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
                refused: false,
                sas: super::sas::SasEngine::Idle,
                sas_ids: Vec::new(),
                pair: None,
            },
        );
        id
    }

    pub(super) async fn save(&self, record: &TunnelRecord) {
        let store = &self.shared.store;
        let saved = match self.shared.owners.lease(&self.bot.jid) {
            Ok(lease) => store.save_tunnel(record, lease.as_ref()).await,
            Err(e) => Err(e),
        };
        match saved {
            Ok(()) => {}
            // The row is the new owner's; this driver lets the bot go after this step.
            Err(e @ StoreError::NotOwner(_)) => {
                tracing::debug!(error = %e, tunnel = %record.id, "tunnel not recorded");
                self.lost_noticed.store(true, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, tunnel = %record.id, "cannot record tunnel"),
        }
    }

    /// Another instance runs this bot now (its write was refused): this one lets it go. Its
    /// tunnels end (their stanzas reach the new owner), nothing more is written for it (the
    /// new owner finishes its messages), and the driver stops, its webhook deliverer and
    /// event readers with it.
    pub(super) fn lost_bot(&mut self) {
        if self.lost {
            return;
        }
        tracing::warn!(
            bot = self.bot.jid,
            "another instance runs this bot now: this one lets it go"
        );
        self.lost = true;
        self.shared.owners.forget(&self.bot.jid);
        for live in self.tunnels.values_mut() {
            live.tunnel.abandon(CloseReason::ConnectionLost);
        }
        self.out.let_go();
        self.pending_events.clear();
        if self.stopping.is_none() {
            self.stopping = Some(Stopping {
                deadline: Instant::now(),
                reason: CloseReason::ConnectionLost,
                done: Vec::new(),
            });
        }
    }

    /// Drains every tunnel's output and events until nothing moves; drops finished tunnels.
    pub(super) async fn pump(&mut self) {
        // Only the tunnels with output or news: a stanza touches one tunnel of many, and
        // copying every record on every stanza made a busy bot's cost grow with its tunnels.
        let keys: Vec<TunnelKey> = self
            .tunnels
            .iter()
            .filter(|(_, live)| live.tunnel.has_output() || live.changed())
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            // Events first: a reply the bot writes to what just arrived then leaves with the
            // acknowledgement of the `data` that carried it (Tunnel::poll_transmit).
            while let Some(live) = self.tunnels.get_mut(&key) {
                let mut events = Vec::new();
                while let Some(ev) = live.tunnel.poll_event() {
                    events.push(ev);
                }
                let had_events = !events.is_empty();
                for ev in events {
                    self.on_event(&key, ev).await;
                }
                let Some(live) = self.tunnels.get_mut(&key) else {
                    break;
                };
                let mut stanzas = Vec::new();
                while let Some(el) = live.tunnel.poll_transmit() {
                    stanzas.push(el);
                }
                if stanzas.is_empty() && !had_events {
                    break;
                }
                self.held
                    .extend(stanzas.into_iter().map(|el| (Some(key.clone()), el)));
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
                live.record.state = live.tunnel.state();
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
}
