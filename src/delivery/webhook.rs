//! Webhook delivery of a bot's event log: signed `POST`s (Standard Webhooks), retries with
//! back-off, dead letters, in order per tunnel, a bounded number in flight per bot.
//!
//! One deliverer task runs per `api` bot. It reads the head (oldest pending event) of every
//! tunnel's queue from the store, posts the ones that are due, and records each outcome.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use minidom::Element;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::config::{Live, WebhooksConfig};
use crate::delivery::guard::WebhookNetworks;
use crate::store::events::PENDING;
use crate::store::{Attempt, Outcome, PendingEvent, Store, TunnelId, Webhook, now};

/// A new random signing secret.
pub fn generate_secret() -> String {
    let key: [u8; 24] = rand::random();
    format!("whsec_{}", B64.encode(key))
}

/// The key inside a `whsec_` secret; `None` when it is not one.
pub fn secret_key(secret: &str) -> Option<Vec<u8>> {
    let key = B64.decode(secret.strip_prefix("whsec_")?).ok()?;
    (key.len() >= 16 && key.len() <= 64).then_some(key)
}

/// The `webhook-signature` value: `v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

/// The delay before retry number `attempts` (1-based), with ±20 % jitter.
pub fn backoff(config: &WebhooksConfig, attempts: u32) -> Duration {
    let base = config
        .initial_backoff_ms
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(32))
        .min(config.max_backoff_ms);
    Duration::from_millis((base as f64 * rand::random_range(0.8..1.2)) as u64)
}

/// The stanzas of a webhook's synchronous `reply`: an object with `body`, a raw stanza
/// string, or a list of those.
pub fn reply_stanzas(reply: &Value) -> Result<Vec<Element>, String> {
    match reply {
        Value::Array(items) => items.iter().try_fold(Vec::new(), |mut all, item| {
            all.extend(reply_stanzas(item)?);
            Ok(all)
        }),
        Value::Object(map) => {
            let body = map
                .get("body")
                .and_then(Value::as_str)
                .ok_or("a reply object needs a string `body`")?;
            let kind = map.get("type").and_then(Value::as_str).unwrap_or("chat");
            Ok(vec![xtls::stanza::checked_chat_message(body, kind)?])
        }
        Value::String(xml) => {
            let el = xtls::xml::parse_stanza(xml).map_err(|e| format!("reply stanza: {e}"))?;
            Ok(vec![el])
        }
        _ => Err("`reply` must be an object, a string or a list".into()),
    }
}

/// The HTTP client of webhook deliveries: no redirects, no proxy (the connection goes where
/// the address check says it may), and a resolver that hands it only allowed addresses.
pub fn webhook_client(networks: WebhookNetworks) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(networks)
        .user_agent(concat!("xtls-component/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client builds")
}

/// The process's HTTP client for its own probes (no redirects followed), with the ring
/// crypto provider.
pub(crate) fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("xtls-component/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client builds")
    })
}

/// Most pending events a deliverer holds in memory; more are read as these go out.
const WINDOW: usize = 4096;
/// Most pending events held per tunnel, so one stuck tunnel cannot fill the window.
const PER_TUNNEL: usize = 16;

/// The events delivered in order, one at a time: those of one tunnel (`None`: of none).
type Group = Option<TunnelId>;

/// One bot's pending events, by tunnel, as the deliverer holds them.
#[derive(Default)]
struct Queues {
    /// Pending events per tunnel, oldest first.
    by_group: std::collections::BTreeMap<Group, std::collections::VecDeque<PendingEvent>>,
    /// Highest `seq` read from the store.
    read_through: u64,
    /// Events held.
    len: usize,
    /// Tunnels with events left in the store because their queue was full: nothing more
    /// of theirs is held until a read from the start, so each queue stays a prefix in order.
    overflowed: HashSet<Group>,
}

impl Queues {
    /// Holds an event, unless its tunnel already has [`PER_TUNNEL`] held or overflowed (it
    /// stays in the store and is read again once that queue drains).
    fn push(&mut self, head: PendingEvent) {
        let group = head.event.tunnel_id.clone();
        if self.overflowed.contains(&group) {
            return;
        }
        let queue = self.by_group.entry(group.clone()).or_default();
        // Each queue is its tunnel's oldest pending events in order: a read from the start
        // meets the ones already held again.
        if queue
            .back()
            .is_some_and(|held| held.event.seq >= head.event.seq)
        {
            return;
        }
        if queue.len() >= PER_TUNNEL {
            self.overflowed.insert(group);
            return;
        }
        queue.push_back(head);
        self.len += 1;
    }

