//! What a tunnel reports, turned into the bot's events, metrics and the session table:
//! established, stanzas (to the handler), acknowledgements, closes.

use std::sync::atomic::Ordering;

use minidom::Element;
use tokio::time::Instant;

use crate::config::{BotTrust, Handler};
use crate::delivery::event::{BotEvent, FailStage, Identity};
use crate::store::{FirstUse, PeerIdentityRecord, PeerTrust};
use xtls::certs::Fingerprint;
use xtls::stanza::{DefinedCondition, ErrorType, Iq, error_reply, name, ns};
use xtls::tunnel::{CloseReason, Event, State, TrustVerdict, TunnelKey, VerifyError, bare};

use super::driver::BotDriver;
use super::inbound::echo;

impl BotDriver {
    pub(super) async fn on_event(&mut self, key: &TunnelKey, event: Event) {
        let now = Instant::now().into_std();
        // The messages of pairing and of the short authentication string are the
        // component's, not the bot's; a tunnel admitted for pairing carries nothing else.
        if let Event::Stanza(stanza) = &event
            && let Some(live) = self.tunnels.get(key)
            && !live.refused
        {
            let pairing = live.record.peer_identity.trust == PeerTrust::Pairing;
            // Only IQs carry the exchanges: their envelope is read once, here.
            if let Ok(iq) = Iq::parse(stanza)
                && (self.on_pair_iq(key, &iq).await || (!pairing && self.on_sas_iq(key, &iq)))
            {
                return;
            }
            if pairing {
                self.refuse_unpaired(key, stanza);
                return;
            }
        }
        let Some(live) = self.tunnels.get_mut(key) else {
            return;
        };
        match event {
            Event::Established(est) => {
                let r = &mut live.record;
                r.state = State::Open;
                r.tls_version = Some(est.tls_version.clone());
                r.cipher_suite = Some(est.cipher_suite.clone());
                r.peer_identity = PeerIdentityRecord {
                    spki_sha256: est.peer.spki_sha256.as_ref().map(ToString::to_string),
                    trust: est.peer.trust.into(),
                };
                r.established_at = Some(crate::store::now());
                if live.in_handshake {
                    live.in_handshake = false;
                    self.shared.handshakes.fetch_sub(1, Ordering::Relaxed);
                }
                let metrics = &self.shared.metrics;
                metrics.opened(r.role.as_str(), true);
                metrics
                    .handshake_seconds
                    .observe(live.created.elapsed().as_secs_f64());
                let record = r.clone();
                tracing::info!(
                    bot = self.bot.jid,
                    peer = key.peer,
                    tunnel = %record.id,
                    trust = record.peer_identity.trust.as_str(),
                    "tunnel open"
                );
                // The trust decision the store makes (first use, a pin removed meanwhile)
                // comes before anything of the tunnel reaches the bot.
                let (id, peer) = (Some(record.id.clone()), Some(key.peer.clone()));
                let mut pinned_now = false;
                let pairing = est.peer.trust == TrustVerdict::Pairing;
                if let Some(spki) = est.peer.spki_sha256.as_ref().filter(|_| !pairing) {
                    let (store, bot, peer_bare) =
                        (&self.shared.store, &self.bot.jid, bare(&key.peer));
                    let cert = est.peer.cert_der.as_deref();
                    let stored = if est.peer.trust == TrustVerdict::TofuNew {
                        store.pin_first_use(bot, peer_bare, spki, cert).await
                    } else {
                        store
                            .pin_seen(bot, peer_bare, spki, cert)
                            .await
                            .map(|seen| {
                                if seen {
                                    FirstUse::AlreadyPinned
                                } else {
                                    FirstUse::Removed
                                }
                            })
                    };
                    let refusal = match stored {
                        Ok(FirstUse::Pinned) => {
                            pinned_now = true;
                            None
                        }
                        Ok(FirstUse::AlreadyPinned) => None,
                        // Another handshake of this peer pinned a different key first: this
                        // one is a changed key like any other, and the tunnel ends as such.
                        Ok(FirstUse::Lost(pinned)) => Some(VerifyError::PinMismatch {
                            jid: peer_bare.to_owned(),
                            presented: spki.clone(),
                            pinned,
                        }),
                        // The pin was removed while the handshake ran: not accepted any more.
                        Ok(FirstUse::Removed) => Some(VerifyError::NotPinned {
                            jid: peer_bare.to_owned(),
                            presented: spki.clone(),
                        }),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot record peer pin");
                            None
                        }
                    };
                    if let Some(refusal) = refusal {
                        if let Some(live) = self.tunnels.get_mut(key) {
                            live.refused = true;
                            live.tunnel
                                .close_because(now, CloseReason::CertificateRejected(refusal));
                        }
                        self.save(&record).await;
                        return;
                    }
                }
                // A tunnel admitted to pair is the bot's business only once it paired.
                if !pairing {
                    let established = BotEvent::TunnelEstablished {
                        tls_version: est.tls_version.clone(),
                        cipher_suite: est.cipher_suite.clone(),
                        identity: Identity::of(&est),
                    };
                    self.log(None, established.into_row(id.clone(), peer.clone()));
                }
                if pinned_now {
                    let new = BotEvent::PeerIdentityNew {
                        peer: bare(&key.peer).to_owned(),
                        spki_sha256: record.peer_identity.spki_sha256.clone(),
                        accepted: true,
                    };
                    self.log(None, new.into_row(id, peer));
                }
                self.save(&record).await;
                if !pairing {
                    self.send_waiting(key).await;
                }
            }
            // A tunnel whose key was refused after its handshake hands the bot nothing more.
            Event::Stanza(_) | Event::Unanswered(_) if live.refused => {}
            Event::Stanza(stanza) => match self.handler {
                Handler::Echo => {
                    if let Some(reply) = echo(&stanza)
                        && let Err(e) = live.tunnel.send(now, reply)
                    {
                        tracing::warn!(error = %e, tunnel = %live.record.id, "echo not sent");
                    }
                }
                Handler::Api => {
                    let identity = live.tunnel.established().map(Identity::of);
                    let row = BotEvent::stanza(&stanza, identity)
                        .into_row(Some(live.record.id.clone()), Some(key.peer.clone()));
                    self.log(Some(key), row);
                }
            },
            Event::Unanswered(answer) => {
                // The exchange's own requests fail with the tunnel, not the bot's.
                let ours = answer
                    .attr("id")
                    .is_some_and(|id| live.sas_ids.iter().any(|s| s == id));
                if self.handler == Handler::Api && !ours {
                    let row = BotEvent::unanswered(&answer)
                        .into_row(Some(live.record.id.clone()), Some(key.peer.clone()));
                    self.log(None, row);
                }
            }
            Event::Writable => self.send_waiting(key).await,
            Event::Acknowledged(mark) => self.on_acknowledged(key, mark).await,
            Event::Closed(reason) => {
                self.shared.metrics.closed(&reason);
                let r = &mut live.record;
                let stage = if r.state == State::Starting {
                    FailStage::Start
                } else {
                    FailStage::Handshake
                };
                let ended = BotEvent::ended(&reason, r.established_at.is_some(), stage)
                    .into_row(Some(r.id.clone()), Some(key.peer.clone()));
                if r.established_at.is_none() {
                    self.shared.metrics.opened(r.role.as_str(), false);
                }
                let refused = self.refused_key(key, &reason).await;
                if matches!(refused, Some(RefusedKey::Changed { .. })) {
                    self.shared.metrics.identity_changes.inc();
                }
                let Some(live) = self.tunnels.get_mut(key) else {
                    return;
                };
                let r = &mut live.record;
                let id = r.id.clone();
                r.state = State::Closed;
                r.closed_at = Some(crate::store::now());
                r.close_reason = Some(reason.to_string());
                tracing::info!(bot = self.bot.jid, peer = key.peer, tunnel = %r.id, reason = %reason, "tunnel closed");
                let peer = bare(&key.peer).to_owned();
                let about_key = match refused {
                    Some(RefusedKey::Changed { presented, pinned }) => {
                        Some(BotEvent::PeerIdentityChanged {
                            peer,
                            presented_spki_sha256: presented.to_string(),
                            pinned_spki_sha256: pinned.iter().map(ToString::to_string).collect(),
                            reason: reason.to_string(),
                        })
                    }
                    Some(RefusedKey::Unapproved(presented)) => Some(BotEvent::PeerIdentityNew {
                        peer,
                        spki_sha256: Some(presented.to_string()),
                        accepted: false,
                    }),
                    None => None,
                };
                if let Some(event) = about_key {
                    self.log(None, event.into_row(Some(id), Some(key.peer.clone())));
                }
                self.log(None, ended);
                self.on_closed_outbound(key, &reason).await;
            }
        }
    }
}

