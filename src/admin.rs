//! The admin HTTP API: bots, certificates, peers and the session table.
//!
//! Everything under `/v1` requires `Authorization: Bearer <token>`; `/healthz` and `/readyz`
//! do not. Errors are `application/problem+json` (RFC 9457) and never carry internals.

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::apidoc::{BotPath, PROBLEM_JSON, Problem, TunnelPath};
use crate::component::LinkStatus;
use crate::config::{Handler, Secret};
use crate::session::{BotError, BotHandle, BotTable, NewBot};
use crate::store::{TunnelFilter, TunnelRecord};
use xtls::tunnel::{PeerAuth, TrustMode};

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The running bots.
    pub bots: BotTable,
    /// The bearer token.
    pub token: Secret,
    /// The component link's status.
    pub link: watch::Receiver<LinkStatus>,
    /// Body size and time limits.
    pub limits: std::sync::Arc<crate::http::HttpLimits>,
    /// The `Host` names answered.
    pub allowed_hosts: std::sync::Arc<crate::http::AllowedHosts>,
    /// Browser origins allowed by CORS (none by default).
    pub cors_origins: Vec<String>,
}

/// An API error, rendered as problem+json.
#[derive(Debug)]
pub enum ApiError {
    /// 401.
    Unauthorized,
    /// 403: a valid token without the scope.
    Forbidden,
    /// 429, with the seconds to wait.
    TooManyRequests(u64, String),
    /// 404, naming what.
    NotFound(String),
    /// 409.
    Conflict(String),
    /// 422.
    Invalid(String),
    /// 413, with the limit in bytes.
    PayloadTooLarge(usize),
    /// 408: the body did not arrive in time.
    RequestTimeout,
    /// 421: a `Host` this API does not answer to.
    MisdirectedHost,
    /// 500; the cause is logged, not returned.
    Internal(String),
}

impl ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::TooManyRequests(..) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::MisdirectedHost => StatusCode::MISDIRECTED_REQUEST,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let detail = match &self {
            ApiError::Unauthorized => "a valid bearer token is required".to_owned(),
            ApiError::Forbidden => "this token does not reach that resource".to_owned(),
            ApiError::TooManyRequests(_, what) => what.clone(),
            ApiError::NotFound(what) => format!("{what} not found"),
            ApiError::Conflict(what) | ApiError::Invalid(what) => what.clone(),
            ApiError::PayloadTooLarge(limit) => {
                format!("the request body is larger than {limit} bytes (admin.max_body_bytes)")
            }
            ApiError::RequestTimeout => {
                "the request body did not arrive in time (admin.body_timeout_secs)".to_owned()
            }
            ApiError::MisdirectedHost => {
                "this Host is not one the admin API answers to (admin.allowed_hosts)".to_owned()
            }
            ApiError::Internal(cause) => {
                tracing::error!(cause, "admin API internal error");
                "internal error; see the component log".to_owned()
            }
        };
        let mut resp = problem(status, &detail);
        if let ApiError::TooManyRequests(secs, _) = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