    /// Takes the oldest event of a group out (delivered or dead).
    fn pop(&mut self, group: &Group) {
        if let Some(queue) = self.by_group.get_mut(group) {
            if queue.pop_front().is_some() {
                self.len -= 1;
            }
            if queue.is_empty() {
                self.by_group.remove(group);
            }
        }
    }
}

/// Where a webhook's synchronous reply goes: the bot's driver, which sends the stanzas into
/// the tunnel the event came from.
pub trait ReplySink: Clone + Send + Sync + 'static {
    /// Sends inner stanzas into the live tunnel `tunnel_id` of the bot.
    fn reply(
        &self,
        tunnel_id: TunnelId,
        stanzas: Vec<Element>,
    ) -> impl std::future::Future<Output = ()> + Send;
}

/// What one bot's deliverer works with, handed over by the bot's owner when the bot starts.
#[derive(Clone)]
pub struct Deliverer<R> {
    /// The bot's bare JID.
    pub bot: String,
    /// Where the log and the webhook live.
    pub store: Store,
    /// Back-off and age limits, read at each attempt (a reload may change them).
    pub config: Arc<Live<WebhooksConfig>>,
    /// The highest `seq` committed to the bot's log.
    pub committed: watch::Receiver<u64>,
    /// Woken when the webhook or the dead letters change.
    pub webhook_changed: Arc<Notify>,
    /// Where synchronous replies go.
    pub replies: R,
    /// Deliveries by outcome.
    pub counter: Family<crate::metrics::Outcome, Counter>,
    /// The HTTP client ([`webhook_client`]).
    pub client: reqwest::Client,
    /// Where webhooks may connect (a literal IP in the URL is checked against it).
    pub networks: WebhookNetworks,
}

/// Runs one bot's deliverer until the bot's log closes (the bot stopped).
pub async fn run<R: ReplySink>(parts: Deliverer<R>, preloaded: Option<Option<Webhook>>) {
    let jid = parts.bot.clone();
    let store = &parts.store;
    let mut events = parts.committed.clone();
    let mut in_flight: JoinSet<(Group, Option<PendingEvent>)> = JoinSet::new();
    let mut busy: HashSet<Group> = HashSet::new();
    let mut queues = Queues::default();
    // Reading from scratch: at start (unless the table loaded the webhook with every other
    // bot's), and when the webhook or the dead letters change.
    let mut reload = preloaded.is_none();
    let mut hook: Option<Webhook> = preloaded.flatten();

    loop {
        let mut wake: Option<i64> = None;
        if reload {
            match store.webhook(&jid).await {
                Ok(h) => {
                    hook = h;
                    reload = false;
                    // Keep the queues of events in flight; everything else is read again.
                    queues.by_group.retain(|group, _| busy.contains(group));
                    queues.by_group.values_mut().for_each(|q| q.truncate(1));
                    queues.len = queues.by_group.len();
                    queues.read_through = 0;
                    queues.overflowed.clear();
                }
                Err(e) => {
                    tracing::error!(bot = jid, error = %e, "cannot read webhook");
                    wake = Some(unix_ms() + 5000);
                }
            }
        }
        if let Some(hook) = &hook {
            let committed = *events.borrow();
            if queues.overflowed.iter().any(|g| {
                queues
                    .by_group
                    .get(g)
                    .is_none_or(|q| q.len() < PER_TUNNEL / 2)
            }) {
                // A tunnel that had more than it could hold drained: read again from the start.
                queues.overflowed.clear();
                queues.read_through = 0;
            }
            while queues.len < WINDOW / 2 && queues.read_through < committed {
                let limit = WINDOW - queues.len;
                match store
                    .pending_events(&jid, queues.read_through, limit as u32)
                    .await
                {
                    Ok(heads) => {
                        let full = heads.len() == limit;
                        let last = heads.last().map(|h| h.event.seq);
                        for head in heads {
                            queues.push(head);
                        }
                        tracing::trace!(
                            bot = jid,
                            after = queues.read_through,
                            read = last,
                            held = queues.len,
                            full,
                            "pending events read"
                        );
                        // A short read saw everything committed before it.
                        queues.read_through = match last {
                            Some(last) if full => last,
                            _ => committed,
                        };
                    }
                    Err(e) => {
                        tracing::error!(bot = jid, error = %e, "cannot read pending events");
                        wake = Some(unix_ms() + 5000);
                        break;
                    }
                }
            }
            let now_ms = unix_ms();
            for (group, queue) in &queues.by_group {
                if in_flight.len() >= hook.max_in_flight {
                    break;
                }
                let Some(head) = queue.front() else { continue };
                if busy.contains(group) {
                    continue;
                }
                if let Some(at) = head.next_attempt_ms.filter(|at| *at > now_ms) {
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                    continue;
                }
                busy.insert(group.clone());
                let (hook, parts, head, group) =
                    (hook.clone(), parts.clone(), head.clone(), group.clone());
                in_flight.spawn(async move {
                    let retry = deliver(&hook, &parts, head).await;
                    (group, retry)
                });
            }
        }
        let sleep =
            wake.map(|at| Duration::from_millis(at.saturating_sub(unix_ms()).max(0) as u64));
        tokio::select! {
            changed = events.changed() => if changed.is_err() { break },
            _ = parts.webhook_changed.notified() => reload = true,
            Some(done) = in_flight.join_next() => {
                if let Ok((group, retry)) = done {
                    busy.remove(&group);
                    match retry {
                        Some(head) => {
                            if let Some(front) = queues.by_group.get_mut(&group).and_then(|q| q.front_mut()) {
                                *front = head;
                            }
                        }
                        None => queues.pop(&group),
                    }
                }
            }
            _ = tokio::time::sleep(sleep.unwrap_or_default()), if sleep.is_some() => {}
        }
    }
    in_flight.shutdown().await;
}

