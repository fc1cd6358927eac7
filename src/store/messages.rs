//! Messages a bot sends, their status history and idempotency keys.

use super::db::{Row, query, query_each};
use minidom::Element;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Store, StoreError, TunnelId, now};

/// A message a bot asked to send.
#[derive(Debug, Clone)]
pub struct OutMsg {
    /// `msg_…`.
    pub id: String,
    /// The recipient as given (full or bare JID), normalized.
    pub to: String,
    /// The inner stanza.
    pub stanza: Element,
    /// Whether a message whose tunnel ended before its acknowledgement goes out on a new one.
    pub reopen: bool,
}

/// Where a message a bot sends stands (docs/bot-api.md, *Writing*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// Stored; nothing tried yet.
    Accepted,
    /// Waiting behind the window of a live tunnel.
    Queued,
    /// Waiting for a tunnel the bot is opening as initiator.
    Opening,
    /// In `data` IQs, not yet acknowledged by the peer.
    Sent,
    /// The peer acknowledged every `data` carrying it. Final.
    Acknowledged,
    /// It could not be delivered. Final.
    Failed,
    /// The peer's client does not announce XTLS. Final.
    NoXtlsSupport,
    /// The peer refused our `start`. Final.
    Refused,
    /// The peer answered our `start` that it is busy (a `wait` error); a later try may work.
    /// Final.
    PeerBusy,
    /// The peer's own `start` to the bot crossed ours and won the tie-break. Messages that
    /// were only waiting go out through the peer's tunnel instead; this status is for one
    /// that had already been written into the lost tunnel. Final.
    Conflict,
    /// The peer presented a key other than the one pinned for it. Final.
    IdentityChanged,
    /// The peer is offline or unknown. Final.
    PeerUnavailable,
    /// Not taken: a limit or the store refused it for now (the submitter may retry).
    RateLimited,
}

impl MessageStatus {
    /// Every status.
    pub const ALL: &'static [MessageStatus] = &[
        MessageStatus::Accepted,
        MessageStatus::Queued,
        MessageStatus::Opening,
        MessageStatus::Sent,
        MessageStatus::Acknowledged,
        MessageStatus::Failed,
        MessageStatus::NoXtlsSupport,
        MessageStatus::Refused,
        MessageStatus::PeerBusy,
        MessageStatus::Conflict,
        MessageStatus::IdentityChanged,
        MessageStatus::PeerUnavailable,
        MessageStatus::RateLimited,
    ];

    /// The statuses after which nothing more happens to a message, in [`Self::ALL`]'s order.
    pub fn finals() -> impl Iterator<Item = MessageStatus> {
        Self::ALL.iter().copied().filter(|s| s.is_final())
    }

    /// The stable name (as in JSON and the store).
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Accepted => "accepted",
            MessageStatus::Queued => "queued",
            MessageStatus::Opening => "opening",
            MessageStatus::Sent => "sent",
            MessageStatus::Acknowledged => "acknowledged",
            MessageStatus::Failed => "failed",
            MessageStatus::NoXtlsSupport => "no_xtls_support",
            MessageStatus::Refused => "refused",
            MessageStatus::PeerBusy => "peer_busy",
            MessageStatus::Conflict => "conflict",
            MessageStatus::IdentityChanged => "identity_changed",
            MessageStatus::PeerUnavailable => "peer_unavailable",
            MessageStatus::RateLimited => "rate_limited",
        }
    }

    /// The status of a stored name.
    fn from_name(name: &str) -> Result<MessageStatus, xtls::UnknownName> {
        MessageStatus::ALL
            .iter()
            .copied()
            .find(|s| s.as_str() == name)
            .ok_or_else(|| xtls::UnknownName {
                kind: "message status",
                value: name.to_owned(),
            })
    }

    /// Whether nothing more happens to a message with this status.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MessageStatus::Acknowledged
                | MessageStatus::Failed
                | MessageStatus::NoXtlsSupport
                | MessageStatus::Refused
                | MessageStatus::PeerBusy
                | MessageStatus::Conflict
                | MessageStatus::IdentityChanged
                | MessageStatus::PeerUnavailable
        )
    }
}

/// A stored message, as `GET .../messages/{id}` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MessageRecord {
    /// `msg_…`.
    pub id: String,
    /// The bot.
    pub bot: String,
    /// The recipient.
    pub to: String,
    /// The current status.
    pub status: MessageStatus,
    /// Why, for failures.
    pub reason: Option<String>,
    /// The tunnel that carried it.
    pub tunnel_id: Option<TunnelId>,
    /// When it was accepted.
    pub created_at: String,
    /// Every status with its time.
    pub history: Value,
}

impl From<MessageStatus> for super::db::Value {
    fn from(status: MessageStatus) -> Self {
        status.as_str().into()
    }
}

fn message_from_row(row: &Row) -> Result<MessageRecord, StoreError> {
    let history: String = row.try_get("history")?;
    Ok(MessageRecord {
        id: row.try_get("id")?,
        bot: row.try_get("bot_jid")?,
        to: row.try_get("to_jid")?,
        status: MessageStatus::from_name(row.try_get("status")?)?,
        reason: row.try_get("reason")?,
        tunnel_id: row.try_get("tunnel_id")?,
        created_at: row.try_get("created_at")?,
        history: serde_json::from_str(&history).unwrap_or(Value::Null),
    })
}