/// Why the trust mode refused a peer's key.
enum RefusedKey {
    /// Another key is accepted for the peer, and this one is not among its pins.
    Changed {
        /// The key presented.
        presented: Fingerprint,
        /// The keys accepted for the peer.
        pinned: Vec<Fingerprint>,
    },
    /// No decision yet: nothing is accepted for the peer under `manual`, or the key is pinned
    /// but not verified under `verified_only`.
    Unapproved(Fingerprint),
}

impl BotDriver {
    /// What a close says about the peer's key, if the trust mode refused it.
    async fn refused_key(&self, key: &TunnelKey, reason: &CloseReason) -> Option<RefusedKey> {
        if let Some((presented, pinned)) = reason.identity_change() {
            // Under verified_only a pinned but unverified key is refused too: that is a
            // key waiting for verification, not a changed one.
            let peer = bare(&key.peer);
            let verified_only =
                self.trust_for(peer).await.unwrap_or(self.trust) == BotTrust::VerifiedOnly;
            let waiting = verified_only
                && self
                    .shared
                    .store
                    .pins(&self.bot.jid, peer)
                    .await
                    .is_ok_and(|all| all.contains(presented));
            return Some(if waiting {
                RefusedKey::Unapproved(presented.clone())
            } else {
                RefusedKey::Changed {
                    presented: presented.clone(),
                    pinned: pinned.to_vec(),
                }
            });
        }
        reason.refused_key().cloned().map(RefusedKey::Unapproved)
    }
}

