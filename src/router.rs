//! Inbound stanza routing: to the addressed bot's driver, or answered here when no bot owns it.
//!
//! The router never waits for a bot: a full bot queue is answered with `resource-constraint`
//! (type `wait`), so one slow bot never holds up the component stream.

use minidom::Element;
use tokio::sync::mpsc;

use crate::session::BotTable;
use xtls::stanza::{DefinedCondition, ErrorType, Iq, error_reply, name, ns};

/// Routes one inbound stanza; returns the reply to send when the router answers it itself.
pub fn route(stanza: Element, bots: &BotTable) -> Option<Element> {
    let to = stanza.attr("to").and_then(|t| jid::Jid::new(t).ok());
    let Some(to) = to else {
        tracing::debug!("stanza without a valid to dropped");
        return None;
    };
    let domain = &bots.shared().domain;
    if to.domain().as_str() != domain.as_str() {
        tracing::debug!(to = %to, "stanza for another domain dropped");
        return None;
    }
    let probe = crate::link::slot::route_probe_id(&stanza, domain);
    // With a shared store, a stanza that reaches this instance for a bot makes the bot this
    // instance's: a known bot's, or a probe's (only instances send those; a bot created on
    // another one is not known here yet).
    if bots.shared().owners.is_shared()
        && let Some(node) = to.node()
        && (probe.is_some() || bots.by_localpart(node.as_str()).is_some())
        && let Some(bare) = xtls::certs::normalize_bare(&format!("{node}@{domain}"))
    {
        bots.shared().owners.routed_here(&bare);
    }
    // A route probe from this domain (ours or another instance's): it says where the server
    // routes its destination, and is never a bot's business.
    if let Some(id) = probe {
        if !bots.shared().routes.arrived(id) {
            tracing::debug!(
                id,
                "route probe of another instance, or a late one, dropped"
            );
        }
        return None;
    }
    let is_request = match stanza.name() {
        "iq" => matches!(stanza.attr("type"), Some("get" | "set")),
        "message" => stanza.attr("type") != Some("error"),
        _ => false,
    };
    let Some(node) = to.node() else {
        return component_answer(&stanza);
    };
    match bots.by_localpart(node.as_str()) {
        Some(bot) => match bot.try_deliver(stanza) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(crate::session::BotCommand::Stanza(stanza))) => {
                let stanza = *stanza;
                tracing::warn!(bot = bot.record.jid, "bot queue full");
                bots.shared().metrics.rejected("bot_queue");
                bot.tunnel_refused(&stanza);
                is_request.then(|| {
                    error_reply(
                        &stanza,
                        ErrorType::Wait,
                        DefinedCondition::ResourceConstraint,
                        "bot busy",
                    )
                })
            }
            Err(e) => {
                let stanza = match e.into_inner() {
                    crate::session::BotCommand::Stanza(s) => *s,
                    _ => return None,
                };
                is_request.then(|| {
                    error_reply(
                        &stanza,
                        ErrorType::Cancel,
                        DefinedCondition::ServiceUnavailable,
                        "",
                    )
                })
            }
        },
        // RFC 6120 §8.4 and spec §1.5 rule 2: unknown bots are not there.
        None => is_request.then(|| {
            error_reply(
                &stanza,
                ErrorType::Cancel,
                DefinedCondition::ServiceUnavailable,
                "",
            )
        }),
    }
}

/// Answers stanzas addressed to the component domain itself.
fn component_answer(stanza: &Element) -> Option<Element> {
    let iq = Iq::parse(stanza).ok()?;
    if !iq.type_.is_request() {
        return None;
    }
    let payload = iq.single_payload();
    Some(match payload {
        Some(p) if p.is("query", ns::DISCO_INFO) && iq.type_ == xtls::stanza::IqType::Get => {
            let mut q = Element::bare("query", ns::DISCO_INFO);
            q.append_child(
                Element::builder("identity", ns::DISCO_INFO)
                    .attr(name("category"), "component")
                    .attr(name("type"), "generic")
                    .attr(name("name"), "xtls-component")
                    .build(),
            );
            for var in [ns::DISCO_INFO, ns::PING] {
                q.append_child(
                    Element::builder("feature", ns::DISCO_INFO)
                        .attr(name("var"), var)
                        .build(),
                );
            }
            iq.result(Some(q))
        }
        Some(p) if p.is("ping", ns::PING) => iq.result(None),
        None => iq.error(ErrorType::Modify, DefinedCondition::BadRequest, ""),
        Some(_) => iq.error(ErrorType::Cancel, DefinedCondition::ServiceUnavailable, ""),
    })
}