fn problem(status: StatusCode, detail: &str) -> Response {
    let body = Problem {
        kind: "about:blank".into(),
        title: status.canonical_reason().unwrap_or("error").into(),
        status: status.as_u16(),
        detail: detail.into(),
    };
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<BotError> for ApiError {
    fn from(e: BotError) -> Self {
        match e {
            BotError::InvalidLocalpart(_) => ApiError::Invalid(e.to_string()),
            BotError::Duplicate(_) => ApiError::Conflict(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// The router; tests call it without a port.
pub fn app(state: AdminState) -> Router {
    let (router, doc) = routes(state.clone()).split_for_parts();
    let document = crate::apidoc::finish(doc)
        .to_json()
        .expect("the OpenAPI document serializes");
    let router = router
        .layer(axum::Extension(OpenApiJson(std::sync::Arc::new(document))))
        .with_state(state.clone());
    let router = match cors(&state.cors_origins) {
        Some(layer) => router.layer(layer),
        None => router,
    };
    router.layer(middleware::from_fn_with_state(
        state.allowed_hosts.clone(),
        crate::http::check_host,
    ))
}

/// CORS for the configured origins; `None` (no CORS headers at all) when there are none.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, Method};
    if origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([header::RETRY_AFTER])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// A JSON body, or the problem that says why it is not one.
pub fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    body.map(|Json(value)| value)
        .map_err(|e| ApiError::Invalid(e.body_text()))
}

/// The serialized OpenAPI document, made once at start-up.
#[derive(Clone)]
struct OpenApiJson(std::sync::Arc<String>);

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "health", responses(
    (status = 200, description = "The OpenAPI 3.1 document of this API", body = Object)))]
async fn openapi_json(axum::Extension(doc): axum::Extension<OpenApiJson>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.0.as_str().to_owned(),
    )
        .into_response()
}

/// The admin API's routes with their OpenAPI document.
pub fn routes(state: AdminState) -> OpenApiRouter<AdminState> {
    let admin_only = OpenApiRouter::new()
        .routes(routes!(list_bots, create_bot))
        .routes(routes!(get_bot, delete_bot))
        .routes(routes!(get_certificate))
        .routes(routes!(get_peers))
        .routes(routes!(list_tunnels, crate::botapi::open_tunnel))
        .routes(routes!(get_tunnel, delete_tunnel))
        .merge(crate::botapi::admin_routes())
        .route_layer(middleware::from_fn(require_admin));
    let v1 = OpenApiRouter::new()
        .routes(routes!(openapi_json))
        .merge(admin_only)
        .merge(crate::botapi::routes())
        .fallback(|| async { ApiError::NotFound("route".into()) })
        // read_body enforces admin.max_body_bytes; the extractors' own 2 MB cap would
        // contradict a larger setting.
        .layer(axum::extract::DefaultBodyLimit::disable())
        // Only a caller with a valid token gets its body read.
        .layer(middleware::from_fn_with_state(
            state.limits.clone(),
            crate::http::read_body,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    let metrics = OpenApiRouter::new()
        .routes(routes!(metrics_route))
        .route_layer(middleware::from_fn(require_admin))
        .route_layer(middleware::from_fn_with_state(state, require_token));
    OpenApiRouter::with_openapi(<crate::apidoc::ApiDoc as utoipa::OpenApi>::openapi())
        .merge(metrics)
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .nest("/v1", v1)
}

/// The answer of `/healthz`.
#[derive(Serialize, ToSchema)]
struct Health {
    /// Always `ok`: the process answers.
    status: String,
}

/// Liveness: the process answers HTTP.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is alive", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Asks `GET /healthz` of an instance listening on `addr` (loopback when it listens on all
/// addresses); `Err` says why it is not healthy.
pub async fn probe_health(
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let answer = crate::webhook::client()
        .get(format!("http://{addr}/healthz"))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("no answer from {addr}: {e}"))?;
    match answer.status() {
        StatusCode::OK => Ok(()),
        status => Err(format!("/healthz answered {status}")),
    }
}

/// The metrics router for a listener of its own (no token: bind it where only the scraper
/// reaches it).
pub fn metrics_app(bots: BotTable) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let bots = bots.clone();
            async move { metrics_response(&bots).await }
        }),
    )
}