/// The `resource-constraint` (wait) error that replaces an IQ result of a tunnel whose events
/// could not be stored (the acknowledgement of a `data`, the `proceed` of a `start`); `None`
/// for anything else of that tunnel, which is dropped with it.
pub(super) fn refuse_ack(stanza: &Element) -> Option<Element> {
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

impl BotDriver {
    /// A stanza in a tunnel admitted for pairing alone: an IQ request is refused, anything
    /// else dropped; none of it reaches the bot.
    fn refuse_unpaired(&mut self, key: &TunnelKey, stanza: &Element) {
        let now = Instant::now().into_std();
        let Some(live) = self.tunnels.get_mut(key) else {
            return;
        };
        tracing::debug!(tunnel = %live.record.id, "stanza before pairing dropped");
        if stanza.name() == "iq" && matches!(stanza.attr("type"), Some("get" | "set")) {
            let refusal = error_reply(
                stanza,
                ErrorType::Auth,
                DefinedCondition::NotAuthorized,
                "pair with your code first",
            );
            if let Err(e) = live.tunnel.send(now, refusal) {
                tracing::warn!(error = %e, tunnel = %live.record.id, "refusal not sent");
            }
        }
        // No code waits any more (expired, revoked, spent elsewhere): nothing to pair with.
        if !self.shared.pairings.waiting(&self.bot.jid, bare(&key.peer)) {
            self.close_unpaired(key);
        }
    }
}
