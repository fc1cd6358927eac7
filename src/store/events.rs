//! The per-bot event logs, their delivery states and the shared cursor.

use super::db::{Row, query};
use serde::Serialize;
use serde_json::Value;

use super::{Store, StoreError, TunnelId, now};

/// Pending delivery.
pub const PENDING: i64 = 0;

/// Acknowledged by a reader.
pub const ACKED: i64 = 1;

/// Given up on by the webhook deliverer.
pub const DEAD: i64 = 2;

/// An event about to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The event type, e.g. `message.received`.
    pub kind: &'static str,
    /// The tunnel it belongs to.
    pub tunnel_id: Option<TunnelId>,
    /// The peer's JID.
    pub peer: Option<String>,
    /// Type-specific payload.
    pub data: Value,
}

/// One stored event: the envelope every reader sees.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct EventRecord {
    /// Stable id (the webhook id).
    pub id: String,
    /// Per-bot sequence number.
    pub seq: u64,
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The bot's bare JID.
    pub bot: String,
    /// When it happened.
    pub occurred_at: String,
    /// The tunnel it belongs to.
    pub tunnel_id: Option<TunnelId>,
    /// The peer's JID.
    pub peer: Option<String>,
    /// Type-specific payload.
    pub data: Value,
}

const EVENT_COLUMNS: &str = "id, seq, type, bot_jid, occurred_at, tunnel_id, peer, data";

pub(super) fn event_from_row(row: &Row) -> EventRecord {
    let data: String = row.get("data");
    EventRecord {
        id: row.get("id"),
        seq: row.get::<i64, _>("seq") as u64,
        kind: row.get("type"),
        bot: row.get("bot_jid"),
        occurred_at: row.get("occurred_at"),
        tunnel_id: row.get("tunnel_id"),
        peer: row.get("peer"),
        data: serde_json::from_str(&data).unwrap_or(Value::Null),
    }
}

