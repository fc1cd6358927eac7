//! Liveness, readiness and metrics.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AdminState;
use crate::link::LinkStatus;
use crate::session::BotTable;
use crate::store::InstanceRecord;
use tokio::sync::watch;

/// `/healthz` and `/readyz`, which need no token.
pub(super) fn probe_routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// `/metrics` on the admin listener (the caller adds the admin-token layers).
pub(super) fn metrics_routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new().routes(routes!(metrics_route))
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
    https: bool,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let (client, scheme) = if https {
        // The probe sends no credential and reads only a status, so it takes the listener's
        // certificate as it is: a check would fail on a certificate made for the public name
        // (the probe connects to loopback) and call a live process dead.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .danger_accept_invalid_certs(true)
            .build()
            .map_err(|e| format!("cannot make an HTTPS client: {e}"))?;
        (client, "https")
    } else {
        (crate::delivery::webhook::client().clone(), "http")
    };
    let answer = client
        .get(format!("{scheme}://{addr}/healthz"))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("no answer from {scheme}://{addr}: {e}"))?;
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
    for state in xtls::tunnel::State::ALL {
        m.tunnels
            .get_or_create(&crate::metrics::StateLabel {
                state: state.as_str().into(),
            })
            .set(0);
    }
    for t in shared.table.snapshot() {
        m.tunnels
            .get_or_create(&crate::metrics::StateLabel {
                state: t.state.as_str().into(),
            })
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

/// The app of a standby: `/healthz` 200, `/readyz` 503 naming the instance that serves the
/// store (as `serving` says, kept current by the caller), and 503 with `Retry-After` for
/// everything else, pointing to the active instance's admin API when it advertises one.
pub fn standby_app(
    allowed_hosts: std::sync::Arc<super::AllowedHosts>,
    serving: watch::Receiver<Option<InstanceRecord>>,
) -> Router {
    let ready_view = serving.clone();
    let readiness = move || {
        let reason = match &*ready_view.borrow() {
            Some(active) => format!(
                "standby: instance {} on {} (pid {}{}) serves the store; this one takes over when \
                 it stops",
                active.id,
                active.host,
                active.pid,
                active
                    .admin_url
                    .as_ref()
                    .map(|url| format!(", admin API at {url}"))
                    .unwrap_or_default()
            ),
            None => "standby: another instance serves the store; this one takes over when it stops"
                .to_owned(),
        };
        let body = Readiness {
            ready: false,
            component: Check {
                ok: false,
                problem: Some(reason),
            },
            store: Check {
                ok: true,
                problem: None,
            },
        };
        async move { (StatusCode::SERVICE_UNAVAILABLE, Json(body)) }
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readiness))
        .fallback(move || {
            let at = serving
                .borrow()
                .as_ref()
                .and_then(|active| active.admin_url.clone())
                .map(|url| format!(" at {url}"))
                .unwrap_or_default();
            async move {
                let mut resp = super::error::problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("this instance is a standby: the active instance serves the API{at}"),
                );
                resp.headers_mut().insert(
                    header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("5"),
                );
                resp
            }
        })
        .layer(axum::middleware::from_fn_with_state(
            allowed_hosts,
            super::server::check_host,
        ))
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
