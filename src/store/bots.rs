//! Bots, their keys and certificates.

use super::db::{Row, query};
use serde::Serialize;

use super::{Store, StoreError, named};
use crate::config::{BotTrust, Handler};
use xtls::certs::BotIdentity;
use xtls::tunnel::PeerAuth;

/// A bot as stored.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BotRecord {
    /// Normalized bare JID.
    pub jid: String,
    /// The localpart.
    pub localpart: String,
    /// What the bot does with what reaches it.
    pub handler: Handler,
    /// Whether peers must present a certificate.
    pub peer_auth: PeerAuth,
    /// How peer keys are trusted.
    pub trust: BotTrust,
    /// Whether messages sent in clear are refused instead of delivered marked as such.
    pub encrypted_only: bool,
    /// Creation time.
    pub created_at: String,
}

/// A bot as stored: its record, its key and certificate (DER), its last event `seq`.
#[derive(Debug, Clone)]
pub struct StoredBot {
    /// The bot's row.
    pub record: BotRecord,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The highest `seq` given to an event of this bot.
    pub last_seq: u64,
}

/// The columns a bot is started from.
const LOAD_BOT: &str = "SELECT b.jid, b.localpart, b.handler, b.peer_auth, b.trust, b.encrypted_only, \
     b.created_at, b.last_seq, k.key_der, k.cert_der FROM bots b LEFT JOIN bot_keys k ON k.bot_jid = b.jid";

impl Store {
    /// Creates a bot with its identity in one transaction.
    pub async fn insert_bot(
        &self,
        bot: &BotRecord,
        identity: &BotIdentity,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        let inserted = query(
            "INSERT INTO bots (jid, localpart, handler, peer_auth, trust, encrypted_only, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&bot.jid)
        .bind(&bot.localpart)
        .bind(bot.handler.as_str())
        .bind(bot.peer_auth.as_str())
        .bind(bot.trust.as_str())
        .bind(bot.encrypted_only)
        .bind(&bot.created_at)
        .execute(&mut tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Duplicate(format!("bot {}", bot.jid)));
        }
        query(
            "INSERT INTO bot_keys (bot_jid, key_der, cert_der, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&bot.jid)
        .bind(self.seal_key(&bot.jid, identity.key_der()))
        .bind(identity.cert_der().as_ref())
        .bind(&bot.created_at)
        .execute(&mut tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every bot, by JID.
    pub async fn list_bots(&self) -> Result<Vec<BotRecord>, StoreError> {
        let rows = query(
            "SELECT jid, localpart, handler, peer_auth, trust, encrypted_only, created_at FROM bots ORDER BY jid",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(bot_from_row).collect()
    }

    /// Every bot with its stored key, certificate and last event `seq`, in one query (the
    /// tests'; start-up reads a page at a time with [`Store::load_bots_after`]).
    #[cfg(test)]
    pub async fn load_bots(&self) -> Result<Vec<StoredBot>, StoreError> {
        self.load_bots_after("", i64::MAX).await
    }

    /// At most `limit` bots whose JID sorts after `after` (`""`: from the first), by JID,
    /// each with its stored key, certificate and last event `seq`: start-up reads the bots a
    /// page at a time, so that its memory peak is a page, not every bot's key at once.
    pub async fn load_bots_after(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<StoredBot>, StoreError> {
        let rows = query(format!(
            "{LOAD_BOT} WHERE b.jid > $1 ORDER BY b.jid LIMIT $2"
        ))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| self.stored_bot(r)).collect()
    }

    /// The named bots that exist, each with its stored key, certificate and last event `seq`,
    /// as they are now (another instance may have created or changed them), by JID.
    pub async fn load_bots_named(&self, jids: &[String]) -> Result<Vec<StoredBot>, StoreError> {
        let mut loaded = Vec::with_capacity(jids.len());
        // Within any database's limit on the parameters of one query.
        for part in jids.chunks(512) {
            let sql = format!(
                "{LOAD_BOT} WHERE b.jid IN ({}) ORDER BY b.jid",
                super::params(1, part.len())
            );
            let mut q = query(sql);
            for jid in part {
                q = q.bind(jid);
            }
            for r in q.fetch_all(&self.pool).await? {
                loaded.push(self.stored_bot(&r)?);
            }
        }
        Ok(loaded)
    }

    fn stored_bot(&self, r: &Row) -> Result<StoredBot, StoreError> {
        let record = bot_from_row(r)?;
        let (Some(key_der), Some(cert_der)) = (
            r.get::<Option<Vec<u8>>, _>("key_der"),
            r.get::<Option<Vec<u8>>, _>("cert_der"),
        ) else {
            return Err(StoreError::NotFound(format!("key of bot {}", record.jid)));
        };
        Ok(StoredBot {
            last_seq: r.get::<i64, _>("last_seq") as u64,
            key_der: self.open_key(&record.jid, key_der)?,
            record,
            cert_der,
        })
    }

    /// The stored identity of a bot.
    pub async fn load_identity(&self, jid: &str) -> Result<BotIdentity, StoreError> {
        let row = query("SELECT key_der, cert_der FROM bot_keys WHERE bot_jid = $1")
            .bind(jid)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key of bot {jid}")))?;
        let key_der = self.open_key(jid, row.get("key_der"))?;
        Ok(BotIdentity::from_der(jid, row.get("cert_der"), key_der)?)
    }

    /// A bot's certificate (DER), without its private key: what offline tools may read with
    /// no store key.
    pub async fn load_certificate(&self, jid: &str) -> Result<Vec<u8>, StoreError> {
        let row = query("SELECT cert_der FROM bot_keys WHERE bot_jid = $1")
            .bind(jid)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("bot {jid}")))?;
        Ok(row.get("cert_der"))
    }

    /// Deletes a bot, its key and its pins; `false` when it did not exist.
    pub async fn delete_bot(&self, jid: &str) -> Result<bool, StoreError> {
        let done = query("DELETE FROM bots WHERE jid = $1")
            .bind(jid)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Sets a bot's clear-text policy and trust mode, auditing a change of trust mode as
    /// `actor`'s; `false` when the bot does not exist.
    pub async fn set_policy(
        &self,
        jid: &str,
        encrypted_only: bool,
        trust: BotTrust,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.writer.begin().await?;
        let Some(before) = query("SELECT trust FROM bots WHERE jid = $1")
            .bind(jid)
            .fetch_optional(&mut tx)
            .await?
        else {
            return Ok(false);
        };
        let before: BotTrust = before.try_get::<&str, _>(0)?.parse()?;
        query("UPDATE bots SET encrypted_only = $1, trust = $2 WHERE jid = $3")
            .bind(encrypted_only)
            .bind(trust.as_str())
            .bind(jid)
            .execute(&mut tx)
            .await?;
        if before != trust {
            let entry = super::pins::Audit {
                action: super::PinAction::TrustSet,
                spki: None,
                compared: None,
                trust: Some(trust),
            };
            super::pins::audit(&mut tx, &super::now(), actor, jid, None, entry).await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}

fn bot_from_row(r: &Row) -> Result<BotRecord, StoreError> {
    Ok(BotRecord {
        jid: r.try_get("jid")?,
        localpart: r.try_get("localpart")?,
        handler: named(r, "handler")?,
        peer_auth: named(r, "peer_auth")?,
        trust: named(r, "trust")?,
        encrypted_only: r.try_get("encrypted_only")?,
        created_at: r.try_get("created_at")?,
    })
}
