//! What a bot sends: messages submitted through the API go into an open tunnel to the peer,
//! or wait while the bot opens one as initiator (disco#info check first, spec §1.4–§1.8).
//! Every message is stored; its status moves accepted → opening/queued → sent → acknowledged
//! (the peer acknowledged every `data` carrying it) or ends in a failure, each change a
//! `delivery.status` event.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Duration;

use minidom::Element;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::driver::{BotDriver, normalize};
use crate::delivery::event::{BotEvent, FailStage};
use crate::store::{MessageStatus, OutMsg, StoreError, TunnelId};
use xtls::stanza::{Iq, IqType, build_iq, ns};
use xtls::tunnel::{CloseReason, SendError, State, Tunnel, TunnelKey, bare};

/// How long a peer may take to answer our disco#info.
const DISCO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages waiting for one tunnel to open, at most.
const MAX_WAITING: usize = 1000;
/// Peers whose available resources a bot remembers, at most.
const MAX_PRESENCE_PEERS: usize = 10_000;
/// Resources remembered per peer, at most.
const MAX_RESOURCES: usize = 16;

/// The first outcome of a submission, as `POST .../messages` reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Submitted {
    /// `sent`, `queued`, `opening`, or a failure.
    pub status: MessageStatus,
    /// Why, for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The tunnel carrying it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel_id: Option<TunnelId>,
}

impl Submitted {
    fn new(status: MessageStatus, reason: Option<String>, tunnel_id: Option<TunnelId>) -> Self {
        Self {
            status,
            reason,
            tunnel_id,
        }
    }
}

type Reply = Option<oneshot::Sender<Submitted>>;

/// A disco#info query in flight before a tunnel is opened.
#[derive(Debug)]
pub(super) struct Disco {
    key: TunnelKey,
    deadline: Instant,
    msgs: Vec<(OutMsg, Reply)>,
    opens: Vec<oneshot::Sender<Submitted>>,
}

/// The driver's outbound bookkeeping.
#[derive(Debug, Default)]
pub(super) struct Outbound {
    /// Disco queries by IQ id.
    discos: HashMap<String, Disco>,
    /// Messages waiting for their tunnel to open (or for room in it).
    waiting: HashMap<TunnelKey, VecDeque<OutMsg>>,
    /// Messages sent and not yet acknowledged, with their marks.
    unacked: HashMap<TunnelKey, VecDeque<(u64, OutMsg)>>,
    /// Available resources of peers, by bare JID: (full JID, priority).
    pub(super) presence: HashMap<String, Vec<(String, i8)>>,
    /// Messages already sent once on a tunnel that ended (not reopened twice).
    reopened: std::collections::HashSet<String>,
    /// Messages to submit again on a new tunnel.
    pub(super) resubmit: Vec<OutMsg>,
}

impl Outbound {
    /// Whether no message is on its way and no peer's presence is known.
    pub(super) fn is_idle(&self) -> bool {
        self.discos.is_empty()
            && self.waiting.is_empty()
            && self.unacked.is_empty()
            && self.presence.is_empty()
            && self.reopened.is_empty()
            && self.resubmit.is_empty()
    }

    /// Drops every message on its way without settling it: another instance runs the bot
    /// now, and finishes them (they stay unfinished in the store).
    pub(super) fn let_go(&mut self) {
        self.waiting.clear();
        self.unacked.clear();
        self.reopened.clear();
        self.resubmit.clear();
    }
}

