//! The operator's routes: bots, certificates, peers and the session table.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::openapi::{BotPath, PROBLEM_JSON, Problem, TunnelPath};
use super::{AdminState, ApiError, json_body, optional_json_body};
use crate::config::BotTrust;
use crate::config::Handler;
use crate::session::{BotHandle, NewBot, PolicyChange, Rotation};
use crate::store::{TunnelFilter, TunnelId, TunnelRecord};
use xtls::tunnel::PeerAuth;

/// The operator's routes (admin token only), with their OpenAPI entries.
pub(super) fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(list_bots, create_bot))
        .routes(routes!(get_bot, delete_bot, patch_bot))
        .routes(routes!(get_certificate))
        .routes(routes!(rotate_certificate))
        .routes(routes!(get_peers))
        .routes(routes!(get_route))
        .routes(routes!(list_tunnels, super::bot::open_tunnel))
        .routes(routes!(get_tunnel, delete_tunnel))
        .routes(routes!(list_instances))
}

/// The instances registered in the store (the processes serving it), most recently started
/// first; `this` marks the one that answers.
#[derive(Serialize, ToSchema)]
struct InstancesView {
    /// The id of the instance that answered.
    this: Option<String>,
    /// Every registered instance.
    instances: Vec<crate::store::InstanceRecord>,
}

/// The instances serving the store, with the age of their last heartbeat.
#[utoipa::path(get, path = "/instances", tag = "instances", responses(
    (status = 200, description = "The registered instances", body = InstancesView)))]
async fn list_instances(State(state): State<AdminState>) -> Result<Json<InstancesView>, ApiError> {
    let store = &state.bots.shared().store;
    Ok(Json(InstancesView {
        this: store.instance_id().map(str::to_owned),
        instances: store.instances().await?,
    }))
}

/// Whether the XMPP server routes a bot's stanzas to the instance that answers.
#[derive(Serialize, ToSchema)]
struct RouteView {
    /// The bot's bare JID.
    bot: String,
    /// Whether a probe sent to the bot's JID came back to this instance's connection.
    reaches_this_instance: bool,
    /// The id of the instance that answered.
    instance: Option<String>,
    /// Milliseconds until the probe came back, or how long it was waited for.
    waited_ms: u64,
}

/// Asks the XMPP server where it routes the bot's stanzas: a message from the component
/// domain to the bot's JID, waited for up to 3 s. With one connection per domain it always
/// comes back; under ejabberd's `domain_balancing` it comes back only to the instance whose
/// slot the bot hashes to.
#[utoipa::path(get, path = "/bots/{jid}/route", tag = "bots", params(BotPath), responses(
    (status = 200, description = "Where the bot's stanzas go", body = RouteView),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 503, description = "The component link is down, or too many probes wait",
        body = Problem, content_type = PROBLEM_JSON)))]
async fn get_route(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<Json<RouteView>, ApiError> {
    let bot = find_bot(&state, &jid)?;
    let shared = state.bots.shared();
    let route = shared
        .probe_route(&bot.record.jid)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(Json(RouteView {
        bot: bot.record.jid.clone(),
        reaches_this_instance: route.reaches_here,
        instance: shared.store.instance_id().map(str::to_owned),
        waited_ms: route.waited.as_millis() as u64,
    }))
}

/// A bot as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct BotView {
    /// The bot's bare JID.
    jid: String,
    /// Its localpart.
    localpart: String,
    /// What the bot does with what reaches it.
    handler: Handler,
    /// Whether peers must present a certificate.
    peer_auth: PeerAuth,
    /// How peer keys are trusted.
    trust: BotTrust,
    /// Whether messages sent in clear are refused.
    encrypted_only: bool,
    /// When it was created (RFC 3339).
    created_at: String,
    /// Its certificate's fingerprints, to compare out of band.
    fingerprints: FingerprintsView,
}

/// A certificate's fingerprints (docs/protocol.md §2.4): colon-separated upper-case hex, the
/// form people compare, and the certificate digests also as offers carry them.
#[derive(Serialize, ToSchema)]
struct FingerprintsView {
    /// SHA-256 of the SubjectPublicKeyInfo: what peers pin.
    spki_sha256: String,
    /// SHA-256 of the DER certificate.
    cert_sha256: String,
    /// SHA-1 of the DER certificate.
    cert_sha1: String,
    /// The certificate's digests as an XTLS offer names the key (XEP-0189 keyinfo
    /// `<name>`): lowercase hex without separators.
    offer: OfferNames,
}

