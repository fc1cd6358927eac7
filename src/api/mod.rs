//! The HTTP API: the operator's admin routes and the bot-facing routes, on one listener.
//!
//! Owns: routing, authentication (admin token, bot tokens), problem+json errors, the OpenAPI
//! document, health, readiness and metrics endpoints, and the HTTP server under them
//! (deadlines, caps, `Host` allow-list). It calls down into [`crate::session`] (the bot table,
//! commands to drivers), [`crate::delivery`] (event types, webhook secrets),
//! [`crate::store`], [`crate::link`] (the link's status, for readiness) and [`crate::config`];
//! nothing below calls it.
//!
//! Everything under `/v1` requires `Authorization: Bearer <token>`; `/healthz` and `/readyz`
//! do not. Errors are `application/problem+json` (RFC 9457) and never carry internals.
//!
//! | module | what |
//! |---|---|
//! | `server` | the hyper server: connection cap, deadlines, body cap, `Host` check, HTTPS |
//! | `error` | [`ApiError`] and its problem+json rendering |
//! | `forward` | requests about a bot another instance runs, passed to that instance |
//! | `auth` | bearer tokens: who the caller is and what it may reach |
//! | `health` | `/healthz`, `/readyz`, `/metrics` |
//! | `admin` | bots, certificates, peers, the session table |
//! | `bot` | the bot-facing routes: events, messages, webhook, deliveries, tokens |
//! | `trust` | peers' pinned keys over HTTP, the audit log of those decisions |
//! | `openapi` | the OpenAPI document, generated from the handlers |

mod admin;
mod auth;
mod bot;
mod error;
mod forward;
mod health;
mod openapi;
mod server;
mod trust;

use axum::http::{HeaderValue, header};
use axum::middleware;
use axum::{Json, Router};
use tokio::sync::watch;
use utoipa_axum::router::OpenApiRouter;

use crate::link::LinkStatus;
use crate::session::BotTable;

pub use auth::{AdminToken, Caller};
pub use error::ApiError;
pub use health::{metrics_app, probe_health, standby_app};
pub use server::{AllowedHosts, HttpLimits, ListenerTls, serve};

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The running bots.
    pub bots: BotTable,
    /// The admin bearer token, as its digest.
    pub token: AdminToken,
    /// The component link's status.
    pub link: watch::Receiver<LinkStatus>,
    /// Body size and time limits.
    pub limits: std::sync::Arc<server::HttpLimits>,
    /// The `Host` names answered.
    pub allowed_hosts: std::sync::Arc<server::AllowedHosts>,
    /// Browser origins allowed by CORS (none by default).
    pub cors_origins: Vec<String>,
}

/// The router; tests call it without a port.
pub fn app(state: AdminState) -> Router {
    let (router, doc) = routes(state.clone()).split_for_parts();
    let document = openapi::finish(doc)
        .to_json()
        .expect("the OpenAPI document serializes");
    let router = router
        .layer(axum::Extension(openapi::OpenApiJson(std::sync::Arc::new(
            document,
        ))))
        .with_state(state.clone());
    let router = match cors(&state.cors_origins) {
        Some(layer) => router.layer(layer),
        None => router,
    };
    router.layer(middleware::from_fn_with_state(
        state.allowed_hosts.clone(),
        server::check_host,
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
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
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

/// An optional JSON body: none (no `Content-Type`) takes every default; a body that is
/// there must be valid, as [`json_body`] says.
pub fn optional_json_body<T: Default>(
    body: Result<Option<Json<T>>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    Ok(body
        .transpose()
        .map(json_body)
        .transpose()?
        .unwrap_or_default())
}

/// The admin API's routes with their OpenAPI document.
pub fn routes(state: AdminState) -> OpenApiRouter<AdminState> {
    let admin_only = admin::routes()
        .merge(bot::admin_routes())
        .route_layer(middleware::from_fn(auth::require_admin));
    let v1 = OpenApiRouter::new()
        .merge(openapi::routes())
        .merge(admin_only)
        .merge(bot::routes())
        .merge(trust::routes())
        .fallback(|| async { ApiError::NotFound("route".into()) })
        // read_body enforces admin.max_body_bytes; the extractors' own 2 MB cap would
        // contradict a larger setting.
        .layer(axum::extract::DefaultBodyLimit::disable())
        // Sharing the store: a request about a bot another instance runs goes there.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            forward::to_owner,
        ))
        // Only a caller with a valid token gets its body read.
        .layer(middleware::from_fn_with_state(
            state.limits.clone(),
            server::read_body,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let metrics = health::metrics_routes()
        .route_layer(middleware::from_fn(auth::require_admin))
        .route_layer(middleware::from_fn_with_state(state, auth::require_token));
    OpenApiRouter::with_openapi(<openapi::ApiDoc as utoipa::OpenApi>::openapi())
        .merge(metrics)
        .merge(health::probe_routes())
        .nest("/v1", v1)
}
