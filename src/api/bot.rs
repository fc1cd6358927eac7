//! The bot-facing routes of the admin API (docs/bot-api.md): the event log read by poll or
//! Server-Sent Events, the webhook and its deliveries, outbound messages, bot tokens.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::admin::find_bot;
use super::openapi::{BotPath, PROBLEM_JSON, Problem};
use super::{AdminState, ApiError, Caller};
use crate::delivery::webhook;
use crate::session::{BotHandle, Submitted};
use crate::store::{
    Attempt, DeadLetter, EventRecord, MessageRecord, MessageStatus, OutMsg, Store, StoreError,
    TokenInfo, TunnelId, Webhook, now,
};
use xtls::stanza::checked_chat_message;

/// Every bot token starts with this.
pub const TOKEN_PREFIX: &str = "xtb_";

/// Routes a bot token may use for its own bot.
pub fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(get_events))
        .routes(routes!(get_webhook, put_webhook, delete_webhook))
        .routes(routes!(get_deliveries))
        .routes(routes!(retry_dead_letters))
        .routes(routes!(drop_dead_letters))
        .routes(routes!(post_message))
        .routes(routes!(get_message))
}

/// Routes only the admin token may use.
pub fn admin_routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(delete_token))
}

/// A bot and one of its things, named in a path.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
#[expect(
    dead_code,
    reason = "only the OpenAPI document reads it; handlers take the path as a tuple"
)]
pub struct BotItemPath {
    /// The bot's bare JID, or its localpart.
    pub jid: String,
    /// The item's id.
    pub id: String,
}

/// The bot named in the path, if the caller may act for it.
pub fn scoped(state: &AdminState, caller: &Caller, jid: &str) -> Result<BotHandle, ApiError> {
    if let Caller::Bot { jid: own, .. } = caller {
        // A bot token learns nothing about other bots, not even whether they exist.
        let named = xtls::certs::normalize_bare(jid).unwrap_or_else(|| jid.to_owned());
        let own_local = own.split('@').next().unwrap_or_default();
        if named != *own && !named.eq_ignore_ascii_case(own_local) {
            return Err(ApiError::Forbidden);
        }
    }
    let bot = find_bot(state, jid)?;
    caller.may_act_for(&bot.record.jid)?;
    Ok(bot)
}

/// Query of `GET .../events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Events after this seq; everything up to it is acknowledged. Default: the cursor.
    after: Option<u64>,
    /// At most this many (1 to 1000; default 100).
    limit: Option<u32>,
    /// Seconds to wait for an event when there is none (long poll; at most 60).
    wait: Option<u64>,
}

/// A page of events.
#[derive(Serialize, ToSchema)]
struct EventsPage {
    /// The events, in seq order.
    #[schema(value_type = Vec<crate::delivery::event::EventEnvelope>)]
    events: Vec<EventRecord>,
    /// Everything up to this seq is acknowledged.
    cursor: u64,
    /// The newest committed seq.
    last_seq: u64,
}

/// The bot's event log, by poll or (with `Accept: text/event-stream`) Server-Sent Events.
#[utoipa::path(get, path = "/bots/{jid}/events", tag = "bot-api", params(BotPath, EventsQuery,
    ("Last-Event-ID" = Option<u64>, Header, description = "SSE: resume after this seq")),
    responses(
        (status = 200, description = "Events (JSON), or a stream of them (SSE, each `data` an event)",
            content((EventsPage = "application/json"), (String = "text/event-stream"))),
        (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "A query parameter is not valid", body = Problem, content_type = PROBLEM_JSON)))]
async fn get_events(
    State(state): State<AdminState>,
    caller: Caller,
    Path(jid): Path<String>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let bot = scoped(&state, &caller, &jid)?;
    let store = state.bots.shared().store.clone();
    let jid = bot.record.jid.clone();
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| ApiError::Invalid("Last-Event-ID must be a seq".into()))
        })
        .transpose()?;
    // Naming a position acknowledges everything up to it (the shared cursor).
    // From a position: everything after it (a replay). From the cursor: what no reader
    // acknowledged yet, so a webhook's deliveries are not read twice.
    let position = last_event_id.or(q.after);
    let start = match position {
        Some(after) => {
            store.ack_through(&jid, after).await?;
            after
        }
        None => store.cursor(&jid).await?,
    };
    let pending_only = position.is_none();
    if wants_stream {
        return Ok(stream(store, bot, start, pending_only).into_response());
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(60));
    let mut seen = bot.events.clone();
    let mut events = store.read_events(&jid, start, limit, pending_only).await?;
    if events.is_empty() && !wait.is_zero() {
        let _ = tokio::time::timeout(wait, seen.wait_for(|last| *last > start)).await;
        events = store.read_events(&jid, start, limit, pending_only).await?;
    }
    let last_seq = *bot.events.borrow();
    Ok(Json(EventsPage {
        events,
        cursor: store.cursor(&jid).await?,
        last_seq,
    })
    .into_response())
}

