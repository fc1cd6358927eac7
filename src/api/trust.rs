//! The keys a bot pins for its peers, managed over HTTP, and the audit log of those decisions.
//!
//! A bot token may manage its own bot's peers; the admin token any bot's. Every change is
//! written to the audit log with the caller (`admin` or `bot-token:<id>`) and, when they say,
//! the fingerprint they compared. A live tunnel's short authentication string is started,
//! confirmed (the peer's key becomes verified) or rejected here too (docs/verification.md).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::bot::scoped;
use super::openapi::{PROBLEM_JSON, Problem, TunnelPath};
use super::{AdminState, ApiError, Caller, json_body, optional_json_body};
use crate::config::BotTrust;
use crate::delivery::event::BotEvent;
use crate::session::{BotHandle, SasRefusal, SasRequest};
use crate::store::{AuditEntry, PeerPin, PinAction, PinChange, SasStatus, TunnelId};
use xtls::certs::{Fingerprint, normalize_bare};

/// The routes; each checks that the caller may act for the bot.
pub fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(get_peer, put_peer))
        .routes(routes!(get_keys))
        .routes(routes!(put_key, delete_key))
        .routes(routes!(get_audit))
        .routes(routes!(mint_pairing_code, revoke_pairing_code))
        .routes(routes!(start_sas))
        .routes(routes!(confirm_sas))
        .routes(routes!(reject_sas))
}

/// A bot and one of its peers.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
#[expect(
    dead_code,
    reason = "only the OpenAPI document reads it; handlers take the path as a tuple"
)]
struct PeerPath {
    /// The bot's bare JID, or its localpart.
    jid: String,
    /// The peer's bare JID.
    peer: String,
}

/// A bot, one of its peers, and one key.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
#[expect(
    dead_code,
    reason = "only the OpenAPI document reads it; handlers take the path as a tuple"
)]
struct KeyPath {
    /// The bot's bare JID, or its localpart.
    jid: String,
    /// The peer's bare JID.
    peer: String,
    /// The key's SPKI SHA-256: 64 hex digits, with or without colons.
    spki: String,
}

/// The peer's bare JID from a path, normalized; 404 for anything that is not one.
fn peer_jid(peer: &str) -> Result<String, ApiError> {
    normalize_bare(peer)
        .filter(|p| p.contains('@'))
        .ok_or_else(|| ApiError::NotFound(format!("peer {peer}")))
}

/// An SPKI SHA-256 fingerprint as people paste it: colon-separated or plain hex, any case.
fn spki(text: &str, what: &str) -> Result<Fingerprint, ApiError> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    let colon = if hex.len() == 64 && hex.is_ascii() {
        hex.as_bytes()
            .chunks(2)
            .map(|pair| std::str::from_utf8(pair).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(":")
    } else {
        String::new()
    };
    Fingerprint::parse(&colon).ok_or_else(|| {
        ApiError::Invalid(format!(
            "{what} must be an SPKI SHA-256 fingerprint: 64 hex digits, with or without colons"
        ))
    })
}

/// One peer of a bot: its own trust mode, the one in effect, and its keys.
#[derive(Serialize, ToSchema)]
struct PeerTrustView {
    /// The peer's bare JID.
    peer: String,
    /// The peer's own trust mode, when one is set; else the bot's applies.
    trust: Option<BotTrust>,
    /// The trust mode its next tunnel meets.
    effective_trust: BotTrust,
    /// Its pinned keys, oldest first.
    keys: Vec<PeerPin>,
}

async fn peer_view(
    state: &AdminState,
    bot: &BotHandle,
    peer: String,
) -> Result<PeerTrustView, ApiError> {
    let store = &state.bots.shared().store;
    let trust = store.peer_trust(&bot.record.jid, &peer).await?;
    let keys = store.peer_pins(&bot.record.jid, &peer).await?;
    Ok(PeerTrustView {
        effective_trust: trust.unwrap_or(bot.record.trust),
        trust,
        keys,
        peer,
    })
}

