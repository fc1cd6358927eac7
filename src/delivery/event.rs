//! The events a bot's backend receives: one typed enum, the contract of the event log
//! (docs/bot-api.md). The session layer makes them; the store keeps them as rows; poll, SSE
//! and webhooks hand them out in the envelope [`crate::store::EventRecord`].

use minidom::Element;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::store::{MessageStatus, NewEvent, PinAction, TunnelId};
use xtls::tunnel::{CloseReason, Established, Role, TrustVerdict};

/// The peer's key, as the handshake judged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Identity {
    /// SPKI SHA-256 of the peer's key, colon hex; null when it presented no certificate.
    pub spki_sha256: Option<String>,
    /// `pinned`, `tofu_new` (first key of the peer, now pinned) or `unauthenticated`.
    pub trust: TrustVerdict,
}

impl Identity {
    /// What an established tunnel knows of its peer.
    pub fn of(established: &Established) -> Identity {
        Identity {
            spki_sha256: established
                .peer
                .spki_sha256
                .as_ref()
                .map(ToString::to_string),
            trust: established.peer.trust,
        }
    }
}

/// A stanza that arrived through a tunnel, routing restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StanzaReceived {
    /// The text of its `<body/>`, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The whole stanza, serialized.
    pub stanza: String,
    /// The peer's key; null when the tunnel had not finished its handshake, or for a stanza
    /// sent in clear.
    pub identity: Option<Identity>,
    /// Whether it came through a tunnel; `false` for a stanza the peer sent in clear (spec
    /// §1.9 rule 8), which the servers on the way could read and change.
    #[serde(default = "encrypted_by_default")]
    pub encrypted: bool,
    /// Present and `true` for an error the component made itself: the tunnel closed before
    /// the peer answered the bot's inner IQ request (spec §1.9 rule 7).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

/// Events stored before `encrypted` existed all came through tunnels.
fn encrypted_by_default() -> bool {
    true
}

/// Where a tunnel that never opened failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailStage {
    /// The peer's disco#info said no, or never came.
    Disco,
    /// Our `start` was refused or unanswered.
    Start,
    /// The TLS handshake did not finish.
    Handshake,
}

/// One event of a bot's log: its `type` and its `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", content = "data")]
pub enum BotEvent {
    /// A `<message/>` arrived through a tunnel.
    #[serde(rename = "message.received")]
    MessageReceived(StanzaReceived),
    /// A `<presence/>` arrived through a tunnel.
    #[serde(rename = "presence.received")]
    PresenceReceived(StanzaReceived),
    /// An `<iq/>` arrived through a tunnel; answer it with a raw stanza.
    #[serde(rename = "iq.received")]
    IqReceived(StanzaReceived),
    /// A tunnel was created (its handshake begins).
    #[serde(rename = "tunnel.opened")]
    TunnelOpened {
        /// `responder` (the peer sent `start`) or `initiator`.
        role: Role,
    },
    /// A tunnel finished its handshake and carries stanzas.
    #[serde(rename = "tunnel.established")]
    TunnelEstablished {
        /// The negotiated TLS version.
        tls_version: String,
        /// The negotiated cipher suite.
        cipher_suite: String,
        /// The peer's key.
        identity: Identity,
    },
    /// An established tunnel ended.
    #[serde(rename = "tunnel.closed")]
    TunnelClosed {
        /// Why, in words.
        reason: String,
        /// Why, as a stable code (`peer_close`, `idle`, `timeout`, ...).
        code: String,
    },
    /// A tunnel ended before it was established.
    #[serde(rename = "tunnel.failed")]
    TunnelFailed {
        /// Where it failed.
        stage: FailStage,
        /// Why, in words.
        reason: String,
        /// Why, as a stable code.
        code: String,
    },
    /// A key the bot had not accepted before: pinned on first use (`accepted`), or refused
    /// until someone approves it (`manual`) or verifies it (`verified_only`).
    #[serde(rename = "peer.identity_new")]
    PeerIdentityNew {
        /// The peer's bare JID.
        peer: String,
        /// SPKI SHA-256 of the key.
        spki_sha256: Option<String>,
        /// Whether the key got in: `true` when pinned on first use, `false` when the tunnel
        /// was refused and the key waits for a decision (`PUT .../keys/{spki}`).
        accepted: bool,
    },
    /// A peer presented a key other than the ones pinned for it; the tunnel was refused.
    #[serde(rename = "peer.identity_changed")]
    PeerIdentityChanged {
        /// The peer's bare JID.
        peer: String,
        /// SPKI SHA-256 of the key it presented.
        presented_spki_sha256: String,
        /// SPKI SHA-256 of the keys pinned for it.
        pinned_spki_sha256: Vec<String>,
        /// Why, in words.
        reason: String,
    },
    /// Someone decided about one of a peer's keys over the API (the audit log has it too).
    #[serde(rename = "peer.key_decision")]
    PeerKeyDecision {
        /// The peer's bare JID.
        peer: String,
        /// SPKI SHA-256 of the key.
        spki_sha256: String,
        /// What was decided.
        action: PinAction,
        /// Who: `admin` or `bot-token:<id>`.
        actor: String,
        /// The fingerprint the actor said they compared, if any.
        compared: Option<String>,
    },
    /// A tunnel's short authentication string exchange moved: started (by the peer or the
    /// bot), ready (the code to show the person, then confirm or reject over the API),
    /// confirmed, rejected or failed.
    #[serde(rename = "tunnel.sas")]
    TunnelSas(crate::store::SasStatus),
    /// A message the bot sent changed status.
    #[serde(rename = "delivery.status")]
    DeliveryStatus {
        /// The message; null for a webhook's synchronous reply.
        message_id: Option<String>,
        /// The recipient.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        /// Where it stands now.
        status: MessageStatus,
        /// Why, for failures.
        reason: Option<String>,
    },
}