fn sse_event(e: &EventRecord) -> SseEvent {
    SseEvent::default()
        .id(e.seq.to_string())
        .event(e.kind.clone())
        .data(serde_json::to_string(e).expect("an event serializes"))
}

/// Replays from `after`, then follows the log live.
fn stream(
    store: Store,
    bot: BotHandle,
    after: u64,
    pending_only: bool,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    struct Cursor {
        store: Store,
        bot: BotHandle,
        after: u64,
        pending_only: bool,
        buffer: std::collections::VecDeque<EventRecord>,
    }
    let cursor = Cursor {
        store,
        bot,
        after,
        pending_only,
        buffer: Default::default(),
    };
    let events = futures_util::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(e) = c.buffer.pop_front() {
                c.after = e.seq;
                return Some((Ok(sse_event(&e)), c));
            }
            let committed = *c.bot.events.borrow();
            match c
                .store
                .read_events(&c.bot.record.jid, c.after, 200, c.pending_only)
                .await
            {
                Ok(events) if !events.is_empty() => c.buffer.extend(events),
                Ok(_) => {
                    // Nothing to send up to `committed` (all of it acknowledged elsewhere).
                    c.after = c.after.max(committed);
                    let mut seen = c.bot.events.clone();
                    let after = c.after;
                    // The driver is gone when the bot stopped: end the stream.
                    seen.wait_for(|last| *last > after).await.ok()?;
                }
                Err(e) => {
                    tracing::error!(error = %e, "event stream cannot read the log");
                    return None;
                }
            }
        }
    });
    Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("keep-alive"),
    )
}

/// A bot's webhook and its delivery state.
#[derive(Serialize, ToSchema)]
struct WebhookView {
    /// Where events are POSTed.
    url: String,
    /// Always true: the secret is write-only.
    secret_set: bool,
    /// The signing secret, only in the answer to the `PUT` that generated it.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    /// Per-request timeout.
    timeout_ms: u64,
    /// Tunnels whose events may be in flight at once.
    max_in_flight: usize,
    /// Events not delivered yet.
    pending: u64,
    /// Events given up on (dead letters).
    dead: u64,
    /// The last 2xx (RFC 3339).
    last_success_at: Option<String>,
    /// The last failure.
    last_error: Option<String>,
}

fn webhook_view(hook: &Webhook, pending: u64, dead: u64) -> WebhookView {
    WebhookView {
        url: hook.url.clone(),
        secret_set: true,
        secret: None,
        timeout_ms: hook.timeout_ms,
        max_in_flight: hook.max_in_flight,
        pending,
        dead,
        last_success_at: hook.last_success_at.clone(),
        last_error: hook.last_error.clone(),
    }
}

/// The bot's webhook.
#[utoipa::path(get, path = "/bots/{jid}/webhook", tag = "bot-api", params(BotPath), responses(
    (status = 200, description = "The webhook", body = WebhookView),
    (status = 404, description = "No such bot, or no webhook", body = Problem, content_type = PROBLEM_JSON)))]
async fn get_webhook(
    State(state): State<AdminState>,
    caller: Caller,
    Path(jid): Path<String>,
) -> Result<Json<WebhookView>, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let store = &state.bots.shared().store;
    let hook = store
        .webhook(&bot.record.jid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("webhook of {}", bot.record.jid)))?;
    let (pending, dead) = store.event_counts(&bot.record.jid).await?;
    Ok(Json(webhook_view(&hook, pending, dead)))
}

/// Body of `PUT .../webhook`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PutWebhook {
    /// An http or https URL.
    url: String,
    /// `whsec_` and 16 to 64 bytes in base64; generated (and returned once) when absent.
    secret: Option<String>,
    /// Per-request timeout, 100 to 60000 ms.
    timeout_ms: Option<u64>,
    /// Tunnels whose events may be in flight at once, 1 to 64.
    max_in_flight: Option<usize>,
}

