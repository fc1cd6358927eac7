//! Webhooks, their delivery attempts and dead letters.

use super::db::{Row, query};
use serde::Serialize;

use crate::config::Secret;

use super::events::{ACKED, DEAD, PENDING};
use super::{EventRecord, Store, StoreError, now};

/// A bot's webhook as stored.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Where events are posted.
    pub url: String,
    /// The signing secret, `whsec_<base64>`.
    pub secret: Secret,
    /// Request timeout.
    pub timeout_ms: u64,
    /// Concurrent requests.
    pub max_in_flight: usize,
    /// When a delivery last succeeded.
    pub last_success_at: Option<String>,
    /// The last failure.
    pub last_error: Option<String>,
}

/// An event waiting for webhook delivery, with its attempts so far.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    /// The event.
    pub event: EventRecord,
    /// Attempts made.
    pub attempts: u32,
    /// When the first attempt was made (Unix ms).
    pub first_attempt_ms: Option<i64>,
    /// When the next attempt is due (Unix ms).
    pub next_attempt_ms: Option<i64>,
}

/// One delivery attempt, for `GET .../deliveries`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Attempt {
    /// The event id (the `webhook-id`).
    pub event_id: String,
    /// The event's `seq`.
    pub seq: u64,
    /// When the attempt ended.
    pub at: String,
    /// The HTTP status, when an answer came.
    pub status: Option<u16>,
    /// What went wrong.
    pub error: Option<String>,
    /// How long it took.
    pub duration_ms: u64,
}

/// A dead-lettered event.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// The event id.
    pub event_id: String,
    /// The event's `seq`.
    pub seq: u64,
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
}

/// How an attempt ended.
pub enum Outcome {
    /// The webhook answered 2xx.
    Delivered,
    /// It failed; the next attempt is due then.
    Retry {
        /// When the next attempt is due (Unix ms).
        at_ms: i64,
    },
    /// It failed for longer than `webhooks.max_age_secs`: a dead letter now.
    Dead,
}

fn webhook_from_row(row: &Row, secret: String) -> Webhook {
    Webhook {
        url: row.get("url"),
        secret: Secret::new(secret),
        timeout_ms: row.get::<i64, _>("timeout_ms") as u64,
        max_in_flight: row.get::<i64, _>("max_in_flight").max(1) as usize,
        last_success_at: row.get("last_success_at"),
        last_error: row.get("last_error"),
    }
}

impl Store {
    /// A bot's webhook.
    pub async fn webhook(&self, bot: &str) -> Result<Option<Webhook>, StoreError> {
        let row = query("SELECT * FROM webhooks WHERE bot_jid = $1")
            .bind(bot)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref()
            .map(|r| Ok(webhook_from_row(r, self.open_secret(bot, r.get("secret"))?)))
            .transpose()
    }