/// Posts one event and records the outcome.
async fn deliver<R: ReplySink>(
    hook: &Webhook,
    parts: &Deliverer<R>,
    head: PendingEvent,
) -> Option<PendingEvent> {
    let (store, config) = (&parts.store, parts.config.get());
    let event = &head.event;
    let body = serde_json::to_vec(event).expect("an event serializes");
    let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let Some(key) = secret_key(hook.secret.expose()) else {
        tracing::error!(bot = event.bot, "stored webhook secret unusable");
        return Some(PendingEvent {
            next_attempt_ms: Some(unix_ms() + 60_000),
            ..head
        });
    };
    // A poll or a stream may have acknowledged it since it was read.
    match store.event_state(&event.bot, event.seq).await {
        Ok(Some(PENDING)) => {}
        Ok(_) => return None,
        Err(e) => {
            tracing::error!(bot = event.bot, error = %e, "cannot read event state");
            return Some(PendingEvent {
                next_attempt_ms: Some(unix_ms() + 5000),
                ..head
            });
        }
    }
    let started = std::time::Instant::now();
    tracing::trace!(bot = event.bot, seq = event.seq, "webhook delivery");
    // A literal IP in the URL is checked here; names are checked as they resolve.
    let allowed = reqwest::Url::parse(&hook.url)
        .map_err(|e| format!("url: {e}"))
        .and_then(|url| parts.networks.check_url(&url));
    let answer = match allowed {
        Err(why) => Err(why),
        Ok(()) => parts
            .client
            .post(&hook.url)
            .timeout(Duration::from_millis(hook.timeout_ms))
            .header("content-type", "application/json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", sign(&key, &event.id, timestamp, &body))
            .body(body)
            .send()
            .await
            .map_err(|e| describe(&e)),
    };
    let (status, error) = match answer {
        Ok(resp) if resp.status().is_success() => {
            let status = resp.status().as_u16();
            let reply = read_limited(resp, MAX_REPLY_BYTES)
                .await
                .and_then(|body| serde_json::from_slice::<Value>(&body).ok());
            let mut error = None;
            if let (Some(reply), Some(tunnel)) = (
                reply.as_ref().and_then(|r| r.get("reply")),
                event.tunnel_id.as_ref(),
            ) {
                match reply_stanzas(reply) {
                    Ok(stanzas) if !stanzas.is_empty() => {
                        parts.replies.reply(tunnel.clone(), stanzas).await
                    }
                    Ok(_) => {}
                    Err(e) => error = Some(format!("reply ignored: {e}")),
                }
            }
            (Some(status), error)
        }
        Ok(resp) => (
            Some(resp.status().as_u16()),
            Some(format!("HTTP {}", resp.status())),
        ),
        Err(why) => (None, Some(why)),
    };
    let delivered = status.is_some_and(|s| (200..300).contains(&s));
    let attempts = head.attempts + 1;
    let now_ms = unix_ms();
    let first = head.first_attempt_ms.unwrap_or(now_ms);
    let outcome = if delivered {
        Outcome::Delivered
    } else if now_ms.saturating_sub(first) >= (config.max_age_secs as i64).saturating_mul(1000) {
        Outcome::Dead
    } else {
        Outcome::Retry {
            at_ms: now_ms + backoff(&config, attempts).as_millis() as i64,
        }
    };
    if !delivered {
        tracing::warn!(
            bot = event.bot,
            seq = event.seq,
            attempts,
            error = error.as_deref().unwrap_or(""),
            "webhook delivery failed"
        );
    }
    let result = match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Retry { .. } => "failed",
        Outcome::Dead => "dead",
    };
    parts
        .counter
        .get_or_create(&crate::metrics::Outcome {
            result: result.into(),
        })
        .inc();
    let attempt = Attempt {
        event_id: event.id.clone(),
        seq: event.seq,
        at: now(),
        status,
        error,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    if let Err(e) = store
        .record_attempt(&event.bot, &attempt, first, &outcome)
        .await
    {
        tracing::error!(bot = event.bot, error = %e, "cannot record webhook attempt");
        // Unrecorded, it is still pending in the store: try again (same webhook-id).
        return Some(PendingEvent {
            attempts,
            first_attempt_ms: Some(first),
            next_attempt_ms: Some(unix_ms() + 5000),
            event: head.event,
        });
    }
    match outcome {
        Outcome::Retry { at_ms } => Some(PendingEvent {
            attempts,
            first_attempt_ms: Some(first),
            next_attempt_ms: Some(at_ms),
            event: head.event,
        }),
        Outcome::Delivered | Outcome::Dead => None,
    }
}