/// One peer of a bot: its trust mode and keys.
#[utoipa::path(get, path = "/bots/{jid}/peers/{peer}", tag = "trust", params(PeerPath),
    responses(
        (status = 200, description = "The peer (a peer never seen has no keys)", body = PeerTrustView),
        (status = 403, description = "A bot token of another bot", body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "No such bot, or not a bare JID", body = Problem, content_type = PROBLEM_JSON)))]
async fn get_peer(
    State(state): State<AdminState>,
    caller: Caller,
    Path((jid, peer)): Path<(String, String)>,
) -> Result<Json<PeerTrustView>, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let peer = peer_jid(&peer)?;
    Ok(Json(peer_view(&state, &bot, peer).await?))
}

/// A peer's own trust mode.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PeerTrustBody {
    /// `tofu`, `manual` or `verified_only` for this peer only; `null` or absent: the bot's
    /// applies again.
    trust: Option<BotTrust>,
}

/// Sets a peer's own trust mode, e.g. `verified_only` for an administrator's account on a
/// bot that trusts everyone else on first use; from its next tunnel on.
#[utoipa::path(put, path = "/bots/{jid}/peers/{peer}", tag = "trust", params(PeerPath),
    request_body = PeerTrustBody,
    responses(
        (status = 200, description = "The peer as it is now", body = PeerTrustView),
        (status = 403, description = "A bot token of another bot", body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "No such bot, or not a bare JID", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "Not a valid body", body = Problem, content_type = PROBLEM_JSON)))]
async fn put_peer(
    State(state): State<AdminState>,
    caller: Caller,
    Path((jid, peer)): Path<(String, String)>,
    body: Result<Json<PeerTrustBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<PeerTrustView>, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let peer = peer_jid(&peer)?;
    let body = json_body(body)?;
    let actor = caller.actor();
    let store = &state.bots.shared().store;
    store
        .set_peer_trust(&bot.record.jid, &peer, body.trust, &actor)
        .await?;
    let mode = body.trust.map_or("the bot's", BotTrust::as_str);
    tracing::info!(
        bot = bot.record.jid,
        peer,
        trust = mode,
        actor,
        "peer trust set"
    );
    Ok(Json(peer_view(&state, &bot, peer).await?))
}

/// The keys a bot holds for one peer (one per device), oldest first.
#[utoipa::path(get, path = "/bots/{jid}/peers/{peer}/keys", tag = "trust", params(PeerPath),
    responses(
        (status = 200, description = "The peer's pinned keys (empty when none)", body = [PeerPin]),
        (status = 403, description = "A bot token of another bot", body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "No such bot, or not a bare JID", body = Problem, content_type = PROBLEM_JSON)))]
async fn get_keys(
    State(state): State<AdminState>,
    caller: Caller,
    Path((jid, peer)): Path<(String, String)>,
) -> Result<Json<Vec<PeerPin>>, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let peer = peer_jid(&peer)?;
    let store = &state.bots.shared().store;
    Ok(Json(store.peer_pins(&bot.record.jid, &peer).await?))
}

/// A decision about a key.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct KeyDecision {
    /// Whether someone confirmed the key out of band. Default: true when `compared` is given;
    /// without either, an already pinned key stays as it is.
    verified: Option<bool>,
    /// The fingerprint the person compared (it must be this key's): recorded in the pin and
    /// the audit log.
    compared: Option<String>,
}

/// Pins a key for a peer (approving a new device or a replaced key), or marks a pinned key
/// verified or unverified. Trust on first use then lets this key in, next to any other pin.
#[utoipa::path(put, path = "/bots/{jid}/peers/{peer}/keys/{spki}", tag = "trust",
    params(KeyPath), request_body = KeyDecision,
    responses(
        (status = 200, description = "The pin, changed", body = PeerPin),
        (status = 201, description = "The pin, new", body = PeerPin),
        (status = 403, description = "A bot token of another bot", body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "No such bot, or not a bare JID", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "Not a fingerprint, or `compared` is not this key", body = Problem, content_type = PROBLEM_JSON)))]