/// One event as poll, SSE and webhooks hand it out: the envelope and the typed event. It is
/// the documented shape of [`crate::store::EventRecord`] (the rows are served as stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventEnvelope {
    /// Stable id (the webhook id).
    pub id: String,
    /// Per-bot sequence number.
    pub seq: u64,
    /// The bot's bare JID.
    pub bot: String,
    /// When it happened (RFC 3339).
    pub occurred_at: String,
    /// The tunnel it belongs to.
    pub tunnel_id: Option<TunnelId>,
    /// The peer's JID.
    pub peer: Option<String>,
    /// `type` and `data`.
    #[serde(flatten)]
    pub event: BotEvent,
}

impl BotEvent {
    /// The event's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            BotEvent::MessageReceived(_) => "message.received",
            BotEvent::PresenceReceived(_) => "presence.received",
            BotEvent::IqReceived(_) => "iq.received",
            BotEvent::TunnelOpened { .. } => "tunnel.opened",
            BotEvent::TunnelEstablished { .. } => "tunnel.established",
            BotEvent::TunnelClosed { .. } => "tunnel.closed",
            BotEvent::TunnelFailed { .. } => "tunnel.failed",
            BotEvent::PeerIdentityNew { .. } => "peer.identity_new",
            BotEvent::PeerIdentityChanged { .. } => "peer.identity_changed",
            BotEvent::PeerKeyDecision { .. } => "peer.key_decision",
            BotEvent::TunnelSas(_) => "tunnel.sas",
            BotEvent::DeliveryStatus { .. } => "delivery.status",
        }
    }

    /// A stanza that arrived through a tunnel.
    pub fn stanza(stanza: &Element, identity: Option<Identity>) -> BotEvent {
        Self::received(stanza, identity, true)
    }

    /// A stanza the peer sent in clear, outside any tunnel (spec §1.9 rule 8).
    pub fn in_clear(stanza: &Element) -> BotEvent {
        Self::received(stanza, None, false)
    }

    /// The local error answering the bot's inner IQ request that the peer had not answered
    /// when the tunnel closed (spec §1.9 rule 7).
    pub fn unanswered(answer: &Element) -> BotEvent {
        let mut event = Self::received(answer, None, false);
        if let BotEvent::IqReceived(received) = &mut event {
            received.local = true;
        }
        event
    }

    fn received(stanza: &Element, identity: Option<Identity>, encrypted: bool) -> BotEvent {
        let received = StanzaReceived {
            body: stanza
                .get_child("body", xtls::stanza::ns::CLIENT)
                .map(Element::text),
            stanza: String::from_utf8_lossy(&xtls::xml::to_bytes(stanza)).into_owned(),
            identity,
            encrypted,
            local: false,
        };
        match stanza.name() {
            "message" => BotEvent::MessageReceived(received),
            "presence" => BotEvent::PresenceReceived(received),
            _ => BotEvent::IqReceived(received),
        }
    }

    /// A tunnel that ended: `tunnel.failed` (at `stage`) when it never opened, else
    /// `tunnel.closed`.
    pub fn ended(reason: &CloseReason, established: bool, stage: FailStage) -> BotEvent {
        let (text, code) = (reason.to_string(), reason.code().to_owned());
        if established {
            BotEvent::TunnelClosed { reason: text, code }
        } else {
            BotEvent::TunnelFailed {
                stage,
                reason: text,
                code,
            }
        }
    }

    /// The row the store appends for this event.
    pub fn into_row(self, tunnel_id: Option<TunnelId>, peer: Option<String>) -> NewEvent {
        let kind = self.kind();
        let data = match serde_json::to_value(&self) {
            Ok(serde_json::Value::Object(mut envelope)) => {
                envelope.remove("data").unwrap_or(serde_json::Value::Null)
            }
            other => unreachable!("an adjacently tagged enum serializes to an object: {other:?}"),
        };
        NewEvent {
            kind,
            tunnel_id,
            peer,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_keep_the_documented_shape_and_read_back() {
        let message: Element =
            "<message xmlns='jabber:client' from='alice@example.net/a' type='chat'><body>hi</body></message>"
                .parse()
                .unwrap();
        let identity = Identity {
            spki_sha256: Some("AB:CD".into()),
            trust: TrustVerdict::Pinned,
        };
        let cases = [
            (
                BotEvent::stanza(&message, Some(identity.clone())),
                serde_json::json!({
                    "body": "hi",
                    "stanza": "<message xmlns='jabber:client' from='alice@example.net/a' type='chat'><body>hi</body></message>",
                    "identity": {"spki_sha256": "AB:CD", "trust": "pinned"},
                    "encrypted": true,
                }),
            ),
            (
                BotEvent::TunnelOpened {
                    role: Role::Responder,
                },
                serde_json::json!({"role": "responder"}),
            ),
            (
                BotEvent::ended(&CloseReason::Idle, false, FailStage::Handshake),
                serde_json::json!({"stage": "handshake", "reason": "idle", "code": "idle"}),
            ),
            (
                BotEvent::DeliveryStatus {
                    message_id: None,
                    to: None,
                    status: MessageStatus::Failed,
                    reason: Some("the tunnel is gone".into()),
                },
                serde_json::json!({"message_id": null, "status": "failed", "reason": "the tunnel is gone"}),
            ),
        ];
        for (event, data) in cases {
            let kind = event.kind();
            let row = event.clone().into_row(None, None);
            assert_eq!((row.kind, &row.data), (kind, &data));
            let back: BotEvent =
                serde_json::from_value(serde_json::json!({"type": kind, "data": data})).unwrap();
            assert_eq!(back, event);
        }
        let stranger = serde_json::json!({"type": "tunnel.opened", "data": {"role": "observer"}});
        assert!(serde_json::from_value::<BotEvent>(stranger).is_err());
    }

    #[tokio::test]
    async fn a_stored_event_is_served_in_the_documented_envelope() {
        let (store, dir) = crate::store::tests::temp_store().await;
        let bot = crate::store::tests::test_bot("weather", crate::config::Handler::Api);
        let identity = xtls::certs::BotIdentity::generate(&bot.jid).unwrap();
        store.insert_bot(&bot, &identity).await.unwrap();
        let event = BotEvent::PeerIdentityChanged {
            peer: "alice@example.net".into(),
            presented_spki_sha256: "AA:BB".into(),
            pinned_spki_sha256: vec!["CC:DD".into()],
            reason: "certificate_rejected: ...".into(),
        };
        let row = event
            .clone()
            .into_row(Some("t1".into()), Some("alice@example.net/a".into()));
        let stored = store
            .append_events(&bot.jid, 0, &[row], None)
            .await
            .unwrap();
        let served = serde_json::to_value(&stored[0]).unwrap();
        let envelope: EventEnvelope = serde_json::from_value(served).unwrap();
        assert_eq!(envelope.event, event);
        assert_eq!(
            (
                envelope.seq,
                envelope.tunnel_id.as_ref().map(TunnelId::as_str)
            ),
            (1, Some("t1"))
        );
        store.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }
}
