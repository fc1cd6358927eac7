//! The keys bots pin for their peers, and the audit log of every decision about them.
//!
//! A peer (bare JID) may hold several pins on one bot: one per device or key. Trust on first
//! use pins a key only while the peer has none, in one statement, so two handshakes that
//! race for the first pin cannot both win. Whoever changes a pin over the API (approves,
//! verifies, removes a key) is written to `trust_audit` in the same transaction.

use super::db::{Row, query};
use serde::Serialize;

use super::{Store, StoreError, now};
use crate::config::BotTrust;
use xtls::certs::Fingerprint;

/// A pinned peer key.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PeerPin {
    /// The peer's bare JID.
    pub peer: String,
    /// SPKI SHA-256, colon hex.
    pub spki_sha256: String,
    /// Whether someone confirmed the key out of band.
    pub verified: bool,
    /// When the key was first seen (or pinned over the API).
    pub first_seen: String,
    /// When the key was last seen in a handshake.
    pub last_seen: String,
    /// When it was verified.
    pub verified_at: Option<String>,
    /// Who verified it: `admin` or `bot-token:<id>`.
    pub verified_by: Option<String>,
    /// What the verifier said they compared: a fingerprint, or `sas:<code>` when a short
    /// authentication string was confirmed.
    pub compared: Option<String>,
}

/// What trust on first use did with a key that no pin matched when the handshake began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstUse {
    /// The peer had no pin: this key is pinned now.
    Pinned,
    /// The key was pinned meanwhile (an earlier handshake of the same key): seen again.
    AlreadyPinned,
    /// Another key was pinned first: these are the peer's pins, and this key is not one.
    Lost(Vec<Fingerprint>),
    /// The pin the handshake matched was removed meanwhile.
    Removed,
}

/// A change to a pin made over the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PinAction {
    /// A key pinned because it was the peer's first (trust on first use).
    PinnedOnFirstUse,
    /// A key pinned, not verified, by someone.
    Approved,
    /// A key pinned or marked verified by someone who compared it.
    Verified,
    /// A verified key marked unverified again.
    Unverified,
    /// A pin removed.
    Removed,
    /// The peer's own trust mode set, or cleared (the bot's applies again).
    TrustSet,
    /// The bot's next certificate announced (no peer; the key is the next one's).
    CertificateRotated,
    /// The bot's next certificate made the active one (no peer; the key is the new one's).
    CertificateActivated,
}

impl PinAction {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            PinAction::PinnedOnFirstUse => "pinned_on_first_use",
            PinAction::Approved => "approved",
            PinAction::Verified => "verified",
            PinAction::Unverified => "unverified",
            PinAction::Removed => "removed",
            PinAction::TrustSet => "trust_set",
            PinAction::CertificateRotated => "certificate_rotated",
            PinAction::CertificateActivated => "certificate_activated",
        }
    }
}

impl std::str::FromStr for PinAction {
    type Err = xtls::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            PinAction::PinnedOnFirstUse,
            PinAction::Approved,
            PinAction::Verified,
            PinAction::Unverified,
            PinAction::Removed,
            PinAction::TrustSet,
            PinAction::CertificateRotated,
            PinAction::CertificateActivated,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
        .ok_or_else(|| xtls::UnknownName {
            kind: "pin action",
            value: s.to_owned(),
        })
    }
}

/// One trust decision, as the audit log keeps it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Position in the log, increasing.
    pub seq: i64,
    /// When.
    pub at: String,
    /// Who: `admin`, `bot-token:<id>`, or `component` for trust on first use.
    pub actor: String,
    /// What.
    pub action: PinAction,
    /// The bot.
    pub bot: String,
    /// The peer's bare JID; none for a decision about the bot itself (its trust mode, its
    /// certificate).
    pub peer: Option<String>,
    /// The key, SPKI SHA-256: the peer's, or the bot's own for a certificate action (none for
    /// `trust_set`).
    pub spki_sha256: Option<String>,
    /// The fingerprint the actor said they compared, if any.
    pub compared: Option<String>,
    /// For `trust_set`: the trust mode set (the peer's, or the bot's when there is no peer);
    /// none when a peer's was cleared.
    pub trust: Option<BotTrust>,
}