async fn put_key(
    State(state): State<AdminState>,
    caller: Caller,
    Path((jid, peer, key)): Path<(String, String, String)>,
    body: Result<Json<KeyDecision>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<PeerPin>), ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let peer = peer_jid(&peer)?;
    let key = spki(&key, "the key in the path")?;
    let decision = json_body(body)?;
    let compared = decision
        .compared
        .as_deref()
        .map(|c| spki(c, "compared"))
        .transpose()?;
    if compared.as_ref().is_some_and(|c| *c != key) {
        return Err(ApiError::Invalid(
            "the fingerprint compared is not this key's: nothing was changed".into(),
        ));
    }
    if decision.verified.is_none() && compared.is_none() {
        // Approving a key already pinned changes nothing (a verified one stays verified).
        let store = &state.bots.shared().store;
        let pins = store.peer_pins(&bot.record.jid, &peer).await?;
        if let Some(pin) = pins.into_iter().find(|p| p.spki_sha256 == key.to_string()) {
            return Ok((StatusCode::OK, Json(pin)));
        }
    }
    let verified = decision.verified.unwrap_or(compared.is_some());
    if compared.is_some() && !verified {
        return Err(ApiError::Invalid(
            "compared goes with verified: true (or leave verified out)".into(),
        ));
    }
    let actor = caller.actor();
    let change = PinChange {
        bot: &bot.record.jid,
        peer: &peer,
        spki: &key,
        verified,
        compared: compared.as_ref().map(ToString::to_string),
        actor: &actor,
    };
    let (pin, created, action) = state.bots.shared().store.set_pin(&change).await?;
    tracing::info!(bot = bot.record.jid, peer, spki = %key, verified, actor, "peer key set");
    decided(&bot, &peer, &key, action, actor, pin.compared.clone()).await;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(pin)))
}

/// Removes a pin: a lost or replaced device's key no longer gets in. With no pin left, trust
/// on first use pins the peer's next key. Open tunnels are not touched.
#[utoipa::path(delete, path = "/bots/{jid}/peers/{peer}/keys/{spki}", tag = "trust",
    params(KeyPath),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, description = "A bot token of another bot", body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "No such bot or pin", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "Not a fingerprint", body = Problem, content_type = PROBLEM_JSON)))]
async fn delete_key(
    State(state): State<AdminState>,
    caller: Caller,
    Path((jid, peer, key)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let peer = peer_jid(&peer)?;
    let key = spki(&key, "the key in the path")?;
    let actor = caller.actor();
    let store = &state.bots.shared().store;
    if !store
        .remove_pin(&bot.record.jid, &peer, &key, &actor)
        .await?
    {
        return Err(ApiError::NotFound(format!("pin {key} of {peer}")));
    }
    tracing::info!(bot = bot.record.jid, peer, spki = %key, actor, "peer key removed");
    decided(&bot, &peer, &key, PinAction::Removed, actor, None).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Tells the bot's backend about a decision, as a `peer.key_decision` event in its log.
async fn decided(
    bot: &BotHandle,
    peer: &str,
    key: &Fingerprint,
    action: PinAction,
    actor: String,
    compared: Option<String>,
) {
    let event = BotEvent::PeerKeyDecision {
        peer: peer.to_owned(),
        spki_sha256: key.to_string(),
        action,
        actor,
        compared,
    };
    bot.record(event, Some(peer.to_owned())).await;
}

/// Query of `GET /v1/audit`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Only this bot's decisions; a bot token sees its own bot's only.
    bot: Option<String>,
    /// At most this many, newest first (1 to 1000; default 100).
    limit: Option<u32>,
}

/// A page of the audit log.
#[derive(Serialize, ToSchema)]
struct AuditPage {
    /// Decisions, newest first.
    entries: Vec<AuditEntry>,
}

/// Every decision about a pin: who, what, when, and what they said they compared.
#[utoipa::path(get, path = "/audit", tag = "trust", params(AuditQuery),
    responses(
        (status = 200, description = "The decisions, newest first", body = AuditPage),
        (status = 403, description = "A bot token asking for another bot", body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "A query parameter is not valid", body = Problem, content_type = PROBLEM_JSON)))]
