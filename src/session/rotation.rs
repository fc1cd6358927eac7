//! Rotation of the bots' own certificates: announce the next one, activate it when its overlap
//! ends, rotate those about to expire.
//!
//! The store holds the truth (`bot_next_keys`); the table's handles and the drivers follow it.
//! A driver answers new tunnels and disco#info with what it was last given: tunnels already
//! open keep the certificate they were opened with.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::oneshot;

use crate::store::NextCertificate;
use xtls::certs::{BotIdentity, rfc3339};
use xtls::tunnel::BotCredentials;

use super::table::{BotCommand, BotError, BotHandle, BotTable};

/// A rotation asked for over the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// How long the next certificate is announced before it becomes active (zero: at once).
    pub overlap: Duration,
    /// A new key pair too; otherwise the key, and so the SPKI fingerprint peers pin, stays.
    pub new_key: bool,
}

/// What a driver serves: a new active certificate (`None`: the same) and the announced next.
#[derive(Debug)]
pub struct Certificates {
    /// The certificate new tunnels get from now on, when it changes.
    pub active: Option<BotCredentials>,
    /// The announced next certificate, shown in disco#info.
    pub next: Option<Arc<NextCertificate>>,
}

/// Who the audit log names for what the component does by itself.
const COMPONENT: &str = "component";

impl BotTable {
    /// Announces a bot's next certificate (replacing one announced before) and activates it
    /// when `rotation.overlap` ends, at once when it is zero; the bot as it is now, or `None`
    /// when there is no such bot.
    pub async fn rotate(
        &self,
        jid: &str,
        rotation: Rotation,
        actor: &str,
    ) -> Result<Option<BotHandle>, BotError> {
        self.rotate_unless(jid, rotation, actor, false).await
    }

    /// [`Self::rotate`]; with `unless_announced`, nothing when a next certificate is announced
    /// already (checked under the lock: an operator's rotation may have come first).
    async fn rotate_unless(
        &self,
        jid: &str,
        rotation: Rotation,
        actor: &str,
        unless_announced: bool,
    ) -> Result<Option<BotHandle>, BotError> {
        let _one_at_a_time = self.changes.lock().await;
        let Some(handle) = self.by_jid(jid) else {
            return Ok(None);
        };
        if unless_announced && handle.next.is_some() {
            return Ok(None);
        }
        let validity = self.shared().certificates.get().validity();
        let current = handle.identity.clone();
        let identity = tokio::task::spawn_blocking(move || {
            if rotation.new_key {
                BotIdentity::generate_valid_for(&current.jid, validity)
            } else {
                current.reissue_valid_for(validity)
            }
        })
        .await
        .expect("issuing a certificate does not panic")?;
        let active_at = OffsetDateTime::now_utc()
            + time::Duration::try_from(rotation.overlap).unwrap_or(time::Duration::MAX);
        let next = NextCertificate {
            bot: handle.record.jid.clone(),
            created_at: crate::store::now(),
            active_at: rfc3339(active_at),
            identity,
        };
        let store = &self.shared().store;
        if !store
            .announce_next(&next.identity, &next.active_at, actor)
            .await?
        {
            return Ok(None);
        }
        tracing::info!(
            bot = next.bot,
            spki_sha256 = %next.identity.info.fingerprints.spki_sha256,
            active_at = next.active_at,
            new_key = rotation.new_key,
            "next certificate announced"
        );
        if rotation.overlap.is_zero() {
            return self.activate_locked(&handle, &next.active_at, actor).await;
        }
        let next = Some(Arc::new(next));
        self.serve(&handle, None, next).await
    }