/// A pin to set over the API.
#[derive(Debug, Clone)]
pub struct PinChange<'a> {
    /// The bot.
    pub bot: &'a str,
    /// The peer's bare JID.
    pub peer: &'a str,
    /// The key.
    pub spki: &'a Fingerprint,
    /// Verified (someone compared it) or merely approved.
    pub verified: bool,
    /// What the actor compared, when they say: a fingerprint, or `sas:<code>` for a short
    /// authentication string.
    pub compared: Option<String>,
    /// Who: `admin` or `bot-token:<id>`.
    pub actor: &'a str,
}

const PIN_COLUMNS: &str =
    "peer, spki_sha256, verified, first_seen, last_seen, verified_at, verified_by, compared";

impl Store {
    /// The SPKI pins a bot holds for a peer bare JID.
    pub async fn pins(&self, bot: &str, peer: &str) -> Result<Vec<Fingerprint>, StoreError> {
        Ok(self.accepted_pins(bot, peer, false).await?.0)
    }

    /// In one query, the pins a trust mode accepts for a peer (all of them, or the verified
    /// ones) and the offer key names (lowercase hex SHA-1 and SHA-256) of the certificates
    /// seen with them: what a new tunnel's policy is made of.
    pub async fn accepted_pins(
        &self,
        bot: &str,
        peer: &str,
        verified_only: bool,
    ) -> Result<(Vec<Fingerprint>, Vec<String>), StoreError> {
        let rows = query(
            "SELECT spki_sha256, cert_der FROM peer_pins \
             WHERE bot_jid = $1 AND peer = $2 AND (verified OR NOT $3)",
        )
        .bind(bot)
        .bind(peer)
        .bind(verified_only)
        .fetch_all(&self.pool)
        .await?;
        let (mut pins, mut names) = (Vec::with_capacity(rows.len()), Vec::new());
        for row in &rows {
            // An unreadable pin is an error, never skipped: without it, trust on first use
            // would pin whatever key came next.
            let stored: &str = row.try_get("spki_sha256")?;
            pins.push(Fingerprint::parse(stored).ok_or_else(|| {
                StoreError::Unreadable(format!("pin '{stored}' of {peer} is not a fingerprint"))
            })?);
            if let Some(der) = row.try_get::<Option<Vec<u8>>, _>("cert_der")? {
                names.push(Fingerprint::sha1(&der).to_lower_hex());
                names.push(Fingerprint::sha256(&der).to_lower_hex());
            }
        }
        Ok((pins, names))
    }