/// A certificate's digests in the form of offer key names.
#[derive(Serialize, ToSchema)]
struct OfferNames {
    /// SHA-1 of the DER certificate (what offers carry).
    sha1: String,
    /// SHA-256 of the DER certificate.
    sha256: String,
}

impl FingerprintsView {
    fn of(f: &xtls::certs::Fingerprints) -> Self {
        FingerprintsView {
            spki_sha256: f.spki_sha256.to_string(),
            cert_sha256: f.cert_sha256.to_string(),
            cert_sha1: f.cert_sha1.to_string(),
            offer: OfferNames {
                sha1: f.cert_sha1.to_lower_hex(),
                sha256: f.cert_sha256.to_lower_hex(),
            },
        }
    }
}

fn bot_view(bot: &BotHandle) -> BotView {
    let r = &bot.record;
    BotView {
        jid: r.jid.clone(),
        localpart: r.localpart.clone(),
        handler: r.handler,
        peer_auth: r.peer_auth,
        trust: r.trust,
        encrypted_only: r.encrypted_only,
        created_at: r.created_at.clone(),
        fingerprints: FingerprintsView::of(&bot.fingerprints),
    }
}

/// The bot named in a path, by bare JID or localpart.
pub fn find_bot(state: &AdminState, jid: &str) -> Result<BotHandle, ApiError> {
    state
        .bots
        .by_jid(jid)
        .or_else(|| {
            (!jid.contains('@'))
                .then(|| state.bots.by_localpart(jid))
                .flatten()
        })
        .ok_or_else(|| ApiError::NotFound(format!("bot {jid}")))
}

/// Every bot.
#[utoipa::path(get, path = "/bots", tag = "bots",
    responses((status = 200, description = "The bots", body = [BotView])))]
async fn list_bots(State(state): State<AdminState>) -> Result<Json<Vec<BotView>>, ApiError> {
    // Sharing the store, other instances create and delete bots too: the store says which.
    if state.bots.shared().owners.is_shared() {
        state.bots.follow_store().await?;
    }
    Ok(Json(state.bots.list().iter().map(bot_view).collect()))
}

/// Body of `POST /v1/bots`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateBot {
    /// The new bot's localpart (RFC 7622).
    localpart: String,
    /// What the bot does with what reaches it; default `api`.
    #[serde(default = "default_handler")]
    handler: Handler,
    /// Whether peers must present a certificate; default `required`.
    #[serde(default)]
    peer_auth: PeerAuth,
    /// How peers' keys become trusted; default `tofu`.
    #[serde(default)]
    trust: BotTrust,
    /// Refuse messages sent in clear, telling the sender to use XTLS; default `false`
    /// (they reach the bot marked as not encrypted).
    #[serde(default)]
    encrypted_only: bool,
}

fn default_handler() -> Handler {
    Handler::Api
}

/// Creates a bot with a new key and certificate.
#[utoipa::path(post, path = "/bots", tag = "bots", request_body = CreateBot, responses(
    (status = 201, description = "Created", body = BotView),
    (status = 409, description = "A bot with that localpart exists", body = Problem, content_type = PROBLEM_JSON),
    (status = 422, description = "Not a valid body or localpart", body = Problem, content_type = PROBLEM_JSON)))]
async fn create_bot(
    State(state): State<AdminState>,
    body: Result<Json<CreateBot>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<BotView>), ApiError> {
    let body = json_body(body)?;
    let bot = state
        .bots
        .create(NewBot {
            localpart: body.localpart,
            handler: body.handler,
            peer_auth: body.peer_auth,
            trust: body.trust,
            encrypted_only: body.encrypted_only,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(bot_view(&bot))))
}

/// One bot.
#[utoipa::path(get, path = "/bots/{jid}", tag = "bots", params(BotPath), responses(
    (status = 200, description = "The bot", body = BotView),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON)))]
async fn get_bot(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<Json<BotView>, ApiError> {
    Ok(Json(bot_view(&find_bot(&state, &jid)?)))
}

/// Deletes a bot: its tunnels close, its key and history go.
#[utoipa::path(delete, path = "/bots/{jid}", tag = "bots", params(BotPath), responses(
    (status = 204, description = "Deleted"),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON)))]
