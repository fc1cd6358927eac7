//! Inbound stanza routing: to the addressed bot's driver, or answered here when no bot owns it.
//!
//! The router never waits for a bot: a full bot queue is answered with `resource-constraint`
//! (type `wait`), so one slow bot never holds up the component stream.

use minidom::Element;

use crate::session::{Admission, BotTable, is_request};
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
    // A route probe from this domain (ours or another instance's): it says where the server
    // routes its destination, and is never a bot's business. With a shared store, the bot it
    // was sent to is this instance's to claim (one created elsewhere is not known here yet).
    if let Some(id) = probe {
        if let Some(bare) = to
            .node()
            .and_then(|node| xtls::certs::normalize_bare(&format!("{node}@{domain}")))
        {
            bots.shared().owners.routed_here(&bare);
        }
        if !bots.shared().routes.arrived(id) {
            tracing::debug!(
                id,
                "route probe of another instance, or a late one, dropped"
            );
        }
        return None;
    }
    let Some(node) = to.node() else {
        return component_answer(&stanza);
    };
    match bots.by_localpart(node.as_str()) {
        // With a shared store, a bot this instance does not run yet is claimed first.
        Some(bot) => match bots.shared().owners.admit(&bot.record.jid, stanza) {
            Admission::Deliver(stanza) => bots.deliver(&bot, stanza),
            Admission::Held => None,
            Admission::Refused(stanza) => {
                tracing::warn!(bot = bot.record.jid, "too much waits for bot claims");
                bots.busy(&bot, &stanza)
            }
        },
        // RFC 6120 §8.4 and spec §1.5 rule 2: unknown bots are not there.
        None => is_request(&stanza).then(|| {
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