    /// Pins `spki` for `peer` only if the peer has no pin yet (trust on first use), in one
    /// statement; says what happened.
    pub async fn pin_first_use(
        &self,
        bot: &str,
        peer: &str,
        spki: &Fingerprint,
        cert_der: Option<&[u8]>,
    ) -> Result<FirstUse, StoreError> {
        let (at, key) = (now(), spki.to_string());
        let mut tx = self.writer.begin().await?;
        let inserted = query(
            "INSERT INTO peer_pins (bot_jid, peer, spki_sha256, cert_der, first_seen, last_seen) \
             SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS \
             (SELECT 1 FROM peer_pins WHERE bot_jid = $7 AND peer = $8)",
        )
        .bind(bot)
        .bind(peer)
        .bind(&key)
        .bind(cert_der)
        .bind(&at)
        .bind(&at)
        .bind(bot)
        .bind(peer)
        .execute(&mut tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            let entry = Audit::key(PinAction::PinnedOnFirstUse, &key, None);
            audit(&mut tx, &at, "component", bot, Some(peer), entry).await?;
            tx.commit().await?;
            return Ok(FirstUse::Pinned);
        }
        let seen = query(
            "UPDATE peer_pins SET last_seen = $1 WHERE bot_jid = $2 AND peer = $3 AND spki_sha256 = $4",
        )
        .bind(&at)
        .bind(bot)
        .bind(peer)
        .bind(&key)
        .execute(&mut tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        if seen {
            Ok(FirstUse::AlreadyPinned)
        } else {
            Ok(FirstUse::Lost(self.pins(bot, peer).await?))
        }
    }

    /// Notes that a pinned key was presented again (and its certificate, when there is one);
    /// `false` when the pin is gone (removed over the API meanwhile).
    pub async fn pin_seen(
        &self,
        bot: &str,
        peer: &str,
        spki: &Fingerprint,
        cert_der: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let done = query(
            "UPDATE peer_pins SET last_seen = $1, cert_der = COALESCE($2, cert_der) \
             WHERE bot_jid = $3 AND peer = $4 AND spki_sha256 = $5",
        )
        .bind(now())
        .bind(cert_der)
        .bind(bot)
        .bind(peer)
        .bind(spki.to_string())
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The peers a bot knows, with their pins.
    pub async fn list_pins(&self, bot: &str) -> Result<Vec<PeerPin>, StoreError> {
        let rows = query(format!(
            "SELECT {PIN_COLUMNS} FROM peer_pins WHERE bot_jid = $1 ORDER BY peer, first_seen"
        ))
        .bind(bot)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(pin_from_row).collect()
    }

    /// One peer's pins on a bot, oldest first.
    pub async fn peer_pins(&self, bot: &str, peer: &str) -> Result<Vec<PeerPin>, StoreError> {
        let rows = query(format!(
            "SELECT {PIN_COLUMNS} FROM peer_pins WHERE bot_jid = $1 AND peer = $2 ORDER BY first_seen"
        ))
        .bind(bot)
        .bind(peer)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(pin_from_row).collect()
    }

    /// Pins a key, or changes whether it is verified, and audits it; returns the pin,
    /// whether it is new, and the action audited.
    pub async fn set_pin(
        &self,
        change: &PinChange<'_>,
    ) -> Result<(PeerPin, bool, PinAction), StoreError> {
        let (at, key) = (now(), change.spki.to_string());
        let compared = change.compared.clone();
        let mut tx = self.writer.begin().await?;
        let before = query(
            "SELECT verified FROM peer_pins WHERE bot_jid = $1 AND peer = $2 AND spki_sha256 = $3",
        )
        .bind(change.bot)
        .bind(change.peer)
        .bind(&key)
        .fetch_optional(&mut tx)
        .await?
        .map(|r| r.get::<bool, _>(0));
        let (verified_at, verified_by) = if change.verified {
            (Some(at.as_str()), Some(change.actor))
        } else {
            (None, None)
        };
        query(
            "INSERT INTO peer_pins (bot_jid, peer, spki_sha256, verified, first_seen, last_seen, verified_at, verified_by, compared) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (bot_jid, peer, spki_sha256) DO UPDATE SET verified = excluded.verified, \
             verified_at = excluded.verified_at, verified_by = excluded.verified_by, compared = excluded.compared",
        )
        .bind(change.bot)
        .bind(change.peer)
        .bind(&key)
        .bind(change.verified)
        .bind(&at)
        .bind(&at)
        .bind(verified_at)
        .bind(verified_by)
        .bind(&compared)
        .execute(&mut tx)
        .await?;
        let action = match (before, change.verified) {
            (_, true) => PinAction::Verified,
            (Some(true), false) => PinAction::Unverified,
            (_, false) => PinAction::Approved,
        };
        let entry = Audit::key(action, &key, compared.as_deref());
        audit(
            &mut tx,
            &at,
            change.actor,
            change.bot,
            Some(change.peer),
            entry,
        )
        .await?;
        let row = query(format!(
            "SELECT {PIN_COLUMNS} FROM peer_pins WHERE bot_jid = $1 AND peer = $2 AND spki_sha256 = $3"
        ))
        .bind(change.bot)
        .bind(change.peer)
        .bind(&key)
        .fetch_one(&mut tx)
        .await?;
        tx.commit().await?;
        Ok((pin_from_row(&row)?, before.is_none(), action))
    }

    /// Removes a pin and audits it; `false` when there was none.
    pub async fn remove_pin(
        &self,
        bot: &str,
        peer: &str,
        spki: &Fingerprint,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let (at, key) = (now(), spki.to_string());
        let mut tx = self.writer.begin().await?;
        let removed =
            query("DELETE FROM peer_pins WHERE bot_jid = $1 AND peer = $2 AND spki_sha256 = $3")
                .bind(bot)
                .bind(peer)
                .bind(&key)
                .execute(&mut tx)
                .await?
                .rows_affected()
                == 1;
        if removed {
            let entry = Audit::key(PinAction::Removed, &key, None);
            audit(&mut tx, &at, actor, bot, Some(peer), entry).await?;
        }
        tx.commit().await?;
        Ok(removed)
    }

    /// A peer's own trust mode on a bot, when one is set.
    pub async fn peer_trust(&self, bot: &str, peer: &str) -> Result<Option<BotTrust>, StoreError> {
        let row = query("SELECT trust FROM peer_trust WHERE bot_jid = $1 AND peer = $2")
            .bind(bot)
            .bind(peer)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(Some(r.try_get::<&str, _>(0)?.parse()?)),
            None => Ok(None),
        }
    }

    /// Sets a peer's own trust mode on a bot (`None`: the bot's applies again) and audits it.
    pub async fn set_peer_trust(
        &self,
        bot: &str,
        peer: &str,
        trust: Option<BotTrust>,
        actor: &str,
    ) -> Result<(), StoreError> {
        let at = now();
        let mut tx = self.writer.begin().await?;
        match trust {
            Some(mode) => {
                query(
                    "INSERT INTO peer_trust (bot_jid, peer, trust, updated_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (bot_jid, peer) DO UPDATE SET trust = excluded.trust, updated_at = excluded.updated_at",
                )
                .bind(bot)
                .bind(peer)
                .bind(mode.as_str())
                .bind(&at)
                .execute(&mut tx)
                .await?;
            }
            None => {
                query("DELETE FROM peer_trust WHERE bot_jid = $1 AND peer = $2")
                    .bind(bot)
                    .bind(peer)
                    .execute(&mut tx)
                    .await?;
            }
        }
        let entry = Audit {
            action: PinAction::TrustSet,
            spki: None,
            compared: None,
            trust,
        };
        audit(&mut tx, &at, actor, bot, Some(peer), entry).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The audit log, newest first: one bot's entries, or every bot's.
    pub async fn audit_log(
        &self,
        bot: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = query(
            "SELECT seq, at, actor, action, bot_jid, peer, spki_sha256, compared, trust FROM trust_audit \
             WHERE $1 IS NULL OR bot_jid = $2 ORDER BY seq DESC LIMIT $3",
        )
        .bind(bot)
        .bind(bot)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: super::named(r, "action")?,
                    bot: r.try_get("bot_jid")?,
                    peer: r.try_get("peer")?,
                    spki_sha256: r.try_get("spki_sha256")?,
                    compared: r.try_get("compared")?,
                    trust: r
                        .try_get::<Option<&str>, _>("trust")?
                        .map(str::parse)
                        .transpose()?,
                })
            })
            .collect()
    }
}