async fn delete_bot(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<StatusCode, ApiError> {
    // The path names a bot the way every other route takes it: bare JID or localpart.
    let bot = find_bot(&state, &jid)?;
    if state.bots.delete(&bot.record.jid).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("bot {jid}")))
    }
}

/// Body of `PATCH /v1/bots/{jid}`: the settings a running bot can change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PatchBot {
    /// Refuse messages sent in clear (`policy-violation`), or deliver them marked
    /// `encrypted: false`.
    encrypted_only: Option<bool>,
    /// Which peer keys are accepted, from the next tunnel on.
    trust: Option<BotTrust>,
}

/// Changes a running bot's settings; open tunnels are not touched, new ones follow them.
#[utoipa::path(patch, path = "/bots/{jid}", tag = "bots", params(BotPath), request_body = PatchBot,
    responses(
    (status = 200, description = "The bot as it is now", body = BotView),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 422, description = "Not a valid body", body = Problem, content_type = PROBLEM_JSON)))]
async fn patch_bot(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
    body: Result<Json<PatchBot>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<BotView>, ApiError> {
    let bot = find_bot(&state, &jid)?;
    let body = json_body(body)?;
    if body.encrypted_only.is_none() && body.trust.is_none() {
        return Err(ApiError::Invalid(
            "name what to change: encrypted_only, trust or both".into(),
        ));
    }
    let change = PolicyChange {
        encrypted_only: body.encrypted_only,
        trust: body.trust,
    };
    // Admin-only route: the admin token is the actor.
    match state
        .bots
        .set_policy(&bot.record.jid, change, "admin")
        .await?
    {
        Some(bot) => Ok(Json(bot_view(&bot))),
        None => Err(ApiError::NotFound(format!("bot {jid}"))),
    }
}

/// One certificate of a bot (public part only).
#[derive(Serialize, ToSchema)]
struct CertView {
    /// The certificate, PEM.
    pem: String,
    /// SHA-256 of the SubjectPublicKeyInfo: what peers pin.
    spki_sha256: String,
    /// SHA-256 of the DER certificate.
    cert_sha256: String,
    /// SHA-1 of the DER certificate.
    cert_sha1: String,
    /// The certificate's digests as offers name the key.
    offer: OfferNames,
    /// Start of validity (RFC 3339).
    not_before: String,
    /// End of validity (RFC 3339).
    not_after: String,
}

impl CertView {
    fn of(pem: String, info: &xtls::certs::PeerCertInfo) -> Self {
        let f = FingerprintsView::of(&info.fingerprints);
        CertView {
            pem,
            spki_sha256: f.spki_sha256,
            cert_sha256: f.cert_sha256,
            cert_sha1: f.cert_sha1,
            offer: f.offer,
            not_before: info.not_before.clone(),
            not_after: info.not_after.clone(),
        }
    }
}

/// A bot's certificates: the active one (at the top level), the announced next one and those
/// it retired.
#[derive(Serialize, ToSchema)]
struct CertificateView {
    /// The bot's bare JID (the certificates' XmppAddr).
    jid: String,
    /// The active certificate: what new tunnels get.
    #[serde(flatten)]
    active: CertView,
    /// The next certificate while a rotation is under way.
    next: Option<NextCertView>,
    /// Certificates the bot used before, newest first.
    retired: Vec<RetiredCertView>,
}

/// The announced next certificate of a bot.
#[derive(Serialize, ToSchema)]
struct NextCertView {
    /// The certificate.
    #[serde(flatten)]
    certificate: CertView,
    /// Whether it has a key of its own (else the active key, so SPKI pins stay valid).
    new_key: bool,
    /// When it was announced (RFC 3339).
    announced_at: String,
    /// When it becomes the active one (RFC 3339).
    active_at: String,
}

/// A certificate a bot used before.
#[derive(Serialize, ToSchema)]
struct RetiredCertView {
    /// The certificate.
    #[serde(flatten)]
    certificate: CertView,
    /// When it stopped being the active one (RFC 3339).
    retired_at: String,
}

async fn certificate_view(
    state: &AdminState,
    bot: &BotHandle,
) -> Result<CertificateView, ApiError> {
    let id = &bot.identity;
    let retired = state
        .bots
        .shared()
        .store
        .retired_certificates(&bot.record.jid)
        .await?;
    let retired = retired
        .into_iter()
        .filter_map(|r| {
            // Stored by this program from a certificate it parsed: unreadable means damaged.
            let info = xtls::certs::PeerCertInfo::parse(&r.cert_der).ok()?;
            let pem = xtls::certs::pem_encode("CERTIFICATE", &r.cert_der);
            Some(RetiredCertView {
                certificate: CertView::of(pem, &info),
                retired_at: r.retired_at,
            })
        })
        .collect();
    let next = bot.next.as_ref().map(|n| NextCertView {
        certificate: CertView::of(n.identity.cert_pem(), &n.identity.info),
        new_key: n.identity.info.fingerprints.spki_sha256 != id.info.fingerprints.spki_sha256,
        announced_at: n.created_at.clone(),
        active_at: n.active_at.clone(),
    });
    Ok(CertificateView {
        jid: bot.record.jid.clone(),
        active: CertView::of(id.cert_pem(), &id.info),
        next,
        retired,
    })
}

/// A bot's certificates and fingerprints: active, next and retired.
#[utoipa::path(get, path = "/bots/{jid}/certificate", tag = "bots", params(BotPath), responses(
    (status = 200, description = "The certificates", body = CertificateView),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON)))]
