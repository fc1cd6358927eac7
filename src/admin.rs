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
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::component::LinkStatus;
use crate::config::{Handler, Secret};
use crate::session::{BotError, BotHandle, BotTable, NewBot};
use crate::store::{TunnelFilter, TunnelRecord};
use crate::tunnel::{PeerAuth, TrustMode};

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The running bots.
    pub bots: BotTable,
    /// The bearer token.
    pub token: Secret,
    /// The component link's status.
    pub link: watch::Receiver<LinkStatus>,
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
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
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
    let admin_only = Router::new()
        .route("/bots", get(list_bots).post(create_bot))
        .route("/bots/{jid}", get(get_bot).delete(delete_bot))
        .route("/bots/{jid}/certificate", get(get_certificate))
        .route("/bots/{jid}/peers", get(get_peers))
        .route(
            "/tunnels",
            get(list_tunnels).post(crate::botapi::open_tunnel),
        )
        .route("/tunnels/{id}", get(get_tunnel).delete(delete_tunnel))
        .merge(crate::botapi::admin_routes())
        .route_layer(middleware::from_fn(require_admin));
    let v1 = Router::new()
        .merge(admin_only)
        .merge(crate::botapi::routes())
        .fallback(|| async { ApiError::NotFound("route".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    let metrics = Router::new()
        .route("/metrics", get(metrics_route))
        .route_layer(middleware::from_fn(require_admin))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(metrics)
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .nest("/v1", v1)
        .with_state(state)
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

async fn readyz(State(state): State<AdminState>) -> Response {
    let link = state.link.borrow().clone();
    let store = state.bots.shared().store.check_writable().await;
    let component = match &link {
        LinkStatus::Up => json!({"ok": true}),
        LinkStatus::Connecting(problem) => json!({"ok": false, "problem": problem}),
    };
    let store_json = match &store {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "problem": e.to_string()}),
    };
    let ready = link == LinkStatus::Up && store.is_ok();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"ready": ready, "component": component, "store": store_json})),
    )
        .into_response()
}

fn bot_json(bot: &BotHandle) -> Value {
    let f = &bot.fingerprints;
    json!({
        "jid": bot.record.jid,
        "localpart": bot.record.localpart,
        "handler": bot.record.handler,
        "peer_auth": bot.record.peer_auth,
        "trust": bot.record.trust,
        "created_at": bot.record.created_at,
        "fingerprints": {
            "spki_sha256": f.spki_sha256.to_string(),
            "cert_sha256": f.cert_sha256.to_string(),
            "cert_sha1": f.cert_sha1.to_string(),
        },
    })
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

async fn list_bots(State(state): State<AdminState>) -> Json<Value> {
    Json(Value::Array(
        state.bots.list().iter().map(bot_json).collect(),
    ))
}

/// Body of `POST /v1/bots`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBot {
    localpart: String,
    #[serde(default = "default_handler")]
    handler: Handler,
    #[serde(default)]
    peer_auth: PeerAuth,
    #[serde(default)]
    trust: TrustMode,
}

fn default_handler() -> Handler {
    Handler::Api
}

async fn create_bot(
    State(state): State<AdminState>,
    body: Result<Json<CreateBot>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let bot = state
        .bots
        .create(NewBot {
            localpart: body.localpart,
            handler: body.handler,
            peer_auth: body.peer_auth,
            trust: body.trust,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(bot_json(&bot))))
}

async fn get_bot(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(bot_json(&find_bot(&state, &jid)?)))
}

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

async fn get_certificate(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let bot = find_bot(&state, &jid)?;
    let id = &bot.identity;
    Ok(Json(json!({
        "jid": bot.record.jid,
        "pem": id.cert_pem(),
        "spki_sha256": id.info.fingerprints.spki_sha256.to_string(),
        "cert_sha256": id.info.fingerprints.cert_sha256.to_string(),
        "cert_sha1": id.info.fingerprints.cert_sha1.to_string(),
        "not_before": id.info.not_before,
        "not_after": id.info.not_after,
    })))
}

async fn get_peers(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let bot = find_bot(&state, &jid)?;
    let pins = state.bots.shared().store.list_pins(&bot.record.jid).await?;
    let mut peers: Vec<Value> = Vec::new();
    for pin in pins {
        match peers.last_mut() {
            Some(last) if last["jid"] == pin.peer => {
                last["pins"]
                    .as_array_mut()
                    .expect("pins array")
                    .push(json!(pin));
            }
            _ => peers.push(json!({"jid": pin.peer, "pins": [pin]})),
        }
    }
    Ok(Json(Value::Array(peers)))
}

/// Query of `GET /v1/tunnels`.
#[derive(Debug, Deserialize)]
struct TunnelQuery {
    bot: Option<String>,
    peer: Option<String>,
    state: Option<String>,
    limit: Option<i64>,
}

const STATES: &[&str] = &["starting", "handshaking", "open", "closing", "closed"];

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
        bot: q.bot.map(|b| crate::certs::normalize_bare(&b).unwrap_or(b)),
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

#[derive(Serialize)]
struct Accepted {
    id: String,
    state: &'static str,
}

async fn delete_tunnel(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    if state.bots.close_tunnel(&id).await {
        return Ok((
            StatusCode::ACCEPTED,
            Json(Accepted {
                id,
                state: "closing",
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