/// Largest webhook answer read (a synchronous reply).
const MAX_REPLY_BYTES: usize = 256 * 1024;

/// The answer body, or `None` when it is larger than `limit` or breaks off.
async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.ok()? {
        if body.len() + chunk.len() > limit {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body)
}

/// An HTTP failure in words, without the URL (which may carry credentials).
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        // The innermost cause says why (refused, unreachable, or an address the guard closed).
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        format!("connection failed: {cause}")
    } else if e.is_redirect() {
        "redirects are not followed".into()
    } else {
        "request failed".into()
    }
}

/// Unix milliseconds now.
fn unix_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use xtls::stanza::ns;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_round_trip_and_bad_ones_are_refused() {
        let s = generate_secret();
        assert_eq!(secret_key(&s).unwrap().len(), 24);
        assert!(secret_key("nope").is_none());
        assert!(secret_key("whsec_!!").is_none());
        assert!(secret_key("whsec_AAAA").is_none(), "too short");
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let c = WebhooksConfig {
            initial_backoff_ms: 1000,
            max_backoff_ms: 10_000,
            ..WebhooksConfig::default()
        };
        for (attempt, base) in [
            (1, 1000u64),
            (2, 2000),
            (3, 4000),
            (5, 10_000),
            (40, 10_000),
        ] {
            let d = backoff(&c, attempt).as_millis() as u64;
            assert!(d >= base * 8 / 10 && d <= base * 12 / 10, "{attempt}: {d}");
        }
    }

    #[test]
    fn replies_become_stanzas() {
        let one = reply_stanzas(&serde_json::json!({"body": "hi"})).unwrap();
        assert_eq!(one[0].get_child("body", ns::CLIENT).unwrap().text(), "hi");
        assert_eq!(one[0].attr("type"), Some("chat"));
        let many = reply_stanzas(&serde_json::json!([
            {"body": "a"},
            "<message xmlns='jabber:client'><body>b</body></message>"
        ]))
        .unwrap();
        assert_eq!(many.len(), 2);
        assert!(reply_stanzas(&serde_json::json!({"nobody": 1})).is_err());
        assert!(reply_stanzas(&serde_json::json!("<message")).is_err());
        assert!(reply_stanzas(&serde_json::json!(3)).is_err());
        // A control character would panic the XML writer in the tunnel (fuzzing found it).
        assert!(reply_stanzas(&serde_json::json!({"body": "a\u{18}b"})).is_err());
        assert!(reply_stanzas(&serde_json::json!({"body": "a", "type": "\u{0}"})).is_err());
    }
}
