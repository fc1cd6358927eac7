//! What a tunnel reports, turned into the bot's events, metrics and the session table:
//! established, stanzas (to the handler), acknowledgements, closes.

use std::sync::atomic::Ordering;

use minidom::Element;
use tokio::time::Instant;

use crate::config::Handler;
use crate::store::{NewEvent, PeerIdentityRecord};
use xtls::stanza::{DefinedCondition, ErrorType, error_reply, name, ns};
use xtls::tunnel::{Event, State, TunnelKey, bare};

use super::driver::BotDriver;
use super::inbound::echo;

impl BotDriver {
    pub(super) async fn on_event(&mut self, key: &TunnelKey, event: Event) {
        let now = Instant::now().into_std();
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
                    tunnel = record.id,
                    trust = ?record.peer_identity.trust,
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
                let stage = if r.state == State::Starting {
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
                    self.shared.metrics.opened(r.role.as_str(), false);
                }
                if changed.is_some() {
                    self.shared.metrics.identity_changes.inc();
                }
                let id = r.id.clone();
                r.state = State::Closed;
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