/// Sets the bot's webhook; pending events start flowing to it.
#[utoipa::path(put, path = "/bots/{jid}/webhook", tag = "bot-api", params(BotPath),
    request_body = PutWebhook, responses(
    (status = 200, description = "The webhook as set", body = WebhookView),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 422, description = "Not a valid body, URL or secret", body = Problem, content_type = PROBLEM_JSON)))]
async fn put_webhook(
    State(state): State<AdminState>,
    caller: Caller,
    Path(jid): Path<String>,
    body: Result<Json<PutWebhook>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<WebhookView>, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let body = super::json_body(body)?;
    let url = reqwest::Url::parse(&body.url).map_err(|e| ApiError::Invalid(format!("url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ApiError::Invalid("url must be an http or https URL".into()));
    }
    // An IP the guard closes is refused now; a name is checked each time it resolves.
    state
        .bots
        .shared()
        .webhook_networks
        .check_url(&url)
        .map_err(|why| ApiError::Invalid(format!("url: {why}")))?;
    let generated = body.secret.is_none();
    let secret = body.secret.unwrap_or_else(webhook::generate_secret);
    if webhook::secret_key(&secret).is_none() {
        return Err(ApiError::Invalid(
            "secret must be whsec_ followed by 16 to 64 bytes in base64".into(),
        ));
    }
    let defaults = state.bots.shared().webhooks.get();
    let hook = Webhook {
        url: url.to_string(),
        secret: crate::config::Secret::new(secret.clone()),
        timeout_ms: body
            .timeout_ms
            .unwrap_or(defaults.timeout_ms)
            .clamp(100, 60_000),
        max_in_flight: body
            .max_in_flight
            .unwrap_or(defaults.max_in_flight)
            .clamp(1, 64),
        last_success_at: None,
        last_error: None,
    };
    let store = &state.bots.shared().store;
    store.put_webhook(&bot.record.jid, &hook).await?;
    bot.webhook_changed();
    tracing::info!(bot = bot.record.jid, "webhook set");
    let (pending, dead) = store.event_counts(&bot.record.jid).await?;
    let mut answer = webhook_view(&hook, pending, dead);
    if generated {
        // Shown once: the secret is write-only from here on.
        answer.secret = Some(secret);
    }
    Ok(Json(answer))
}

/// Removes the bot's webhook; events wait in the log for a reader.
#[utoipa::path(delete, path = "/bots/{jid}/webhook", tag = "bot-api", params(BotPath), responses(
    (status = 204, description = "Removed"),
    (status = 404, description = "No such bot, or no webhook", body = Problem, content_type = PROBLEM_JSON)))]
async fn delete_webhook(
    State(state): State<AdminState>,
    caller: Caller,
    Path(jid): Path<String>,
) -> Result<StatusCode, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    if state
        .bots
        .shared()
        .store
        .delete_webhook(&bot.record.jid)
        .await?
    {
        bot.webhook_changed();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("webhook of {}", bot.record.jid)))
    }
}

/// Recent webhook attempts and the dead letters.
#[derive(Serialize, ToSchema)]
struct Deliveries {
    /// The latest 100 attempts, newest first.
    attempts: Vec<Attempt>,
    /// Every dead letter, oldest first.
    dead_letters: Vec<DeadLetter>,
}

/// The webhook's recent attempts and dead letters.
#[utoipa::path(get, path = "/bots/{jid}/deliveries", tag = "bot-api", params(BotPath), responses(
    (status = 200, description = "Attempts and dead letters", body = Deliveries),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON)))]
async fn get_deliveries(
    State(state): State<AdminState>,
    caller: Caller,
    Path(jid): Path<String>,
) -> Result<Json<Deliveries>, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let store = &state.bots.shared().store;
    Ok(Json(Deliveries {
        attempts: store.attempts(&bot.record.jid, 100).await?,
        dead_letters: store.dead_letters(&bot.record.jid).await?,
    }))
}

/// Body of the dead-letter actions.
#[derive(Debug, Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
struct DeadLetterAction {
    /// The dead letters by seq; all of them when absent.
    seq: Option<Vec<u64>>,
}