impl Store {
    /// Stores a message as accepted; `Err(Duplicate)` when the idempotency key was used.
    pub async fn insert_message(
        &self,
        bot: &str,
        msg: &OutMsg,
        idempotency_key: Option<&str>,
    ) -> Result<(), StoreError> {
        let at = now();
        let history = json!([{ "status": MessageStatus::Accepted, "at": at }]).to_string();
        let stanza = String::from_utf8_lossy(&xtls::xml::to_bytes(&msg.stanza)).into_owned();
        let done = query(
            "INSERT INTO messages (id, bot_jid, idempotency_key, to_jid, stanza, reopen, status, history, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
        )
        .bind(&msg.id)
        .bind(bot)
        .bind(idempotency_key)
        .bind(&msg.to)
        .bind(stanza)
        .bind(msg.reopen)
        .bind(MessageStatus::Accepted)
        .bind(history)
        .bind(at)
        .execute(self.writer())
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Duplicate("idempotency key".into()));
        }
        Ok(())
    }

    /// Moves a message to a new status, appending it to the history (fenced by `lease` when
    /// given).
    pub async fn update_message(
        &self,
        id: &str,
        status: MessageStatus,
        reason: Option<&str>,
        lease: Option<&super::Lease>,
    ) -> Result<(), StoreError> {
        let update = query_each(
            "UPDATE messages SET status = $1, reason = $2, \
             history = json_insert(history, '$[#]', json_object('status', $1, 'at', $3, 'reason', $2)) WHERE id = $4",
            "UPDATE messages SET status = $1, reason = $2, \
             history = (history::jsonb || jsonb_build_array(jsonb_build_object('status', $1::text, 'at', $3::text, 'reason', $2::text)))::text \
             WHERE id = $4",
        )
        .bind(status)
        .bind(reason)
        .bind(now())
        .bind(id);
        self.write_for(lease, update).await
    }

    /// Records the tunnel that carries a message (fenced by `lease` when given).
    pub async fn set_message_tunnel(
        &self,
        id: &str,
        tunnel_id: &TunnelId,
        lease: Option<&super::Lease>,
    ) -> Result<(), StoreError> {
        let update = query("UPDATE messages SET tunnel_id = $1 WHERE id = $2")
            .bind(tunnel_id)
            .bind(id);
        self.write_for(lease, update).await
    }

    /// Removes a message that was not accepted.
    pub async fn delete_message(&self, id: &str) -> Result<(), StoreError> {
        query("DELETE FROM messages WHERE id = $1")
            .bind(id)
            .execute(self.writer())
            .await?;
        Ok(())
    }

    /// One message of a bot.
    pub async fn message(&self, bot: &str, id: &str) -> Result<Option<MessageRecord>, StoreError> {
        let row = query("SELECT * FROM messages WHERE bot_jid = $1 AND id = $2")
            .bind(bot)
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(message_from_row).transpose()
    }

    /// The message a bot stored under an idempotency key.
    pub async fn message_by_key(
        &self,
        bot: &str,
        key: &str,
    ) -> Result<Option<MessageRecord>, StoreError> {
        let row = query("SELECT * FROM messages WHERE bot_jid = $1 AND idempotency_key = $2")
            .bind(bot)
            .bind(key)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(message_from_row).transpose()
    }

    /// The bots with messages that have not reached a final status (start-up).
    pub(crate) async fn bots_with_unfinished_messages(
        &self,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let placeholders = super::params(1, MessageStatus::finals().count());
        let sql =
            format!("SELECT DISTINCT bot_jid FROM messages WHERE status NOT IN ({placeholders})");
        let mut query = query(sql);
        for status in MessageStatus::finals() {
            query = query.bind(status);
        }
        let rows = query.fetch_all(self.pool()).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// A bot's messages that have not reached a final status, oldest first.
    /// Messages accepted before `before` (by an earlier run) are the ones to recover; later
    /// ones are in the hands of this run already.
    pub async fn unfinished_messages(
        &self,
        bot: &str,
        before: &str,
    ) -> Result<Vec<OutMsg>, StoreError> {
        let placeholders = super::params(3, MessageStatus::finals().count());
        let sql = format!(
            "SELECT id, to_jid, stanza, reopen FROM messages WHERE bot_jid = $1 AND created_at < $2 AND status NOT IN ({placeholders}) ORDER BY created_at"
        );
        let mut query = query(sql).bind(bot).bind(before);
        for status in MessageStatus::finals() {
            query = query.bind(status);
        }
        let rows = query.fetch_all(self.pool()).await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let stanza = xtls::xml::parse_stanza(&row.get::<String, _>("stanza")).ok()?;
                Some(OutMsg {
                    id: row.get("id"),
                    to: row.get("to_jid"),
                    stanza,
                    reopen: row.get("reopen"),
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::MessageStatus;

    #[test]
    fn a_status_has_one_name_in_json_in_the_store_and_in_words() {
        for status in MessageStatus::ALL {
            let json = serde_json::to_value(status).unwrap();
            assert_eq!(json, status.as_str(), "{status:?}");
            let back: MessageStatus = serde_json::from_value(json).unwrap();
            assert_eq!(back, *status);
        }
        let finals: Vec<&str> = MessageStatus::finals().map(MessageStatus::as_str).collect();
        assert_eq!(
            finals,
            [
                "acknowledged",
                "failed",
                "no_xtls_support",
                "refused",
                "peer_busy",
                "conflict",
                "identity_changed",
                "peer_unavailable"
            ]
        );
    }
}
