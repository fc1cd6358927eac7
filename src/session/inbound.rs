//! What arrives for a bot from the server: stanzas routed to it, `start`s that open
//! tunnels, IQs of live tunnels, presence, and what no tunnel owns (disco, ping, errors).

use minidom::Element;
use tokio::time::Instant;

use crate::config::{BotTrust, Handler};
use crate::delivery::event::BotEvent;
use crate::store::{NextCertificate, StoreError};
use xmpp_parsers::data_forms::{DataForm, DataFormType, Field};
use xtls::certs::BotIdentity;
use xtls::stanza::xtls::XtlsElement;
use xtls::stanza::{DefinedCondition, ErrorType, Iq, IqType, error_reply, name, ns};
use xtls::tunnel::{
    CloseReason, PeerPolicy, StartDecision, State, Tunnel, TunnelKey, TunnelParams, bare,
    classify_request, decide_start,
};

use super::driver::{BotDriver, normalize, random_prefix};

impl BotDriver {
    pub(super) async fn handle_stanza(&mut self, el: Element) {
        match el.name() {
            "iq" => self.handle_iq(el).await,
            "presence" => self.handle_presence(el).await,
            // Spec §1.9 rule 8: a bot that accepts tunneled stanzas only says so, and how.
            // (An error in clear is not answered: errors never get errors.)
            "message" if self.bot.encrypted_only && el.attr("type") != Some("error") => {
                self.send(error_reply(
                    &el,
                    ErrorType::Modify,
                    DefinedCondition::PolicyViolation,
                    "this bot accepts messages only through an XTLS tunnel (urn:xmpp:tmp:xtls)",
                ))
                .await;
            }
            "message" if self.bot.encrypted_only => {}
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
            // An `api` bot gets it, marked as sent in clear.
            "message" => {
                let peer = el.attr("from").map(str::to_owned);
                self.log(None, BotEvent::in_clear(&el).into_row(None, peer));
            }
            _ => {}
        }
    }

    pub(super) async fn handle_presence(&mut self, el: Element) {
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

    pub(super) async fn handle_iq(&mut self, el: Element) {
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
                iq.result(Some(bot_disco_info(
                    &self.creds.identity,
                    self.next.as_deref(),
                )))
            }
            Some(p) if iq.type_ == IqType::Get && p.is("ping", ns::PING) => iq.result(None),
            Some(_) => iq.error(ErrorType::Cancel, DefinedCondition::ServiceUnavailable, ""),
        };
        self.send(reply).await;
    }

    pub(super) async fn handle_start(
        &mut self,
        now: std::time::Instant,
        key: TunnelKey,
        iq: &Iq,
        offer: Option<xtls::stanza::xtls::Offer>,
    ) {
        let live = self.tunnels.get(&key).map(|live| &live.tunnel);
        // Crossing starts (ours is still unanswered) are settled by the tie-break alone
        // (spec §1.14): `conflict` or `proceed`, never a rate refusal. Any other start counts
        // against the peer's rate first, so a flood cannot replace a live tunnel either.
        let crossing = live.is_some_and(|t| t.state() == State::Starting);
        if !crossing && !self.shared.start_rate.allow(bare(&key.peer), now) {
            self.shared.metrics.rejected("start_rate");
            self.send(iq.error(
                ErrorType::Wait,
                DefinedCondition::ResourceConstraint,
                "too many starts from this peer",
            ))
            .await;
            return;
        }
        match decide_start(live) {
            // A tunnel of this key that ended in this batch is still in the table: pump it
            // out first (its `closed`, its events, its row) so the new one starts clean.
            StartDecision::Accept if self.tunnels.contains_key(&key) => self.pump().await,
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

    /// The trust mode for a peer (bare JID): its own when one is set, else the bot's.
    pub(super) async fn trust_for(&self, peer: &str) -> Result<BotTrust, StoreError> {
        let own = self.shared.store.peer_trust(&self.bot.jid, peer).await?;
        Ok(own.unwrap_or(self.trust))
    }

    /// What a new tunnel to `key` is made of, with the pins the peer's trust mode accepts:
    /// all of them, or the verified ones under `verified_only`.
    pub(super) async fn tunnel_params(&self, key: &TunnelKey) -> Result<TunnelParams, StoreError> {
        let (store, peer) = (&self.shared.store, bare(&key.peer));
        let trust = self.trust_for(peer).await?;
        let (pins, pinned_cert_names) = store
            .accepted_pins(&self.bot.jid, peer, trust == BotTrust::VerifiedOnly)
            .await?;
        let mut config = self.shared.tunnel_config.clone();
        if self.handler != Handler::Api {
            // The built-in handlers answer in the step the stanza arrives in.
            config.ack_hold = std::time::Duration::ZERO;
        }
        Ok(TunnelParams {
            config,
            key: key.clone(),
            creds: self.creds.clone(),
            policy: PeerPolicy {
                peer_auth: self.peer_auth,
                trust: trust.engine_mode(),
                pins,
                pinned_cert_names,
                pairing: self.shared.pairings.waiting(&self.bot.jid, peer),
            },
            id_prefix: random_prefix(),
        })
    }
}

/// The echo handler: a message with a body comes back with the same body; an inner IQ
/// request gets `service-unavailable` (spec §1.9 rule 7).
pub(super) fn echo(stanza: &Element) -> Option<Element> {
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

/// disco#info of a bot (spec §1.4), with its certificate's fingerprints in an extended
/// information form (XEP-0128), so a client can show them before opening a tunnel.
pub fn bot_disco_info(identity: &BotIdentity, next: Option<&NextCertificate>) -> Element {
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
    let prints = &identity.info.fingerprints;
    let mut fields = vec![
        Field::text_single("spki-sha256", &prints.spki_sha256.to_string()),
        Field::text_single("cert-sha256", &prints.cert_sha256.to_string()),
        Field::text_single("not-after", &identity.info.not_after),
    ];
    // A rotation under way: the certificate peers will see from `next-active-at` on.
    if let Some(next) = next {
        let prints = &next.identity.info.fingerprints;
        fields.extend([
            Field::text_single("next-spki-sha256", &prints.spki_sha256.to_string()),
            Field::text_single("next-cert-sha256", &prints.cert_sha256.to_string()),
            Field::text_single("next-not-after", &next.identity.info.not_after),
            Field::text_single("next-active-at", &next.active_at),
        ]);
    }
    let form = DataForm::new(DataFormType::Result_, ns::XTLS, fields);
    q.append_child(form.into());
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
    fn disco_lists_the_xtls_feature_and_the_fingerprints() {
        let identity = BotIdentity::generate("echo@bots.example.org").unwrap();
        let q = bot_disco_info(&identity, None);
        assert!(q.children().any(|c| c.attr("var") == Some(ns::XTLS)));
        let form = DataForm::try_from(q.get_child("x", "jabber:x:data").unwrap().clone()).unwrap();
        assert_eq!(form.form_type(), Some(ns::XTLS));
        let value = |var: &str| {
            let field = form
                .fields
                .iter()
                .find(|f| f.var.as_deref() == Some(var))
                .unwrap();
            field.values[0].clone()
        };
        let prints = &identity.info.fingerprints;
        assert_eq!(value("spki-sha256"), prints.spki_sha256.to_string());
        assert_eq!(value("cert-sha256"), prints.cert_sha256.to_string());
        assert_eq!(value("not-after"), identity.info.not_after);
    }
}