/// Prometheus metrics (OpenMetrics text), with the admin token.
#[utoipa::path(get, path = "/metrics", tag = "health", responses(
    (status = 200, description = "Every metric", body = String,
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8")))]
async fn metrics_route(State(state): State<AdminState>) -> Response {
    metrics_response(&state.bots).await
}

/// Reads the state gauges and renders every metric.
async fn metrics_response(bots: &BotTable) -> Response {
    let shared = bots.shared();
    let m = &shared.metrics;
    let list = bots.list();
    m.bots.set(list.len() as i64);
    m.certificate_expiry.clear();
    for bot in &list {
        if let Ok(t) = time::OffsetDateTime::parse(
            &bot.identity.info.not_after,
            &time::format_description::well_known::Rfc3339,
        ) {
            m.certificate_expiry
                .get_or_create(&crate::metrics::Bot {
                    bot: bot.record.jid.clone(),
                })
                .set(t.unix_timestamp());
        }
    }
    m.tunnels.clear();
    for state in STATES {
        m.tunnels
            .get_or_create(&crate::metrics::StateLabel {
                state: (*state).into(),
            })
            .set(0);
    }
    for t in shared.table.snapshot() {
        m.tunnels
            .get_or_create(&crate::metrics::StateLabel { state: t.state })
            .inc();
    }
    match shared.store.pending_total().await {
        Ok(n) => {
            m.pending_events.set(n as i64);
        }
        Err(e) => tracing::warn!(error = %e, "cannot count pending events for /metrics"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who is calling: the operator (admin token) or one bot (a token of that bot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin token: everything.
    Admin,
    /// A bot token: that bot's events, messages, webhook and deliveries.
    Bot(String),
}

impl Caller {
    /// Allows the admin and the bot itself; 403 for any other bot.
    pub fn may_act_for(&self, bot_jid: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Bot(jid) if jid == bot_jid => Ok(()),
            Caller::Bot(_) => Err(ApiError::Forbidden),
        }
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(ApiError::Unauthorized)
    }
}

async fn require_token(
    State(state): State<AdminState>,
    mut request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let caller = match presented {
        Some(token) if same(token.as_bytes(), state.token.expose().as_bytes()) => Caller::Admin,
        Some(token) if token.starts_with(crate::botapi::TOKEN_PREFIX) => {
            match state.bots.shared().store.token_bot(&token).await {
                Ok(Some(jid)) => Caller::Bot(jid),
                Ok(None) => return ApiError::Unauthorized.into_response(),
                Err(e) => return ApiError::from(e).into_response(),
            }
        }
        _ => return ApiError::Unauthorized.into_response(),
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

async fn require_admin(caller: Caller, request: Request, next: Next) -> Response {
    match caller {
        Caller::Admin => next.run(request).await,
        Caller::Bot(_) => ApiError::Forbidden.into_response(),
    }
}

/// The answer of `/readyz`.
#[derive(Serialize, ToSchema)]
struct Readiness {
    /// Both checks pass.
    ready: bool,
    /// The component stream to the XMPP server.
    component: Check,
    /// The store accepts writes.
    store: Check,
}

/// One readiness check.
#[derive(Serialize, ToSchema)]
struct Check {
    /// Whether it passes.
    ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<String>,
}

/// Readiness: the component stream is up and the store accepts writes.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "Ready", body = Readiness),
    (status = 503, description = "Not ready, with the reason", body = Readiness)))]
async fn readyz(State(state): State<AdminState>) -> Response {
    let link = state.link.borrow().clone();
    let store = state.bots.shared().store.check_writable().await;
    let component = match &link {
        LinkStatus::Up => Check {
            ok: true,
            problem: None,
        },
        LinkStatus::Connecting(problem) => Check {
            ok: false,
            problem: problem.clone(),
        },
    };
    let store_check = Check {
        ok: store.is_ok(),
        problem: store.as_ref().err().map(ToString::to_string),
    };
    let ready = link == LinkStatus::Up && store.is_ok();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        ready,
        component,
        store: store_check,
    };
    (status, Json(body)).into_response()
}

/// A bot as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct BotView {
    /// The bot's bare JID.
    jid: String,
    /// Its localpart.
    localpart: String,
    /// `echo` or `api`.
    handler: String,
    /// `required` or `optional`.
    peer_auth: String,
    /// `tofu` or `pinned`.
    trust: String,
    /// When it was created (RFC 3339).
    created_at: String,
    /// Its certificate's fingerprints, to compare out of band.
    fingerprints: FingerprintsView,
}

/// A certificate's fingerprints, colon-separated upper-case hex.
#[derive(Serialize, ToSchema)]
struct FingerprintsView {
    /// SHA-256 of the SubjectPublicKeyInfo: what peers pin.
    spki_sha256: String,
    /// SHA-256 of the DER certificate.
    cert_sha256: String,
    /// SHA-1 of the DER certificate.
    cert_sha1: String,
}

impl FingerprintsView {
    fn of(f: &xtls::certs::Fingerprints) -> Self {
        FingerprintsView {
            spki_sha256: f.spki_sha256.to_string(),
            cert_sha256: f.cert_sha256.to_string(),
            cert_sha1: f.cert_sha1.to_string(),
        }
    }
}