/// How many dead letters an action reached.
#[derive(Serialize, ToSchema)]
struct DeadLetterCount {
    /// Dead letters put back in the queue (`retry`).
    #[serde(skip_serializing_if = "Option::is_none")]
    retried: Option<u64>,
    /// Dead letters deleted (`drop`).
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped: Option<u64>,
}

/// Puts dead letters back in the webhook's queue.
#[utoipa::path(post, path = "/bots/{jid}/deliveries/retry", tag = "bot-api", params(BotPath),
    request_body = DeadLetterAction, responses(
    (status = 200, description = "How many were queued again", body = DeadLetterCount),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 422, description = "Not a valid body", body = Problem, content_type = PROBLEM_JSON)))]
async fn retry_dead_letters(
    State(state): State<AdminState>,
    caller: Caller,
    Path(jid): Path<String>,
    body: Result<Json<DeadLetterAction>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<DeadLetterCount>, ApiError> {
    dead_letters(&state, &caller, &jid, body, true).await
}

/// Deletes dead letters.
#[utoipa::path(post, path = "/bots/{jid}/deliveries/drop", tag = "bot-api", params(BotPath),
    request_body = DeadLetterAction, responses(
    (status = 200, description = "How many were deleted", body = DeadLetterCount),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 422, description = "Not a valid body", body = Problem, content_type = PROBLEM_JSON)))]
async fn drop_dead_letters(
    State(state): State<AdminState>,
    caller: Caller,
    Path(jid): Path<String>,
    body: Result<Json<DeadLetterAction>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<DeadLetterCount>, ApiError> {
    dead_letters(&state, &caller, &jid, body, false).await
}

/// Puts dead letters back in the queue (`retry`) or deletes them.
async fn dead_letters(
    state: &AdminState,
    caller: &Caller,
    jid: &str,
    body: Result<Json<DeadLetterAction>, axum::extract::rejection::JsonRejection>,
    retry: bool,
) -> Result<Json<DeadLetterCount>, ApiError> {
    let bot = scoped(state, caller, jid)?;
    let body = super::json_body(body)?;
    let store = &state.bots.shared().store;
    let seqs = body.seq.as_deref();
    Ok(Json(if retry {
        let n = store.retry_dead(&bot.record.jid, seqs).await?;
        bot.webhook_changed();
        DeadLetterCount {
            retried: Some(n),
            dropped: None,
        }
    } else {
        DeadLetterCount {
            retried: None,
            dropped: Some(store.drop_dead(&bot.record.jid, seqs).await?),
        }
    }))
}

/// A new bot token: the only time the token itself is shown.
#[derive(Serialize, ToSchema)]
struct TokenCreated {
    /// The token's id (`tok_…`), to revoke it.
    id: String,
    /// The bot it acts for.
    bot: String,
    /// The bearer token (`xtb_…`); only its hash is kept.
    token: String,
    /// When it was created (RFC 3339).
    created_at: String,
}

/// Creates a token for the bot.
#[utoipa::path(post, path = "/bots/{jid}/tokens", tag = "tokens", params(BotPath), responses(
    (status = 201, description = "The new token", body = TokenCreated),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON)))]
async fn create_token(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let bot = find_bot(&state, &jid)?;
    let token = format!(
        "{TOKEN_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    );
    let id = format!("tok_{:016x}", rand::random::<u64>());
    let created_at = now();
    state
        .bots
        .shared()
        .store
        .insert_token(&id, &bot.record.jid, &token, &created_at)
        .await?;
    tracing::info!(bot = bot.record.jid, token_id = id, "bot token created");
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            id,
            bot: bot.record.jid.clone(),
            token,
            created_at,
        }),
    ))
}

/// The bot's tokens (ids only).
#[utoipa::path(get, path = "/bots/{jid}/tokens", tag = "tokens", params(BotPath), responses(
    (status = 200, description = "The tokens", body = [TokenInfo]),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON)))]
async fn list_tokens(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    let bot = find_bot(&state, &jid)?;
    Ok(Json(
        state.bots.shared().store.tokens(&bot.record.jid).await?,
    ))
}

/// Revokes a token.
#[utoipa::path(delete, path = "/bots/{jid}/tokens/{id}", tag = "tokens", params(BotItemPath), responses(
    (status = 204, description = "Revoked"),
    (status = 404, description = "No such bot or token", body = Problem, content_type = PROBLEM_JSON)))]