/// A fresh event id.
pub fn event_id() -> String {
    format!(
        "evt_{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

impl Store {
    /// The highest `seq` ever given to an event of this bot.
    pub async fn last_seq(&self, bot: &str) -> Result<u64, StoreError> {
        let row = query("SELECT last_seq FROM bots WHERE jid = $1")
            .bind(bot)
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("bot {bot}")))?;
        Ok(row.get::<i64, _>(0) as u64)
    }

    /// Appends events with `seq` from `after + 1`, in one transaction (fenced by `lease` when
    /// given); returns them as stored.
    pub async fn append_events(
        &self,
        bot: &str,
        after: u64,
        events: &[NewEvent],
        lease: Option<&super::Lease>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut tx = self.begin_for(lease).await?;
        // Claim the seq range first: a writer that lost track of it cannot fork the log.
        let last = after + events.len() as u64;
        let done = query("UPDATE bots SET last_seq = $1 WHERE jid = $2 AND last_seq = $3")
            .bind(last as i64)
            .bind(bot)
            .bind(after as i64)
            .execute(&mut tx)
            .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!(
                "event log of {bot} moved past seq {after}"
            )));
        }
        let mut stored = Vec::with_capacity(events.len());
        let occurred_at = now();
        for (i, e) in events.iter().enumerate() {
            let record = EventRecord {
                id: event_id(),
                seq: after + 1 + i as u64,
                kind: e.kind.to_owned(),
                bot: bot.to_owned(),
                occurred_at: occurred_at.clone(),
                tunnel_id: e.tunnel_id.clone(),
                peer: e.peer.clone(),
                data: e.data.clone(),
            };
            query(
                "INSERT INTO events (bot_jid, seq, id, type, tunnel_id, peer, occurred_at, data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(bot)
            .bind(record.seq as i64)
            .bind(&record.id)
            .bind(&record.kind)
            .bind(&record.tunnel_id)
            .bind(&record.peer)
            .bind(&record.occurred_at)
            .bind(record.data.to_string())
            .execute(&mut tx)
            .await?;
            stored.push(record);
        }
        tx.commit().await?;
        Ok(stored)
    }

    /// Up to `limit` events with `seq > after`, oldest first; with `pending_only`, only
    /// those no reader has acknowledged yet.
    pub async fn read_events(
        &self,
        bot: &str,
        after: u64,
        limit: u32,
        pending_only: bool,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let rows = query(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE bot_jid = $1 AND seq > $2 AND (state = 0 OR NOT $3) ORDER BY seq LIMIT $4"
        ))
        .bind(bot)
        .bind(after as i64)
        .bind(pending_only)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(event_from_row).collect())
    }

    /// One event by `seq`.
    pub async fn event(&self, bot: &str, seq: u64) -> Result<Option<EventRecord>, StoreError> {
        let row = query(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE bot_jid = $1 AND seq = $2"
        ))
        .bind(bot)
        .bind(seq as i64)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(event_from_row))
    }

    /// An event's delivery state ([`PENDING`], [`ACKED`] or [`DEAD`]); `None` once deleted.
    pub async fn event_state(&self, bot: &str, seq: u64) -> Result<Option<i64>, StoreError> {
        let row = query("SELECT state FROM events WHERE bot_jid = $1 AND seq = $2")
            .bind(bot)
            .bind(seq as i64)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Events no reader has acknowledged yet, over all bots.
    pub async fn pending_total(&self) -> Result<u64, StoreError> {
        let row = query("SELECT COUNT(*) FROM events WHERE state = 0")
            .fetch_one(self.pool())
            .await?;
        Ok(row.get::<i64, _>(0) as u64)
    }

    /// The bot's cursor: every event up to it is acknowledged or dead.
    pub async fn cursor(&self, bot: &str) -> Result<u64, StoreError> {
        let row = query(
            "SELECT COALESCE((SELECT MIN(seq) - 1 FROM events WHERE bot_jid = $1 AND state = 0), (SELECT last_seq FROM bots WHERE jid = $1), 0)",
        )
        .bind(bot)
        .fetch_one(self.pool())
        .await?;
        Ok(row.get::<i64, _>(0) as u64)
    }

    /// Acknowledges every pending event up to `seq`; returns the new cursor.
    pub async fn ack_through(&self, bot: &str, seq: u64) -> Result<u64, StoreError> {
        query(
            "UPDATE events SET state = 1, acked_at = $1 WHERE bot_jid = $2 AND seq <= $3 AND state = 0",
        )
        .bind(now())
        .bind(bot)
        .bind(seq as i64)
        .execute(self.writer())
        .await?;
        self.cursor(bot).await
    }

    /// Deletes acknowledged events, delivery attempts and finished messages older than
    /// `before` (RFC 3339).
    pub async fn prune_events(&self, before: &str) -> Result<u64, StoreError> {
        let done = query("DELETE FROM events WHERE state = 1 AND occurred_at < $1")
            .bind(before)
            .execute(self.writer())
            .await?;
        query("DELETE FROM delivery_attempts WHERE at < $1")
            .bind(before)
            .execute(self.writer())
            .await?;
        let finished = super::params(2, super::MessageStatus::finals().count());
        let sql = format!("DELETE FROM messages WHERE created_at < $1 AND status IN ({finished})");
        let mut query = query(sql).bind(before);
        for status in super::MessageStatus::finals() {
            query = query.bind(status);
        }
        query.execute(self.writer()).await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewEvent;
    use crate::store::tests::TestDb;
    use xtls::certs::BotIdentity;

    on_each_backend!(append_read_acknowledge_and_prune);

    async fn append_read_acknowledge_and_prune(db: TestDb) {
        let store = Store::open(&db.url).await.unwrap();
        let jid = "weather@bots.example.org";
        let bot = super::super::tests::test_bot("weather", crate::config::Handler::Api);
        assert_eq!(bot.jid, jid);
        store
            .insert_bot(&bot, &BotIdentity::generate(jid).unwrap())
            .await
            .unwrap();
        let event = |n: u32| NewEvent {
            kind: "message.received",
            tunnel_id: Some(format!("t{}", n % 2).into()),
            peer: Some("alice@example.net/a".into()),
            data: serde_json::json!({ "body": n.to_string() }),
        };
        let stored = store
            .append_events(jid, 0, &[event(1), event(2), event(3)], None)
            .await
            .unwrap();
        assert_eq!(stored.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(
            matches!(
                store.append_events(jid, 2, &[event(4)], None).await,
                Err(StoreError::Conflict(_))
            ),
            "a writer that lost track of seq cannot fork the log"
        );
        assert_eq!(store.last_seq(jid).await.unwrap(), 3);
        assert_eq!(
            store.read_events(jid, 1, 10, false).await.unwrap(),
            stored[1..]
        );
        assert_eq!(store.cursor(jid).await.unwrap(), 0);
        assert_eq!(store.ack_through(jid, 2).await.unwrap(), 2);
        assert_eq!(store.ack_through(jid, 99).await.unwrap(), 3);
        // Nothing is pruned before its time; acknowledged events are after it.
        assert_eq!(store.prune_events("2000-01-01T00:00:00Z").await.unwrap(), 0);
        assert_eq!(store.prune_events("9999-01-01T00:00:00Z").await.unwrap(), 3);
        assert_eq!(store.cursor(jid).await.unwrap(), 3, "the cursor survives");
        store.close().await;
    }
}