async fn get_certificate(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<Json<CertificateView>, ApiError> {
    let bot = find_bot(&state, &jid)?;
    Ok(Json(certificate_view(&state, &bot).await?))
}

/// Body of `POST /v1/bots/{jid}/certificate/rotate`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// Seconds the next certificate is announced before it becomes active; 0: at once.
    /// Default: `certificates.overlap_secs` of the configuration (14 days).
    overlap_secs: Option<u64>,
    /// A new key pair too. Default false: the key stays, so peers' SPKI pins stay valid.
    #[serde(default)]
    new_key: bool,
}

/// Issues a bot's next certificate, announced (here and in disco#info) until it becomes the
/// active one when the overlap ends; open tunnels keep the certificate they have.
#[utoipa::path(post, path = "/bots/{jid}/certificate/rotate", tag = "bots", params(BotPath),
    request_body = RotateBody, responses(
    (status = 200, description = "The certificates as they are now", body = CertificateView),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 422, description = "Not a valid body", body = Problem, content_type = PROBLEM_JSON)))]
async fn rotate_certificate(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
    body: Result<Option<Json<RotateBody>>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<CertificateView>, ApiError> {
    let bot = find_bot(&state, &jid)?;
    let body = optional_json_body(body)?;
    let config = state.bots.shared().certificates.get();
    let overlap = body
        .overlap_secs
        .map_or(config.overlap(), std::time::Duration::from_secs);
    if overlap >= config.validity() {
        return Err(ApiError::Invalid(format!(
            "overlap_secs must be shorter than the certificates' validity ({} days)",
            config.validity_days
        )));
    }
    let rotation = Rotation {
        overlap,
        new_key: body.new_key,
    };
    // Admin-only route: the admin token is the actor.
    match state
        .bots
        .rotate(&bot.record.jid, rotation, "admin")
        .await?
    {
        Some(bot) => Ok(Json(certificate_view(&state, &bot).await?)),
        None => Err(ApiError::NotFound(format!("bot {jid}"))),
    }
}

/// A peer a bot has seen, with the keys it presented.
#[derive(Serialize, ToSchema)]
struct PeerView {
    /// The peer's bare JID.
    jid: String,
    /// Its keys, oldest first.
    pins: Vec<crate::store::PeerPin>,
}

/// The peers a bot knows and their pinned keys.
#[utoipa::path(get, path = "/bots/{jid}/peers", tag = "bots", params(BotPath), responses(
    (status = 200, description = "The peers", body = [PeerView]),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON)))]