impl BotDriver {
    /// Takes one message: into an open tunnel, behind one opening, or opens one.
    pub(super) async fn submit(&mut self, msg: OutMsg, reply: Reply) {
        let Some(key) = self.route_to(&msg.to) else {
            self.settle(
                &msg,
                MessageStatus::PeerUnavailable,
                Some("no available resource of the peer is known".into()),
                reply,
            )
            .await;
            return;
        };
        if let Some(live) = self.tunnels.get_mut(&key) {
            let id = live.record.id.clone();
            match live.tunnel.state() {
                // A tunnel admitted to pair with a code takes nothing until it pairs: the
                // message waits below and goes with the rest once the key is trusted.
                State::Open
                    if live.trusted()
                        && self.out.waiting.get(&key).is_none_or(VecDeque::is_empty) =>
                {
                    let now = Instant::now().into_std();
                    match live.tunnel.send(now, msg.stanza.clone()) {
                        Ok(mark) => {
                            self.out
                                .unacked
                                .entry(key)
                                .or_default()
                                .push_back((mark, msg.clone()));
                            self.settle(&msg, MessageStatus::Sent, None, reply).await;
                            self.set_tunnel(&msg, &id).await;
                        }
                        Err(SendError::Blocked) => {
                            self.refuse(
                                &msg,
                                reply,
                                "the tunnel's window and queue are full",
                                Some(id),
                            )
                            .await;
                        }
                        Err(SendError::NotOpen) => {
                            self.refuse(&msg, reply, "the tunnel is closing", Some(id))
                                .await;
                        }
                        Err(SendError::TooManyRequests) => {
                            let why = "too many inner IQ requests await the peer's answers";
                            self.refuse(&msg, reply, why, Some(id)).await;
                        }
                        // Not worth a retry: the message itself cannot be sent.
                        Err(e @ (SendError::NotXml | SendError::NotAwaited)) => {
                            let why = Some(e.to_string());
                            self.settle(&msg, MessageStatus::Failed, why, reply).await;
                        }
                    }
                }
                State::Starting | State::Handshaking | State::Open => {
                    let queue = self.out.waiting.entry(key).or_default();
                    if queue.len() >= MAX_WAITING {
                        self.refuse(
                            &msg,
                            reply,
                            "too many messages wait for this tunnel",
                            Some(id),
                        )
                        .await;
                        return;
                    }
                    queue.push_back(msg.clone());
                    self.settle(&msg, MessageStatus::Queued, None, reply).await;
                    self.set_tunnel(&msg, &id).await;
                }
                State::Closing | State::Closed => {
                    self.refuse(&msg, reply, "the tunnel is closing", Some(id))
                        .await;
                }
            }
            return;
        }
        if let Some(disco) = self.out.discos.values_mut().find(|d| d.key == key) {
            if disco.msgs.len() >= MAX_WAITING {
                self.refuse(&msg, reply, "too many messages wait for this peer", None)
                    .await;
                return;
            }
            disco.msgs.push((msg, reply));
            return;
        }
        self.ask_disco(key, vec![(msg, reply)], Vec::new()).await;
    }

    /// Opens a tunnel to a full JID (`POST /v1/tunnels`).
    pub(super) async fn open_to(&mut self, peer: String, reply: oneshot::Sender<Submitted>) {
        let key = TunnelKey {
            local: self.bot.jid.clone(),
            peer,
        };
        if let Some(live) = self.tunnels.get(&key) {
            let _ = reply.send(Submitted::new(
                MessageStatus::Sent,
                Some("a tunnel to this peer is live".into()),
                Some(live.record.id.clone()),
            ));
            return;
        }
        if let Some(disco) = self.out.discos.values_mut().find(|d| d.key == key) {
            disco.opens.push(reply);
            return;
        }
        self.ask_disco(key, Vec::new(), vec![reply]).await;
    }

    /// The tunnel key a recipient maps to: the live tunnel to it (any resource of a bare
    /// JID), or else the available resource of highest priority.
    pub(super) fn route_to(&self, to: &str) -> Option<TunnelKey> {
        if to.contains('/') {
            return Some(
                self.tunnels
                    .keys()
                    .find(|k| k.peer == to)
                    .cloned()
                    .unwrap_or_else(|| TunnelKey {
                        local: self.bot.jid.clone(),
                        peer: to.to_owned(),
                    }),
            );
        }
        let live = self
            .tunnels
            .iter()
            .filter(|(k, _)| bare(&k.peer) == to)
            .max_by_key(|(_, l)| l.tunnel.state() == State::Open)
            .map(|(k, _)| k.clone());
        live.or_else(|| {
            let (full, _) = self.out.presence.get(to)?.iter().max_by_key(|(_, p)| *p)?;
            Some(TunnelKey {
                local: self.bot.jid.clone(),
                peer: full.clone(),
            })
        })
    }

    pub(super) async fn ask_disco(
        &mut self,
        key: TunnelKey,
        msgs: Vec<(OutMsg, Reply)>,
        opens: Vec<oneshot::Sender<Submitted>>,
    ) {
        let id = format!("disco-{:016x}", rand::random::<u64>());
        let query = Element::bare("query", ns::DISCO_INFO);
        self.send(build_iq(
            IqType::Get,
            &id,
            &key.local,
            &key.peer,
            Some(query),
        ))
        .await;
        self.out.discos.insert(
            id,
            Disco {
                key,
                deadline: Instant::now() + DISCO_TIMEOUT,
                msgs,
                opens,
            },
        );
    }