async fn delete_token(
    State(state): State<AdminState>,
    Path((jid, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let bot = find_bot(&state, &jid)?;
    if state
        .bots
        .shared()
        .store
        .delete_token(&bot.record.jid, &id)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("token {id}")))
    }
}

/// Body of `POST .../messages`: exactly one of `body` and `stanza`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    /// The peer: a full JID, or a bare JID to reach its tunnel's resource.
    to: String,
    /// The text of a message stanza.
    body: Option<String>,
    /// A whole stanza (XML), sent as it is with routing added.
    stanza: Option<String>,
    /// The message type with `body` (default `chat`).
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Open a new tunnel if the one carrying it dies before the peer acknowledges it.
    #[serde(default)]
    reopen: bool,
}

/// What became of a submitted message (see `GET .../messages/{id}` for the rest).
#[derive(Serialize, ToSchema)]
struct MessageAccepted {
    /// The message id (`msg_…`).
    id: String,
    /// The recipient.
    to: String,
    /// Where the message stands.
    status: MessageStatus,
    /// Why, for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The tunnel carrying it.
    #[serde(skip_serializing_if = "Option::is_none")]
    tunnel_id: Option<TunnelId>,
}

impl MessageAccepted {
    fn new(id: String, to: String, outcome: Submitted) -> Self {
        MessageAccepted {
            id,
            to,
            status: outcome.status,
            reason: outcome.reason,
            tunnel_id: outcome.tunnel_id,
        }
    }

    fn replay(first: MessageRecord) -> Self {
        MessageAccepted {
            id: first.id,
            to: first.to,
            status: first.status,
            reason: first.reason,
            tunnel_id: first.tunnel_id,
        }
    }
}

fn valid_jid(jid: &str, field: &str) -> Result<String, ApiError> {
    jid::Jid::new(jid)
        .map(|j| j.to_string())
        .map_err(|e| ApiError::Invalid(format!("{field}: '{jid}' is not a valid JID: {e}")))
}

/// Sends a message to a peer through a tunnel, opening one if needed.
#[utoipa::path(post, path = "/bots/{jid}/messages", tag = "bot-api", params(BotPath,
    ("Idempotency-Key" = Option<String>, Header, description = "A retried request with the same key answers the first one's message")),
    request_body = PostMessage, responses(
    (status = 202, description = "Accepted, with where it stands", body = MessageAccepted),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 422, description = "Not a valid body, JID or stanza", body = Problem, content_type = PROBLEM_JSON),
    (status = 429, description = "Too many messages waiting for this peer; see Retry-After", body = Problem, content_type = PROBLEM_JSON)))]