    /// Activates the next certificates whose overlap has ended and, when `auto_rotate` is on,
    /// rotates those that expire within the overlap; returns how many of each.
    pub async fn rotate_due(&self) -> Result<(usize, usize), BotError> {
        let config = self.shared().certificates.get();
        let now = OffsetDateTime::now_utc();
        // The handles hold what is announced (the store's truth, loaded at start and kept
        // with every change): nothing is read or unsealed here until something is due.
        // Only the bots this instance runs: another instance rotates its own.
        let owners = &self.shared().owners;
        let mut bots = self.list();
        bots.retain(|b| owners.holds(&b.record.jid));
        let mut activated = 0;
        for handle in &bots {
            let Some(next) = &handle.next else {
                continue;
            };
            if parse(&next.active_at).is_none_or(|at| at <= now) {
                let _one_at_a_time = self.changes.lock().await;
                let done = self.activate_locked(handle, &next.active_at, COMPONENT);
                if done.await?.is_some() {
                    activated += 1;
                }
            }
        }
        let mut rotated = 0;
        if config.auto_rotate {
            let overlap = config.overlap();
            let horizon = now + time::Duration::try_from(overlap).unwrap_or(time::Duration::MAX);
            for bot in &bots {
                let expires = parse(&bot.identity.info.not_after);
                let Some(expires) = expires.filter(|at| *at <= horizon && bot.next.is_none())
                else {
                    continue;
                };
                // Active before the old one expires, even when the overlap would end later.
                let until_expiry = Duration::try_from(expires - now).unwrap_or_default();
                let rotation = Rotation {
                    overlap: overlap.min(until_expiry),
                    new_key: false,
                };
                tracing::info!(
                    bot = bot.record.jid,
                    not_after = bot.identity.info.not_after,
                    "certificate expires within the overlap: rotating"
                );
                if self
                    .rotate_unless(&bot.record.jid, rotation, COMPONENT, true)
                    .await?
                    .is_some()
                {
                    rotated += 1;
                }
            }
        }
        Ok((activated, rotated))
    }

    /// Checks for due rotations now and every `check_interval_secs`, for ever; a failed
    /// check is logged and tried again at the next.
    pub async fn run_rotations(self) {
        loop {
            if let Err(e) = self.rotate_due().await {
                tracing::warn!(error = %e, "certificate rotation check failed");
            }
            let interval = self.shared().certificates.get().check_interval_secs;
            tokio::time::sleep(Duration::from_secs(interval)).await;
        }
    }

    /// Makes the stored next certificate of `handle`'s bot, announced for `active_at`, the
    /// active one; the caller holds `changes`.
    async fn activate_locked(
        &self,
        handle: &BotHandle,
        active_at: &str,
        actor: &str,
    ) -> Result<Option<BotHandle>, BotError> {
        let store = &self.shared().store;
        let activated = store.activate_next(&handle.record.jid, active_at, actor);
        let Some(identity) = activated.await? else {
            return Ok(None);
        };
        tracing::info!(
            bot = handle.record.jid,
            spki_sha256 = %identity.info.fingerprints.spki_sha256,
            not_after = identity.info.not_after,
            "certificate activated"
        );
        let creds = BotCredentials::new(identity)?;
        self.serve(handle, Some(creds), None).await
    }

    /// Hands a driver its certificates and puts them in the table's handle.
    async fn serve(
        &self,
        handle: &BotHandle,
        active: Option<BotCredentials>,
        next: Option<Arc<NextCertificate>>,
    ) -> Result<Option<BotHandle>, BotError> {
        let identity = active.as_ref().map(|c| c.identity.clone());
        let (done, applied) = oneshot::channel();
        let certificates = Certificates {
            active,
            next: next.clone(),
        };
        let command = BotCommand::SetCertificates(Box::new(certificates), done);
        if handle.send(command).await.is_ok() {
            let _ = applied.await;
        }
        Ok(self.update(&handle.record.localpart, |entry| {
            if let Some(identity) = identity {
                entry.fingerprints = identity.info.fingerprints.clone();
                entry.identity = identity;
            }
            entry.next = next;
        }))
    }
}

/// An RFC 3339 time as stored.
fn parse(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}