fn bot_view(bot: &BotHandle) -> BotView {
    let r = &bot.record;
    BotView {
        jid: r.jid.clone(),
        localpart: r.localpart.clone(),
        handler: r.handler.clone(),
        peer_auth: r.peer_auth.clone(),
        trust: r.trust.clone(),
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
async fn list_bots(State(state): State<AdminState>) -> Json<Vec<BotView>> {
    Json(state.bots.list().iter().map(bot_view).collect())
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
    trust: TrustMode,
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
    let body = crate::admin::json_body(body)?;
    let bot = state
        .bots
        .create(NewBot {
            localpart: body.localpart,
            handler: body.handler,
            peer_auth: body.peer_auth,
            trust: body.trust,
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
    if state.bots.delete(&jid).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("bot {jid}")))
    }
}

/// A bot's certificate (public part only).
#[derive(Serialize, ToSchema)]
struct CertificateView {
    /// The bot's bare JID (the certificate's XmppAddr).
    jid: String,
    /// The certificate, PEM.
    pem: String,
    /// SHA-256 of the SubjectPublicKeyInfo.
    spki_sha256: String,
    /// SHA-256 of the DER certificate.
    cert_sha256: String,
    /// SHA-1 of the DER certificate.
    cert_sha1: String,
    /// Start of validity (RFC 3339).
    not_before: String,
    /// End of validity (RFC 3339).
    not_after: String,
}

/// A bot's certificate and fingerprints.
#[utoipa::path(get, path = "/bots/{jid}/certificate", tag = "bots", params(BotPath), responses(
    (status = 200, description = "The certificate", body = CertificateView),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON)))]
async fn get_certificate(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<Json<CertificateView>, ApiError> {
    let bot = find_bot(&state, &jid)?;
    let id = &bot.identity;
    let f = FingerprintsView::of(&id.info.fingerprints);
    Ok(Json(CertificateView {
        jid: bot.record.jid.clone(),
        pem: id.cert_pem(),
        spki_sha256: f.spki_sha256,
        cert_sha256: f.cert_sha256,
        cert_sha1: f.cert_sha1,
        not_before: id.info.not_before.clone(),
        not_after: id.info.not_after.clone(),
    }))
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

const STATES: &[&str] = &["starting", "handshaking", "open", "closing", "closed"];

/// The session table: live tunnels and history, newest first.
#[utoipa::path(get, path = "/tunnels", tag = "tunnels", params(TunnelQuery), responses(
    (status = 200, description = "The tunnels", body = [TunnelRecord]),
    (status = 422, description = "A query parameter is not valid", body = Problem, content_type = PROBLEM_JSON)))]
async fn list_tunnels(
    State(state): State<AdminState>,
    query: Result<Query<TunnelQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<TunnelRecord>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    if let Some(s) = &q.state
        && !STATES.contains(&s.as_str())
    {
        return Err(ApiError::Invalid(format!(
            "state must be one of {}",
            STATES.join(", ")
        )));
    }
    let limit = q.limit.unwrap_or(200).clamp(1, 10_000);
    let filter = TunnelFilter {
        bot: q.bot.map(|b| xtls::certs::normalize_bare(&b).unwrap_or(b)),
        peer: q.peer,
        state: q.state,
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
    Path(id): Path<String>,
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
    id: String,
    /// `closing`.
    state: String,
}

/// Closes a tunnel (close_notify, then `<close/>`).
#[utoipa::path(delete, path = "/tunnels/{id}", tag = "tunnels", params(TunnelPath), responses(
    (status = 202, description = "Closing", body = Accepted),
    (status = 404, description = "No such tunnel", body = Problem, content_type = PROBLEM_JSON),
    (status = 409, description = "Already closed", body = Problem, content_type = PROBLEM_JSON)))]
async fn delete_tunnel(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    if state.bots.close_tunnel(&id).await {
        return Ok((
            StatusCode::ACCEPTED,
            Json(Accepted {
                id,
                state: "closing".into(),
            }),
        ));
    }
    match state.bots.shared().store.tunnel(&id).await? {
        Some(_) => Err(ApiError::Conflict(format!("tunnel {id} is already closed"))),
        None => Err(ApiError::NotFound(format!("tunnel {id}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
