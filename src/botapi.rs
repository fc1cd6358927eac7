//! The bot-facing routes of the admin API (docs/bot-api.md): the event log read by poll or
//! Server-Sent Events, the webhook and its deliveries, outbound messages, bot tokens.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::admin::{AdminState, ApiError, Caller, find_bot};
use crate::eventlog::EventRecord;
use crate::session::{BotHandle, OutMsg, Submitted, chat_message};
use crate::store::{Store, StoreError, now};
use crate::webhook::{self, Webhook};

/// Every bot token starts with this.
pub const TOKEN_PREFIX: &str = "xtb_";

/// Routes a bot token may use for its own bot.
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/bots/{jid}/events", get(get_events))
        .route(
            "/bots/{jid}/webhook",
            get(get_webhook).put(put_webhook).delete(delete_webhook),
        )
        .route("/bots/{jid}/deliveries", get(get_deliveries))
        .route("/bots/{jid}/deliveries/{action}", post(dead_letters))
        .route("/bots/{jid}/messages", post(post_message))
        .route("/bots/{jid}/messages/{id}", get(get_message))
}

/// Routes only the admin token may use.
pub fn admin_routes() -> Router<AdminState> {
    Router::new()
        .route("/bots/{jid}/tokens", get(list_tokens).post(create_token))
        .route("/bots/{jid}/tokens/{id}", delete(delete_token))
}

/// The bot named in the path, if the caller may act for it.
pub fn scoped(state: &AdminState, caller: &Caller, jid: &str) -> Result<BotHandle, ApiError> {
    if let Caller::Bot(own) = caller {
        // A bot token learns nothing about other bots, not even whether they exist.
        let named = crate::certs::normalize_bare(jid).unwrap_or_else(|| jid.to_owned());
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<u64>,
    limit: Option<u32>,
    wait: Option<u64>,
}

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
    Ok(Json(json!({
        "events": events,
        "cursor": store.cursor(&jid).await?,
        "last_seq": *bot.events.borrow(),
    }))
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

fn webhook_json(hook: &Webhook, pending: u64, dead: u64) -> Value {
    json!({
        "url": hook.url,
        "secret_set": true,
        "timeout_ms": hook.timeout_ms,
        "max_in_flight": hook.max_in_flight,
        "pending": pending,
        "dead": dead,
        "last_success_at": hook.last_success_at,
        "last_error": hook.last_error,
    })
}

async fn get_webhook(
    State(state): State<AdminState>,
    caller: Caller,
    Path(jid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let store = &state.bots.shared().store;
    let hook = store
        .webhook(&bot.record.jid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("webhook of {}", bot.record.jid)))?;
    let (pending, dead) = store.event_counts(&bot.record.jid).await?;
    Ok(Json(webhook_json(&hook, pending, dead)))
}

/// Body of `PUT .../webhook`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutWebhook {
    url: String,
    secret: Option<String>,
    timeout_ms: Option<u64>,
    max_in_flight: Option<usize>,
}

async fn put_webhook(
    State(state): State<AdminState>,
    caller: Caller,
    Path(jid): Path<String>,
    body: Result<Json<PutWebhook>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let Json(body) = body.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let url = reqwest::Url::parse(&body.url).map_err(|e| ApiError::Invalid(format!("url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ApiError::Invalid("url must be an http or https URL".into()));
    }
    let generated = body.secret.is_none();
    let secret = body.secret.unwrap_or_else(webhook::generate_secret);
    if webhook::secret_key(&secret).is_none() {
        return Err(ApiError::Invalid(
            "secret must be whsec_ followed by 16 to 64 bytes in base64".into(),
        ));
    }
    let defaults = &state.bots.shared().webhooks;
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
    bot.webhook_changed.notify_one();
    tracing::info!(bot = bot.record.jid, "webhook set");
    let (pending, dead) = store.event_counts(&bot.record.jid).await?;
    let mut answer = webhook_json(&hook, pending, dead);
    if generated {
        // Shown once: the secret is write-only from here on.
        answer["secret"] = Value::String(secret);
    }
    Ok(Json(answer))
}

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
        bot.webhook_changed.notify_one();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("webhook of {}", bot.record.jid)))
    }
}

async fn get_deliveries(
    State(state): State<AdminState>,
    caller: Caller,
    Path(jid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let store = &state.bots.shared().store;
    Ok(Json(json!({
        "attempts": store.attempts(&bot.record.jid, 100).await?,
        "dead_letters": store.dead_letters(&bot.record.jid).await?,
    })))
}

/// Body of the dead-letter actions.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeadLetterAction {
    seq: Option<Vec<u64>>,
}

/// `POST .../deliveries/retry` puts dead letters back in the queue; `.../drop` deletes them.
async fn dead_letters(
    State(state): State<AdminState>,
    caller: Caller,
    Path((jid, action)): Path<(String, String)>,
    body: Result<Json<DeadLetterAction>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let Json(body) = body.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let store = &state.bots.shared().store;
    let seqs = body.seq.as_deref();
    let answer = match action.as_str() {
        "retry" => {
            let n = store.retry_dead(&bot.record.jid, seqs).await?;
            bot.webhook_changed.notify_one();
            json!({ "retried": n })
        }
        "drop" => json!({ "dropped": store.drop_dead(&bot.record.jid, seqs).await? }),
        _ => return Err(ApiError::NotFound("route".into())),
    };
    Ok(Json(answer))
}