/// What one audit entry says beside who, when, which bot and peer.
pub(super) struct Audit<'a> {
    pub(super) action: PinAction,
    pub(super) spki: Option<&'a str>,
    pub(super) compared: Option<&'a str>,
    pub(super) trust: Option<BotTrust>,
}

impl<'a> Audit<'a> {
    fn key(action: PinAction, spki: &'a str, compared: Option<&'a str>) -> Self {
        Audit {
            action,
            spki: Some(spki),
            compared,
            trust: None,
        }
    }
}

pub(super) async fn audit(
    tx: &mut super::db::Tx,
    at: &str,
    actor: &str,
    bot: &str,
    peer: Option<&str>,
    entry: Audit<'_>,
) -> Result<(), StoreError> {
    query(
        "INSERT INTO trust_audit (at, actor, action, bot_jid, peer, spki_sha256, compared, trust) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(at)
    .bind(actor)
    .bind(entry.action.as_str())
    .bind(bot)
    .bind(peer)
    .bind(entry.spki)
    .bind(entry.compared)
    .bind(entry.trust.map(BotTrust::as_str))
    .execute(tx)
    .await?;
    Ok(())
}

fn pin_from_row(r: &Row) -> Result<PeerPin, StoreError> {
    Ok(PeerPin {
        peer: r.try_get("peer")?,
        spki_sha256: r.try_get("spki_sha256")?,
        verified: r.try_get("verified")?,
        first_seen: r.try_get("first_seen")?,
        last_seen: r.try_get("last_seen")?,
        verified_at: r.try_get("verified_at")?,
        verified_by: r.try_get("verified_by")?,
        compared: r.try_get("compared")?,
    })
}
