//! The durable per-bot event log and its shared cursor (docs/bot-api.md).
//!
//! The bot's driver is the only writer: it appends a batch of events in one transaction before
//! acknowledging the `data` IQs that produced them. Readers (poll, SSE, webhook) share one
//! cursor per bot: the highest `seq` up to which every event is acknowledged or dead.

use serde_json::Value;

use crate::store::NewEvent;

/// Unix milliseconds now.
pub fn unix_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// The `identity` object of an event: the peer's key and the trust verdict.
pub fn identity_json(established: Option<&xtls::tunnel::Established>) -> Value {
    match established {
        Some(est) => serde_json::json!({
            "spki_sha256": est.peer.spki_sha256.as_ref().map(ToString::to_string),
            "trust": est.peer.trust.as_str(),
        }),
        None => Value::Null,
    }
}

/// The event for a stanza that arrived through a tunnel.
pub fn stanza_event(
    stanza: &minidom::Element,
    tunnel_id: &str,
    peer: &str,
    identity: Value,
) -> NewEvent {
    let kind = match stanza.name() {
        "message" => "message.received",
        "presence" => "presence.received",
        _ => "iq.received",
    };
    let xml = String::from_utf8_lossy(&xtls::xml::to_bytes(stanza)).into_owned();
    let mut data = serde_json::json!({ "stanza": xml, "identity": identity });
    if let Some(body) = stanza.get_child("body", xtls::stanza::ns::CLIENT) {
        data["body"] = Value::String(body.text());
    }
    NewEvent {
        kind,
        tunnel_id: Some(tunnel_id.to_owned()),
        peer: Some(peer.to_owned()),
        data,
    }
}

/// The event for a tunnel that ended: `tunnel.failed` when it never opened, else `tunnel.closed`.
pub fn close_event(
    reason: &xtls::tunnel::CloseReason,
    established: bool,
    stage: &str,
    tunnel_id: &str,
    peer: &str,
) -> NewEvent {
    let data = if established {
        serde_json::json!({ "reason": reason.to_string(), "code": reason.code() })
    } else {
        serde_json::json!({ "stage": stage, "reason": reason.to_string(), "code": reason.code() })
    };
    NewEvent {
        kind: if established {
            "tunnel.closed"
        } else {
            "tunnel.failed"
        },
        tunnel_id: Some(tunnel_id.to_owned()),
        peer: Some(peer.to_owned()),
        data,
    }
}