async fn get_peers(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<Json<Vec<PeerView>>, ApiError> {
    let bot = find_bot(&state, &jid)?;
    let pins = state.bots.shared().store.list_pins(&bot.record.jid).await?;
    let mut peers: Vec<PeerView> = Vec::new();
    for pin in pins {
        match peers.last_mut() {
            Some(last) if last.jid == pin.peer => last.pins.push(pin),
            _ => peers.push(PeerView {
                jid: pin.peer.clone(),
                pins: vec![pin],
            }),
        }
    }
    Ok(Json(peers))
}

/// Query of `GET /v1/tunnels`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct TunnelQuery {
    /// Only this bot's tunnels (bare JID).
    bot: Option<String>,
    /// Only tunnels with this peer.
    peer: Option<String>,
    /// Only tunnels in this state: starting, handshaking, open, closing or closed.
    state: Option<String>,
    /// At most this many, newest first (1 to 10000; default 200).
    limit: Option<i64>,
}

/// The session table: live tunnels and history, newest first.
#[utoipa::path(get, path = "/tunnels", tag = "tunnels", params(TunnelQuery), responses(
    (status = 200, description = "The tunnels", body = [TunnelRecord]),
    (status = 422, description = "A query parameter is not valid", body = Problem, content_type = PROBLEM_JSON)))]
async fn list_tunnels(
    State(state): State<AdminState>,
    query: Result<Query<TunnelQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<TunnelRecord>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let wanted = match q.state.as_deref().map(str::parse::<xtls::tunnel::State>) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(_)) => {
            let names: Vec<&str> = xtls::tunnel::State::ALL
                .iter()
                .map(|s| s.as_str())
                .collect();
            return Err(ApiError::Invalid(format!(
                "state must be one of {}",
                names.join(", ")
            )));
        }
    };
    let limit = q.limit.unwrap_or(200).clamp(1, 10_000);
    let filter = TunnelFilter {
        bot: q.bot.map(|b| xtls::certs::normalize_bare(&b).unwrap_or(b)),
        peer: q.peer,
        state: wanted,
    };
    let live = state.bots.shared().table.snapshot();
    let mut all: Vec<TunnelRecord> = live.iter().filter(|t| filter.matches(t)).cloned().collect();
    let history = state
        .bots
        .shared()
        .store
        .list_tunnels(&filter, limit)
        .await?;
    all.extend(
        history
            .into_iter()
            .filter(|h| !live.iter().any(|l| l.id == h.id)),
    );
    all.sort_by(|a, b| b.opened_at.cmp(&a.opened_at).then_with(|| b.id.cmp(&a.id)));
    all.truncate(limit as usize);
    Ok(Json(all))
}

/// One tunnel, live or historical.
#[utoipa::path(get, path = "/tunnels/{id}", tag = "tunnels", params(TunnelPath), responses(
    (status = 200, description = "The tunnel", body = TunnelRecord),
    (status = 404, description = "No such tunnel", body = Problem, content_type = PROBLEM_JSON)))]
async fn get_tunnel(
    State(state): State<AdminState>,
    Path(id): Path<TunnelId>,
) -> Result<Json<TunnelRecord>, ApiError> {
    if let Some(t) = state.bots.shared().table.get(&id) {
        return Ok(Json(t));
    }
    state
        .bots
        .shared()
        .store
        .tunnel(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("tunnel {id}")))
}

/// A close that has begun.
#[derive(Serialize, ToSchema)]
struct Accepted {
    /// The tunnel id.
    id: TunnelId,
    /// `closing`.
    state: xtls::tunnel::State,
}

/// Closes a tunnel (close_notify, then `<close/>`).
#[utoipa::path(delete, path = "/tunnels/{id}", tag = "tunnels", params(TunnelPath), responses(
    (status = 202, description = "Closing", body = Accepted),
    (status = 404, description = "No such tunnel", body = Problem, content_type = PROBLEM_JSON),
    (status = 409, description = "Already closed", body = Problem, content_type = PROBLEM_JSON)))]
async fn delete_tunnel(
    State(state): State<AdminState>,
    Path(id): Path<TunnelId>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    if state.bots.close_tunnel(&id).await {
        return Ok((
            StatusCode::ACCEPTED,
            Json(Accepted {
                id,
                state: xtls::tunnel::State::Closing,
            }),
        ));
    }
    match state.bots.shared().store.tunnel(&id).await? {
        Some(_) => Err(ApiError::Conflict(format!("tunnel {id} is already closed"))),
        None => Err(ApiError::NotFound(format!("tunnel {id}"))),
    }
}