async fn create_token(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
        Json(json!({ "id": id, "bot": bot.record.jid, "token": token, "created_at": created_at })),
    ))
}

async fn list_tokens(
    State(state): State<AdminState>,
    Path(jid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let bot = find_bot(&state, &jid)?;
    Ok(Json(Value::Array(
        state.bots.shared().store.tokens(&bot.record.jid).await?,
    )))
}

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

/// Body of `POST .../messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    to: String,
    body: Option<String>,
    stanza: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    reopen: bool,
}

fn valid_jid(jid: &str, field: &str) -> Result<String, ApiError> {
    jid::Jid::new(jid)
        .map(|j| j.to_string())
        .map_err(|e| ApiError::Invalid(format!("{field}: '{jid}' is not a valid JID: {e}")))
}

/// `status`, and `reason` and `tunnel_id` when known, with the caller's other fields.
fn outcome_json(mut answer: Value, outcome: &Submitted) -> Value {
    answer["status"] = json!(outcome.status);
    if let Some(reason) = &outcome.reason {
        answer["reason"] = json!(reason);
    }
    if let Some(tunnel) = &outcome.tunnel_id {
        answer["tunnel_id"] = json!(tunnel);
    }
    answer
}

async fn post_message(
    State(state): State<AdminState>,
    caller: Caller,
    Path(jid): Path<String>,
    headers: HeaderMap,
    body: Result<Json<PostMessage>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let bot = scoped(&state, &caller, &jid)?;
    let Json(body) = body.map_err(|e| ApiError::Invalid(e.body_text()))?;
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
        return Ok((StatusCode::ACCEPTED, Json(json!({"id": first.id, "to": first.to, "status": first.status, "reason": first.reason}))).into_response());
    }
    let to = valid_jid(&body.to, "to")?;
    if jid::Jid::new(&to).is_ok_and(|j| j.domain().as_str() == state.bots.shared().domain) {
        return Err(ApiError::Invalid(
            "to: messages go to peers, not to bots of this component".into(),
        ));
    }
    let stanza = match (&body.body, &body.stanza) {
        (Some(text), None) => chat_message(text, body.kind.as_deref().unwrap_or("chat")),
        (None, Some(xml)) => {
            crate::xml::parse_stanza(xml).map_err(|e| ApiError::Invalid(format!("stanza: {e}")))?
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
                status: "accepted",
                reason: None,
                tunnel_id: None,
            });
            if outcome.status == "rate_limited" {
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
            return Ok((
                StatusCode::ACCEPTED,
                Json(json!({"id": first.id, "to": first.to, "status": first.status})),
            )
                .into_response());
        }
        Err(e) => return Err(e.into()),
    };
    if outcome.status == "rate_limited" {
        return Err(ApiError::TooManyRequests(
            1,
            outcome.reason.unwrap_or_else(|| "try again shortly".into()),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(outcome_json(json!({ "id": id, "to": to }), &outcome)),
    )
        .into_response())
}

async fn get_message(
    State(state): State<AdminState>,
    caller: Caller,
    Path((jid, id)): Path<(String, String)>,
) -> Result<Json<crate::session::MessageRecord>, ApiError> {
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenTunnel {
    bot: String,
    peer: String,
}

/// `POST /v1/tunnels`: the bot opens a tunnel to a full JID; the outcome arrives as events.
pub async fn open_tunnel(
    State(state): State<AdminState>,
    body: Result<Json<OpenTunnel>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let bot = find_bot(&state, &body.bot)?;
    let peer = valid_jid(&body.peer, "peer")?;
    if !peer.contains('/') {
        return Err(ApiError::Invalid("peer must be a full JID".into()));
    }
    let outcome = bot
        .open(peer.clone())
        .await
        .ok_or_else(|| ApiError::Internal("the bot did not answer".into()))?;
    if outcome.status == "rate_limited" {
        return Err(ApiError::TooManyRequests(
            1,
            outcome.reason.unwrap_or_default(),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(outcome_json(
            json!({ "bot": bot.record.jid, "peer": peer }),
            &outcome,
        )),
    ))
}

/// What a bot token is stored as.
fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Store {
    /// Stores a bot token's hash.
    pub async fn insert_token(
        &self,
        id: &str,
        bot: &str,
        token: &str,
        created_at: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO bot_tokens (id, bot_jid, sha256, created_at) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(bot)
            .bind(token_hash(token))
            .bind(created_at)
            .execute(self.writer())
            .await?;
        Ok(())
    }

    /// The bot a token belongs to.
    pub async fn token_bot(&self, token: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT bot_jid FROM bot_tokens WHERE sha256 = ?")
            .bind(token_hash(token))
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// A bot's tokens (ids and creation times only).
    pub async fn tokens(&self, bot: &str) -> Result<Vec<Value>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, created_at FROM bot_tokens WHERE bot_jid = ? ORDER BY created_at",
        )
        .bind(bot)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                json!({"id": r.get::<String, _>("id"), "created_at": r.get::<String, _>("created_at")})
            })
            .collect())
    }

    /// Revokes a token; `false` when the bot has no such token.
    pub async fn delete_token(&self, bot: &str, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM bot_tokens WHERE bot_jid = ? AND id = ?")
            .bind(bot)
            .bind(id)
            .execute(self.writer())
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_as_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