async fn post_message(
    State(state): State<AdminState>,
    caller: Caller,
    Path(jid): Path<String>,
    headers: HeaderMap,
    body: Result<Json<PostMessage>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let body = super::json_body(body)?;
    let store = &state.bots.shared().store;
    let idempotency_key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .map(str::to_owned)
                .ok_or_else(|| {
                    ApiError::Invalid(
                        "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
                    )
                })
        })
        .transpose()?;
    if let Some(key) = &idempotency_key
        && let Some(first) = store.message_by_key(&bot.record.jid, key).await?
    {
        return Ok((StatusCode::ACCEPTED, Json(MessageAccepted::replay(first))).into_response());
    }
    let to = valid_jid(&body.to, "to")?;
    if jid::Jid::new(&to).is_ok_and(|j| j.domain().as_str() == state.bots.shared().domain) {
        return Err(ApiError::Invalid(
            "to: messages go to peers, not to bots of this component".into(),
        ));
    }
    let stanza = match (&body.body, &body.stanza) {
        (Some(text), None) => checked_chat_message(text, body.kind.as_deref().unwrap_or("chat"))
            .map_err(|e| ApiError::Invalid(e.into()))?,
        (None, Some(xml)) => {
            xtls::xml::parse_stanza(xml).map_err(|e| ApiError::Invalid(format!("stanza: {e}")))?
        }
        _ => {
            return Err(ApiError::Invalid(
                "give exactly one of body and stanza".into(),
            ));
        }
    };
    let msg = OutMsg {
        id: format!(
            "msg_{:016x}{:08x}",
            rand::random::<u64>(),
            rand::random::<u32>()
        ),
        to: to.clone(),
        stanza,
        reopen: body.reopen,
    };
    let id = msg.id.clone();
    // Stored and handed over in a task of its own: a client that goes away mid-request
    // cannot leave an accepted message that nobody sends.
    let accepted = tokio::spawn({
        let (store, bot, key) = (store.clone(), bot.clone(), idempotency_key.clone());
        async move {
            store
                .insert_message(&bot.record.jid, &msg, key.as_deref())
                .await?;
            let id = msg.id.clone();
            let outcome = bot.submit(msg).await.unwrap_or(Submitted {
                status: MessageStatus::Accepted,
                reason: None,
                tunnel_id: None,
            });
            if outcome.status == MessageStatus::RateLimited {
                // Not accepted: the caller retries.
                store.delete_message(&id).await?;
            }
            Ok::<_, StoreError>(outcome)
        }
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let outcome = match accepted {
        Ok(outcome) => outcome,
        Err(StoreError::Duplicate(_)) => {
            // A concurrent request with the same key won the race.
            let key = idempotency_key.as_deref().unwrap_or_default();
            let first = store
                .message_by_key(&bot.record.jid, key)
                .await?
                .ok_or_else(|| ApiError::Internal("idempotent message vanished".into()))?;
            return Ok((StatusCode::ACCEPTED, Json(MessageAccepted::replay(first))).into_response());
        }
        Err(e) => return Err(e.into()),
    };
    if outcome.status == MessageStatus::RateLimited {
        return Err(ApiError::TooManyRequests(
            1,
            outcome.reason.unwrap_or_else(|| "try again shortly".into()),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(MessageAccepted::new(id, to, outcome)),
    )
        .into_response())
}

/// A message and its history.
#[utoipa::path(get, path = "/bots/{jid}/messages/{id}", tag = "bot-api", params(BotItemPath), responses(
    (status = 200, description = "The message", body = MessageRecord),
    (status = 404, description = "No such bot or message", body = Problem, content_type = PROBLEM_JSON)))]
async fn get_message(
    State(state): State<AdminState>,
    caller: Caller,
    Path((jid, id)): Path<(String, String)>,
) -> Result<Json<MessageRecord>, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    state
        .bots
        .shared()
        .store
        .message(&bot.record.jid, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("message {id}")))
}

/// Body of `POST /v1/tunnels`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenTunnel {
    /// The bot (bare JID or localpart).
    bot: String,
    /// The peer's full JID.
    peer: String,
}

/// A tunnel the bot is opening.
#[derive(Serialize, ToSchema)]
pub struct TunnelOpening {
    /// The bot's bare JID.
    bot: String,
    /// The peer's full JID.
    peer: String,
    /// `opening`; `sent` when a tunnel to the peer is already live (`tunnel_id` names it);
    /// or a failure (`no_xtls_support`, `peer_unavailable`).
    status: MessageStatus,
    /// Why, for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The tunnel's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    tunnel_id: Option<TunnelId>,
}

/// The bot opens a tunnel to a full JID; the outcome arrives as events.
#[utoipa::path(post, path = "/tunnels", tag = "tunnels", request_body = OpenTunnel, responses(
    (status = 202, description = "Opening", body = TunnelOpening),
    (status = 404, description = "No such bot", body = Problem, content_type = PROBLEM_JSON),
    (status = 422, description = "Not a valid body or JID", body = Problem, content_type = PROBLEM_JSON),
    (status = 429, description = "Too many tunnels being opened; see Retry-After", body = Problem, content_type = PROBLEM_JSON)))]
pub async fn open_tunnel(
    State(state): State<AdminState>,
    body: Result<Json<OpenTunnel>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<TunnelOpening>), ApiError> {
    let body = super::json_body(body)?;
    let bot = find_bot(&state, &body.bot)?;
    let peer = valid_jid(&body.peer, "peer")?;
    if !peer.contains('/') {
        return Err(ApiError::Invalid("peer must be a full JID".into()));
    }
    let outcome = bot
        .open(peer.clone())
        .await
        .ok_or_else(|| ApiError::Internal("the bot did not answer".into()))?;
    if outcome.status == MessageStatus::RateLimited {
        return Err(ApiError::TooManyRequests(
            1,
            outcome.reason.unwrap_or_default(),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(TunnelOpening {
            bot: bot.record.jid.clone(),
            peer,
            status: outcome.status,
            reason: outcome.reason,
            tunnel_id: outcome.tunnel_id,
        }),
    ))
}