    /// Every bot's webhook, by bot JID (start-up: one query instead of one per bot).
    pub async fn webhooks(&self) -> Result<std::collections::HashMap<String, Webhook>, StoreError> {
        let rows = query("SELECT * FROM webhooks")
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let bot: String = r.get("bot_jid");
                let secret = self.open_secret(&bot, r.get("secret"))?;
                Ok((bot, webhook_from_row(r, secret)))
            })
            .collect()
    }

    /// Sets a bot's webhook.
    pub async fn put_webhook(&self, bot: &str, hook: &Webhook) -> Result<(), StoreError> {
        query(
            "INSERT INTO webhooks (bot_jid, url, secret, timeout_ms, max_in_flight, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT(bot_jid) DO UPDATE SET url = excluded.url, secret = excluded.secret, timeout_ms = excluded.timeout_ms, \
             max_in_flight = excluded.max_in_flight, updated_at = excluded.updated_at, last_error = NULL",
        )
        .bind(bot)
        .bind(&hook.url)
        .bind(self.seal_secret(bot, hook.secret.expose()))
        .bind(hook.timeout_ms as i64)
        .bind(hook.max_in_flight as i64)
        .bind(now())
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Removes a bot's webhook; `false` when it had none.
    pub async fn delete_webhook(&self, bot: &str) -> Result<bool, StoreError> {
        let done = query("DELETE FROM webhooks WHERE bot_jid = $1")
            .bind(bot)
            .execute(self.writer())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Pending events after `after`, oldest first.
    pub async fn pending_events(
        &self,
        bot: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<PendingEvent>, StoreError> {
        let rows = query(
            "SELECT id, seq, type, bot_jid, occurred_at, tunnel_id, peer, data, attempts, first_attempt_ms, next_attempt_ms \
             FROM events WHERE bot_jid = $1 AND state = 0 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(bot)
        .bind(after as i64)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|row| PendingEvent {
                event: super::events::event_from_row(row),
                attempts: row.get::<i64, _>("attempts") as u32,
                first_attempt_ms: row.get("first_attempt_ms"),
                next_attempt_ms: row.get("next_attempt_ms"),
            })
            .collect())
    }

    /// Records an attempt and its outcome in one transaction.
    pub async fn record_attempt(
        &self,
        bot: &str,
        attempt: &Attempt,
        first_attempt_ms: i64,
        outcome: &Outcome,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer().begin().await?;
        query(
            "INSERT INTO delivery_attempts (bot_jid, event_id, seq, at, status, error, duration_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(bot)
        .bind(&attempt.event_id)
        .bind(attempt.seq as i64)
        .bind(&attempt.at)
        .bind(attempt.status.map(i64::from))
        .bind(&attempt.error)
        .bind(attempt.duration_ms as i64)
        .execute(&mut tx)
        .await?;
        let (state, next) = match outcome {
            Outcome::Delivered => (ACKED, None),
            Outcome::Retry { at_ms } => (PENDING, Some(*at_ms)),
            Outcome::Dead => (DEAD, None),
        };
        query(
            "UPDATE events SET state = $1, attempts = attempts + 1, first_attempt_ms = COALESCE(first_attempt_ms, $2), \
             next_attempt_ms = $3, last_error = $4, acked_at = CASE WHEN $5 = 1 THEN $6 ELSE acked_at END \
             WHERE bot_jid = $7 AND seq = $8 AND state = 0",
        )
        .bind(state)
        .bind(first_attempt_ms)
        .bind(next)
        .bind(&attempt.error)
        .bind(state)
        .bind(&attempt.at)
        .bind(bot)
        .bind(attempt.seq as i64)
        .execute(&mut tx)
        .await?;
        let delivered = matches!(outcome, Outcome::Delivered);
        query(
            "UPDATE webhooks SET last_success_at = CASE WHEN $1 THEN $2 ELSE last_success_at END, \
             last_error = CASE WHEN $1 THEN last_error ELSE $3 END WHERE bot_jid = $4",
        )
        .bind(delivered)
        .bind(&attempt.at)
        .bind(&attempt.error)
        .bind(bot)
        .execute(&mut tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The latest attempts, newest first.
    pub async fn attempts(&self, bot: &str, limit: u32) -> Result<Vec<Attempt>, StoreError> {
        let rows = query(
            "SELECT event_id, seq, at, status, error, duration_ms FROM delivery_attempts WHERE bot_jid = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(bot)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|row| Attempt {
                event_id: row.get("event_id"),
                seq: row.get::<i64, _>("seq") as u64,
                at: row.get("at"),
                status: row.get::<Option<i64>, _>("status").map(|s| s as u16),
                error: row.get("error"),
                duration_ms: row.get::<i64, _>("duration_ms") as u64,
            })
            .collect())
    }

    /// Every dead letter, oldest first.
    pub async fn dead_letters(&self, bot: &str) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = query(
            "SELECT id, seq, type, attempts, last_error FROM events WHERE bot_jid = $1 AND state = 2 ORDER BY seq",
        )
        .bind(bot)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|row| DeadLetter {
                event_id: row.get("id"),
                seq: row.get::<i64, _>("seq") as u64,
                kind: row.get("type"),
                attempts: row.get::<i64, _>("attempts") as u32,
                last_error: row.get("last_error"),
            })
            .collect())
    }

    /// Pending and dead event counts.
    pub async fn event_counts(&self, bot: &str) -> Result<(u64, u64), StoreError> {
        let row = query(
            "SELECT COUNT(*) FILTER (WHERE state = 0) AS pending, COUNT(*) FILTER (WHERE state = 2) AS dead \
             FROM events WHERE bot_jid = $1",
        )
        .bind(bot)
        .fetch_one(self.pool())
        .await?;
        Ok((
            row.get::<i64, _>("pending") as u64,
            row.get::<i64, _>("dead") as u64,
        ))
    }

    /// Puts dead letters (all, or those `seq`s) back in the queue; returns how many.
    pub async fn retry_dead(&self, bot: &str, seqs: Option<&[u64]>) -> Result<u64, StoreError> {
        self.update_dead(
            bot,
            seqs,
            "UPDATE events SET state = 0, attempts = 0, first_attempt_ms = NULL, next_attempt_ms = NULL",
        )
        .await
    }

    /// Deletes dead letters (all, or those `seq`s); returns how many.
    pub async fn drop_dead(&self, bot: &str, seqs: Option<&[u64]>) -> Result<u64, StoreError> {
        self.update_dead(bot, seqs, "DELETE FROM events").await
    }

    async fn update_dead(
        &self,
        bot: &str,
        seqs: Option<&[u64]>,
        action: &str,
    ) -> Result<u64, StoreError> {
        let mut tx = self.writer().begin().await?;
        let mut total = 0;
        let base = format!("{action} WHERE bot_jid = $1 AND state = 2");
        match seqs {
            None => {
                total += query(base.clone())
                    .bind(bot)
                    .execute(&mut tx)
                    .await?
                    .rows_affected();
            }
            Some(seqs) => {
                for seq in seqs {
                    total += query(format!("{base} AND seq = $2"))
                        .bind(bot)
                        .bind(*seq as i64)
                        .execute(&mut tx)
                        .await?
                        .rows_affected();
                }
            }
        }
        tx.commit().await?;
        Ok(total)
    }
}