    /// Handles the answer to one of our disco queries; `false` when it is not one.
    pub(super) async fn on_disco_answer(&mut self, iq: &Iq) -> bool {
        let Some(disco) = self.out.discos.remove(&iq.id) else {
            return false;
        };
        if normalize(&iq.from).as_deref() != Some(disco.key.peer.as_str()) {
            // Not from whom we asked: keep waiting for the real answer.
            self.out.discos.insert(iq.id.clone(), disco);
            return true;
        }
        let outcome = match iq.type_ {
            IqType::Result => {
                let supports = iq.children.iter().any(|q| {
                    q.is("query", ns::DISCO_INFO)
                        && q.children().any(|f| {
                            f.is("feature", ns::DISCO_INFO) && f.attr("var") == Some(ns::XTLS)
                        })
                });
                if supports {
                    None
                } else {
                    Some((
                        MessageStatus::NoXtlsSupport,
                        "the peer does not advertise urn:xmpp:tmp:xtls".to_owned(),
                    ))
                }
            }
            _ => Some((
                MessageStatus::PeerUnavailable,
                format!("disco#info answered {}", iq.error_condition()),
            )),
        };
        match outcome {
            Some((status, reason)) => self.fail_disco(disco, status, reason).await,
            None => self.initiate(disco).await,
        }
        true
    }

    /// Fails the disco queries whose deadline passed.
    pub(super) async fn disco_timeouts(&mut self, now: Instant) {
        let late: Vec<String> = self
            .out
            .discos
            .iter()
            .filter(|(_, d)| d.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in late {
            let disco = self.out.discos.remove(&id).expect("listed");
            self.fail_disco(
                disco,
                MessageStatus::PeerUnavailable,
                "disco#info was not answered".into(),
            )
            .await;
        }
    }

    /// The earliest disco deadline.
    pub(super) fn disco_deadline(&self) -> Option<Instant> {
        self.out.discos.values().map(|d| d.deadline).min()
    }

    pub(super) async fn fail_disco(&mut self, disco: Disco, status: MessageStatus, reason: String) {
        tracing::info!(
            bot = self.bot.jid,
            peer = disco.key.peer,
            status = status.as_str(),
            reason,
            "no tunnel opened"
        );
        let event = BotEvent::TunnelFailed {
            stage: FailStage::Disco,
            reason: reason.clone(),
            code: status.as_str().to_owned(),
        };
        self.log(None, event.into_row(None, Some(disco.key.peer.clone())));
        for (msg, reply) in disco.msgs {
            self.settle(&msg, status, Some(reason.clone()), reply).await;
        }
        for reply in disco.opens {
            let _ = reply.send(Submitted::new(status, Some(reason.clone()), None));
        }
    }

    pub(super) async fn initiate(&mut self, disco: Disco) {
        let key = disco.key;
        if let Some(live) = self.tunnels.get(&key) {
            // The peer opened a tunnel with this key while we asked: use it.
            let id = live.record.id.clone();
            for (msg, reply) in disco.msgs {
                Box::pin(self.submit(msg, reply)).await;
            }
            for reply in disco.opens {
                let _ = reply.send(Submitted::new(
                    MessageStatus::Opening,
                    None,
                    Some(id.clone()),
                ));
            }
            return;
        }
        let refused = self
            .over_limit(&key)
            .map(|text| (MessageStatus::RateLimited, text.to_owned()));
        let params = match refused {
            Some(_) => None,
            None => match self.tunnel_params(&key).await {
                Ok(params) => Some(params),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read pins");
                    None
                }
            },
        };
        let Some(params) = params else {
            let (status, reason) =
                refused.unwrap_or((MessageStatus::RateLimited, "store unavailable".into()));
            for (msg, reply) in disco.msgs {
                self.refuse(&msg, reply, &reason, None).await;
            }
            for reply in disco.opens {
                let _ = reply.send(Submitted::new(status, Some(reason.clone()), None));
            }
            return;
        };
        let tunnel = Tunnel::initiate(Instant::now().into_std(), params);
        let id = self.adopt(key.clone(), tunnel).await;
        for (msg, reply) in disco.msgs {
            self.settle(&msg, MessageStatus::Opening, None, reply).await;
            self.set_tunnel(&msg, &id).await;
            self.out
                .waiting
                .entry(key.clone())
                .or_default()
                .push_back(msg);
        }
        for reply in disco.opens {
            let _ = reply.send(Submitted::new(
                MessageStatus::Opening,
                None,
                Some(id.clone()),
            ));
        }
    }