async fn get_audit(
    State(state): State<AdminState>,
    caller: Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Invalid("limit must be between 1 and 1000".into()));
    }
    let bot = match (&caller, q.bot.as_deref()) {
        (Caller::Bot { jid, .. }, None) => Some(jid.clone()),
        (_, Some(named)) => Some(scoped(&state, &caller, named)?.record.jid.clone()),
        (Caller::Admin, None) => None,
    };
    let entries = state
        .bots
        .shared()
        .store
        .audit_log(bot.as_deref(), limit)
        .await?;
    Ok(Json(AuditPage { entries }))
}

/// Carries out a short authentication string request on a live tunnel the caller may act for.
async fn sas(
    state: &AdminState,
    caller: &Caller,
    id: &TunnelId,
    request: SasRequest,
) -> Result<Json<SasStatus>, ApiError> {
    let record = state
        .bots
        .shared()
        .table
        .get(id)
        .ok_or_else(|| ApiError::NotFound(format!("live tunnel {id}")))?;
    scoped(state, caller, &record.bot)?;
    match state.bots.sas(id, request).await {
        Ok(status) => Ok(Json(status)),
        Err(SasRefusal::NoTunnel) => Err(ApiError::NotFound(format!("live tunnel {id}"))),
        Err(e @ (SasRefusal::NotOpen | SasRefusal::Conflict(_))) => {
            Err(ApiError::Conflict(e.to_string()))
        }
        Err(e @ SasRefusal::WrongCode) => Err(ApiError::Invalid(e.to_string())),
        Err(SasRefusal::Store(e)) => Err(ApiError::Internal(e)),
    }
}

/// Starts a short authentication string exchange with the tunnel's peer, the bot committing;
/// the code appears in the tunnel (`sas`) and in a `tunnel.sas` event once both nonces are in.
#[utoipa::path(post, path = "/tunnels/{id}/sas", tag = "trust", params(TunnelPath), responses(
    (status = 200, description = "The exchange, started", body = SasStatus),
    (status = 403, description = "A bot token of another bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 404, description = "No such live tunnel", body = Problem, content_type = PROBLEM_JSON),
    (status = 409, description = "Not open, or an exchange is in progress", body = Problem, content_type = PROBLEM_JSON)))]
async fn start_sas(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<TunnelId>,
) -> Result<Json<SasStatus>, ApiError> {
    sas(&state, &caller, &id, SasRequest::Start).await
}

/// Body of `POST /v1/tunnels/{id}/sas/confirm`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SasDecision {
    /// The code the person compared (either form), checked against the tunnel's: a guard
    /// against confirming another tunnel's code.
    code: Option<String>,
}

/// The person compared the codes and they match: the peer's key becomes verified (audited,
/// `compared` `sas:<code>`, and a `peer.key_decision` event).
#[utoipa::path(post, path = "/tunnels/{id}/sas/confirm", tag = "trust", params(TunnelPath),
    request_body = SasDecision, responses(
    (status = 200, description = "Confirmed", body = SasStatus),
    (status = 403, description = "A bot token of another bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 404, description = "No such live tunnel", body = Problem, content_type = PROBLEM_JSON),
    (status = 409, description = "No code waits for a decision", body = Problem, content_type = PROBLEM_JSON),
    (status = 422, description = "Not the tunnel's code", body = Problem, content_type = PROBLEM_JSON)))]
