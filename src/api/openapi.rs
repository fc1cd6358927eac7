//! The admin API's OpenAPI document, generated from the handlers' annotations.
//!
//! Each handler carries a `#[utoipa::path]` and is mounted with `utoipa_axum::routes!`, so a
//! route cannot exist without its entry in the document. What every `/v1` operation shares
//! (the bearer token, the 401/403/500 problems) is added here once.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};
use utoipa::{IntoParams, ToSchema};

/// The document's fixed part: title, version, tags and the problem schema.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "xtls-component admin API",
        description = "Bots, certificates, peers, the session table, and the bot-facing API \
                       (events, webhooks, messages). See README.md and docs/bot-api.md."
    ),
    components(schemas(Problem)),
    tags(
        (name = "health", description = "Liveness, readiness and metrics"),
        (name = "bots", description = "Bots and their certificates (admin token)"),
        (name = "tunnels", description = "The session table (admin token)"),
        (name = "instances", description = "The processes serving the store (admin token)"),
        (name = "tokens", description = "Bot tokens (admin token)"),
        (name = "bot-api", description = "What a bot token may use for its own bot"),
        (name = "trust", description = "Peers' pinned keys and the audit log of decisions \
                                        (a bot token for its own bot, the admin token for any)"),
    )
)]
pub struct ApiDoc;

/// An error body (RFC 9457 problem details), sent as `application/problem+json`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// Always `about:blank`: the status says what kind of problem it is.
    #[serde(rename = "type")]
    pub kind: String,
    /// The status's reason phrase.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, for a person.
    pub detail: String,
}

/// The bot named in a path.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
#[expect(
    dead_code,
    reason = "only the OpenAPI document reads it; handlers take the path as a tuple"
)]
pub struct BotPath {
    /// The bot's bare JID, or its localpart.
    pub jid: String,
}

/// The tunnel named in a path.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
#[expect(
    dead_code,
    reason = "only the OpenAPI document reads it; handlers take the path as a tuple"
)]
pub struct TunnelPath {
    /// The tunnel id.
    pub id: String,
}

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Adds the bearer scheme and the problems every operation may answer (bad `Host`; for
/// `/v1`: token, scope, internal; with a body: too slow, too large).
pub fn finish(mut doc: OpenApi) -> OpenApi {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "The admin token (admin.token), or a bot token (xtb_...) for the bot-api routes",
                ))
                .build(),
        ),
    );
    let problem = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build()
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        let with_token = path.starts_with("/v1/") || path == "/metrics";
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ];
        for op in operations.into_iter().flatten() {
            let mut common = Vec::new();
            if !super::server::PROBES.contains(&path.as_str()) {
                common.push((
                    "421",
                    "The Host header is not one this API answers to (admin.allowed_hosts)",
                ));
            }
            if with_token {
                op.security = Some(vec![SecurityRequirement::new(
                    "bearer",
                    Vec::<String>::new(),
                )]);
                common.extend([
                    ("401", "No token, or one that is not valid"),
                    ("403", "A valid token that does not reach this resource"),
                    ("500", "An internal error (details in the component's log)"),
                ]);
            }
            if op.request_body.is_some() {
                common.extend([
                    (
                        "408",
                        "The body did not arrive in time (admin.body_timeout_secs)",
                    ),
                    ("413", "The body is larger than admin.max_body_bytes"),
                ]);
            }
            let responses = &mut op.responses.responses;
            for (status, what) in common {
                responses
                    .entry(status.to_owned())
                    .or_insert_with(|| problem(what).into());
            }
        }
    }
    doc
}

/// The serialized OpenAPI document, made once at start-up.
#[derive(Clone)]
pub(super) struct OpenApiJson(pub(super) std::sync::Arc<String>);

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

/// `/openapi.json` (under `/v1`, any valid token).
pub(super) fn routes() -> utoipa_axum::router::OpenApiRouter<super::AdminState> {
    utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(openapi_json))
}