    /// Sends what waits for a tunnel that is open (again writable).
    pub(super) async fn send_waiting(&mut self, key: &TunnelKey) {
        let now = Instant::now().into_std();
        loop {
            let Some(live) = self.tunnels.get_mut(key) else {
                return;
            };
            if live.tunnel.state() != State::Open || !live.trusted() {
                return;
            }
            let Some(msg) = self.out.waiting.get_mut(key).and_then(VecDeque::pop_front) else {
                return;
            };
            match live.tunnel.send(now, msg.stanza.clone()) {
                Ok(mark) => {
                    self.out
                        .unacked
                        .entry(key.clone())
                        .or_default()
                        .push_back((mark, msg.clone()));
                    self.settle(&msg, MessageStatus::Sent, None, None).await;
                }
                Err(SendError::Blocked | SendError::NotOpen) => {
                    // Full: the rest goes out on the next Writable event. Closing: it waits
                    // with the rest, and fails or moves when the tunnel ends.
                    self.out
                        .waiting
                        .entry(key.clone())
                        .or_default()
                        .push_front(msg);
                    return;
                }
                // This message can never go out: it fails, the ones behind it go on.
                Err(
                    e @ (SendError::NotXml | SendError::NotAwaited | SendError::TooManyRequests),
                ) => {
                    self.settle(&msg, MessageStatus::Failed, Some(e.to_string()), None)
                        .await;
                }
            }
        }
    }

    /// The peer acknowledged every `data` up to `mark`.
    pub(super) async fn on_acknowledged(&mut self, key: &TunnelKey, mark: u64) {
        let mut done = Vec::new();
        if let Some(queue) = self.out.unacked.get_mut(key) {
            while queue.front().is_some_and(|(m, _)| *m <= mark) {
                done.push(queue.pop_front().expect("checked").1);
            }
        }
        for msg in done {
            self.out.reopened.remove(&msg.id);
            self.settle(&msg, MessageStatus::Acknowledged, None, None)
                .await;
        }
    }

    /// A tunnel ended: what it did not deliver fails, or goes out on a new tunnel.
    pub(super) async fn on_closed_outbound(&mut self, key: &TunnelKey, reason: &CloseReason) {
        // Oldest first: what was sent, then what waited.
        let mut lost: Vec<OutMsg> = self
            .out
            .unacked
            .remove(key)
            .unwrap_or_default()
            .into_iter()
            .map(|(_, m)| m)
            .collect();
        let waiting = self.out.waiting.remove(key).unwrap_or_default();
        if matches!(reason, CloseReason::Replaced | CloseReason::Conflict) {
            // The peer's own tunnel has the same key (it replaced ours, or its start won the
            // tie-break over ours): what never went out waits for it.
            self.out.resubmit.extend(waiting);
        } else {
            lost.extend(waiting);
        }
        let status = match reason {
            CloseReason::Refused(_) => MessageStatus::Refused,
            CloseReason::NotSupported(_) => MessageStatus::NoXtlsSupport,
            CloseReason::Busy(_) => MessageStatus::PeerBusy,
            CloseReason::Conflict => MessageStatus::Conflict,
            r if r.identity_change().is_some() => MessageStatus::IdentityChanged,
            _ => MessageStatus::Failed,
        };
        for msg in lost {
            if msg.reopen && self.out.reopened.insert(msg.id.clone()) {
                tracing::info!(
                    bot = self.bot.jid,
                    message = msg.id,
                    "message goes out on a new tunnel"
                );
                // Submitted once the ended tunnel has left the table.
                self.out.resubmit.push(msg);
            } else {
                self.settle(&msg, status, Some(format!("tunnel ended: {reason}")), None)
                    .await;
            }
        }
    }

    /// Follows peers' availability, to route messages addressed to a bare JID.
    pub(super) fn track_presence(&mut self, el: &Element) {
        let Some(from) = el.attr("from").and_then(normalize) else {
            return;
        };
        if !from.contains('/') {
            return;
        }
        let bare_jid = bare(&from).to_owned();
        if !self.out.presence.contains_key(&bare_jid)
            && self.out.presence.len() >= MAX_PRESENCE_PEERS
        {
            return;
        }
        let resources = self.out.presence.entry(bare_jid.clone()).or_default();
        resources.retain(|(full, _)| *full != from);
        match el.attr("type") {
            None => {
                let priority = el
                    .get_child("priority", ns::CLIENT)
                    .and_then(|p| p.text().trim().parse().ok())
                    .unwrap_or(0);
                if resources.len() < MAX_RESOURCES {
                    resources.push((from, priority));
                }
            }
            Some(_) => {
                if resources.is_empty() {
                    self.out.presence.remove(&bare_jid);
                }
            }
        }
    }