async fn confirm_sas(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<TunnelId>,
    body: Result<Option<Json<SasDecision>>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<SasStatus>, ApiError> {
    let decision = optional_json_body(body)?;
    let actor = caller.actor();
    let request = SasRequest::Confirm {
        actor,
        code: decision.code,
    };
    sas(&state, &caller, &id, request).await
}

/// The person compared the codes and they differ: someone is in the middle; the tunnel is
/// closed and the key stays as it was.
#[utoipa::path(post, path = "/tunnels/{id}/sas/reject", tag = "trust", params(TunnelPath), responses(
    (status = 200, description = "Rejected; the tunnel is closing", body = SasStatus),
    (status = 403, description = "A bot token of another bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 404, description = "No such live tunnel", body = Problem, content_type = PROBLEM_JSON),
    (status = 409, description = "No code waits for a decision", body = Problem, content_type = PROBLEM_JSON)))]
async fn reject_sas(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<TunnelId>,
) -> Result<Json<SasStatus>, ApiError> {
    let actor = caller.actor();
    sas(&state, &caller, &id, SasRequest::Reject { actor }).await
}

/// Body of `POST /v1/bots/{jid}/peers/{peer}/pairing`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PairingRequest {
    /// Seconds the code stays valid: 60 to 86400, default 600.
    ttl_secs: Option<u64>,
}

/// A pairing code, shown once.
#[derive(Serialize, ToSchema)]
struct PairingCode {
    /// The code the person types into their client: `XXXXX-XXXXX`. Show it where the XMPP
    /// servers cannot read it (a page over HTTPS); it is never shown again.
    code: String,
    /// When it expires (RFC 3339).
    expires_at: String,
    /// Wrong attempts it allows before it is revoked.
    attempts: u8,
}

/// Mints a one-time pairing code for a peer (replacing one minted before): the peer types it
/// into their client, which runs SPAKE2 inside a tunnel (docs/verification.md); the right
/// code pins the key of that tunnel as verified, even one the bot's trust mode would refuse.
#[utoipa::path(post, path = "/bots/{jid}/peers/{peer}/pairing", tag = "trust", params(PeerPath),
    request_body = PairingRequest, responses(
    (status = 201, description = "The code, shown once", body = PairingCode),
    (status = 403, description = "A bot token of another bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 404, description = "No such bot, or not a bare JID", body = Problem, content_type = PROBLEM_JSON),
    (status = 422, description = "A TTL out of range", body = Problem, content_type = PROBLEM_JSON)))]
async fn mint_pairing_code(
    State(state): State<AdminState>,
    caller: Caller,
    Path((jid, peer)): Path<(String, String)>,
    body: Result<Option<Json<PairingRequest>>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<PairingCode>), ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let peer = peer_jid(&peer)?;
    let request = optional_json_body(body)?;
    let ttl = request.ttl_secs.unwrap_or(600);
    if !(60..=86400).contains(&ttl) {
        return Err(ApiError::Invalid(
            "ttl_secs must be between 60 and 86400".into(),
        ));
    }
    let ttl = std::time::Duration::from_secs(ttl);
    let actor = caller.actor();
    let minted = (state.bots.shared().pairings).mint(&bot.record.jid, &peer, ttl, &actor);
    // The code itself is never logged.
    tracing::info!(
        bot = bot.record.jid,
        peer,
        actor,
        ttl_secs = ttl.as_secs(),
        "pairing code minted"
    );
    let expires = time::OffsetDateTime::now_utc() + ttl;
    Ok((
        StatusCode::CREATED,
        Json(PairingCode {
            code: minted.code,
            expires_at: xtls::certs::rfc3339(expires),
            attempts: minted.attempts,
        }),
    ))
}

/// Revokes a peer's pairing code.
#[utoipa::path(delete, path = "/bots/{jid}/peers/{peer}/pairing", tag = "trust", params(PeerPath),
    responses(
    (status = 204, description = "Revoked"),
    (status = 403, description = "A bot token of another bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 404, description = "No code waits for that peer", body = Problem, content_type = PROBLEM_JSON)))]
async fn revoke_pairing_code(
    State(state): State<AdminState>,
    caller: Caller,
    Path((jid, peer)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let peer = peer_jid(&peer)?;
    if state.bots.shared().pairings.revoke(&bot.record.jid, &peer) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("pairing code for {peer}")))
    }
}