    /// At start: messages a previous run accepted and did not finish fail visibly, or go out
    /// again when they asked for that.
    pub(super) async fn recover_messages(&mut self) {
        let pending = match self
            .shared
            .store
            .unfinished_messages(&self.bot.jid, &self.started_at)
            .await
        {
            Ok(pending) => pending,
            Err(e) => {
                tracing::error!(bot = self.bot.jid, error = %e, "cannot read unfinished messages");
                return;
            }
        };
        for msg in pending {
            if msg.reopen {
                // Goes out once the server link is up.
                self.out.reopened.insert(msg.id.clone());
                self.out.resubmit.push(msg);
            } else {
                self.settle(
                    &msg,
                    MessageStatus::Failed,
                    Some("the component restarted before the peer acknowledged it".into()),
                    None,
                )
                .await;
            }
        }
    }

    /// Submits again what lost its tunnel and asked for a new one (once the link is up).
    pub(super) async fn resubmit(&mut self) {
        if !self.shared.link_up.load(Ordering::Relaxed) {
            return;
        }
        for msg in std::mem::take(&mut self.out.resubmit) {
            self.submit(msg, None).await;
        }
    }

    /// Refuses a message for now: `rate_limited` to a waiting API caller (nothing is
    /// accepted), or a visible failure for a message accepted earlier.
    pub(super) async fn refuse(
        &mut self,
        msg: &OutMsg,
        reply: Reply,
        reason: &str,
        tunnel_id: Option<TunnelId>,
    ) {
        self.shared.metrics.rejected("outbound_messages");
        let outcome = Submitted::new(MessageStatus::RateLimited, Some(reason.into()), tunnel_id);
        // The caller deletes a refused message; when it stopped waiting, it is ours to fail.
        if let Some(Err(_)) | None = reply.map(|r| r.send(outcome)) {
            self.settle(msg, MessageStatus::Failed, Some(reason.into()), None)
                .await;
        }
    }

    /// Records a status change (store and event) and answers the submitter.
    pub(super) async fn settle(
        &mut self,
        msg: &OutMsg,
        status: MessageStatus,
        reason: Option<String>,
        reply: Reply,
    ) {
        if self.lost {
            // Another instance runs the bot now and finishes the message.
            let why = "another instance runs this bot now".to_owned();
            answer(
                reply,
                Submitted::new(MessageStatus::Failed, Some(why), None),
            );
            return;
        }
        if status.is_final() {
            self.out.reopened.remove(&msg.id);
        }
        let store = &self.shared.store;
        let updated = match self.shared.owners.lease(&self.bot.jid) {
            Ok(lease) => {
                let update =
                    store.update_message(&msg.id, status, reason.as_deref(), lease.as_ref());
                update.await
            }
            Err(e) => Err(e),
        };
        match updated {
            Ok(()) => {}
            // The new owner finishes the message; this driver lets the bot go.
            Err(StoreError::NotOwner(_)) => self.lost_noticed.store(true, Ordering::Relaxed),
            Err(e) => {
                tracing::error!(bot = self.bot.jid, message = msg.id, error = %e, "cannot record message status")
            }
        }
        let event = BotEvent::DeliveryStatus {
            message_id: Some(msg.id.clone()),
            to: Some(msg.to.clone()),
            status,
            reason: reason.clone(),
        };
        self.log(None, event.into_row(None, Some(msg.to.clone())));
        answer(reply, Submitted::new(status, reason, None));
    }

    pub(super) async fn set_tunnel(&self, msg: &OutMsg, tunnel_id: &TunnelId) {
        let store = &self.shared.store;
        let set = match self.shared.owners.lease(&self.bot.jid) {
            Ok(lease) => {
                store
                    .set_message_tunnel(&msg.id, tunnel_id, lease.as_ref())
                    .await
            }
            Err(e) => Err(e),
        };
        match set {
            Ok(()) => {}
            Err(StoreError::NotOwner(_)) => self.lost_noticed.store(true, Ordering::Relaxed),
            Err(e) => tracing::error!(message = msg.id, error = %e, "cannot record message tunnel"),
        }
    }
}

fn answer(reply: Reply, outcome: Submitted) {
    if let Some(reply) = reply {
        let _ = reply.send(outcome);
    }
}
