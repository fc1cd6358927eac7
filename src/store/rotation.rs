//! Certificate rotation: a bot's next certificate and the ones it retired.
//!
//! A rotation announces the next certificate (`bot_next_keys`) with the time it becomes
//! active; activation moves it into `bot_keys` and the replaced certificate into
//! `bot_retired_certs`, in one transaction. Both steps are audited.

use super::db::{Row, query};

use super::pins::{Audit, audit};
use super::{PinAction, Store, StoreError, now};
use xtls::certs::BotIdentity;

/// A bot's announced next certificate.
#[derive(Debug, Clone)]
pub struct NextCertificate {
    /// The bot's bare JID.
    pub bot: String,
    /// The next key and certificate.
    pub identity: BotIdentity,
    /// When it was announced (RFC 3339).
    pub created_at: String,
    /// When it becomes the active one (RFC 3339).
    pub active_at: String,
}

/// A certificate a bot used before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiredCertificate {
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// When it stopped being the active one (RFC 3339).
    pub retired_at: String,
}

/// The columns of an announced next certificate.
const NEXT: &str = "SELECT bot_jid, key_der, cert_der, created_at, active_at FROM bot_next_keys";

impl Store {
    /// Announces `identity` as the bot's next certificate, active from `active_at`, replacing
    /// a next one announced before; audited as `actor`'s `certificate_rotated`. `false` when
    /// the bot does not exist.
    pub async fn announce_next(
        &self,
        identity: &BotIdentity,
        active_at: &str,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let bot = identity.jid.as_str();
        let at = now();
        let mut tx = self.writer.begin().await?;
        let exists = query("SELECT 1 FROM bots WHERE jid = $1")
            .bind(bot)
            .fetch_optional(&mut tx)
            .await?
            .is_some();
        if !exists {
            return Ok(false);
        }
        query(
            "INSERT INTO bot_next_keys (bot_jid, key_der, cert_der, created_at, active_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (bot_jid) DO UPDATE SET \
             key_der = excluded.key_der, cert_der = excluded.cert_der, \
             created_at = excluded.created_at, active_at = excluded.active_at",
        )
        .bind(bot)
        .bind(self.seal_key(bot, identity.key_der()))
        .bind(identity.cert_der().as_ref())
        .bind(&at)
        .bind(active_at)
        .execute(&mut tx)
        .await?;
        audit_own_key(&mut tx, &at, actor, PinAction::CertificateRotated, identity).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Every announced next certificate, by bot.
    pub async fn next_certificates(&self) -> Result<Vec<NextCertificate>, StoreError> {
        let rows = query(format!("{NEXT} ORDER BY bot_jid"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| self.next_from_row(r)).collect()
    }

    fn next_from_row(&self, r: &Row) -> Result<NextCertificate, StoreError> {
        let bot: String = r.try_get("bot_jid")?;
        let key_der = self.open_key(&bot, r.try_get("key_der")?)?;
        Ok(NextCertificate {
            identity: BotIdentity::from_der(&bot, r.try_get("cert_der")?, key_der)?,
            created_at: r.try_get("created_at")?,
            active_at: r.try_get("active_at")?,
            bot,
        })
    }

    /// Makes the bot's next certificate the active one and retires the active one, audited as
    /// `actor`'s `certificate_activated`; the new identity, or `None` when none was announced,
    /// or when the one announced is not the one due at `active_at` (a newer rotation replaced
    /// it meanwhile, with its own overlap).
    pub async fn activate_next(
        &self,
        bot: &str,
        active_at: &str,
        actor: &str,
    ) -> Result<Option<BotIdentity>, StoreError> {
        let at = now();
        let mut tx = self.writer.begin().await?;
        let Some(next) = query(
            "SELECT key_der, cert_der FROM bot_next_keys WHERE bot_jid = $1 AND active_at = $2",
        )
        .bind(bot)
        .bind(active_at)
        .fetch_optional(&mut tx)
        .await?
        else {
            return Ok(None);
        };
        let (key_der, cert_der): (Vec<u8>, Vec<u8>) = (next.try_get(0)?, next.try_get(1)?);
        // Checked before anything moves: a key this store cannot open stays where it is.
        let identity =
            BotIdentity::from_der(bot, cert_der.clone(), self.open_key(bot, key_der.clone())?)?;
        query(
            "INSERT INTO bot_retired_certs (bot_jid, cert_der, retired_at) \
             SELECT bot_jid, cert_der, $1 FROM bot_keys WHERE bot_jid = $2",
        )
        .bind(&at)
        .bind(bot)
        .execute(&mut tx)
        .await?;
        query(
            "UPDATE bot_keys SET key_der = $1, cert_der = $2, created_at = $3 WHERE bot_jid = $4",
        )
        .bind(&key_der)
        .bind(&cert_der)
        .bind(&at)
        .bind(bot)
        .execute(&mut tx)
        .await?;
        query("DELETE FROM bot_next_keys WHERE bot_jid = $1")
            .bind(bot)
            .execute(&mut tx)
            .await?;
        audit_own_key(
            &mut tx,
            &at,
            actor,
            PinAction::CertificateActivated,
            &identity,
        )
        .await?;
        tx.commit().await?;
        Ok(Some(identity))
    }

    /// The certificates a bot retired, newest first.
    pub async fn retired_certificates(
        &self,
        bot: &str,
    ) -> Result<Vec<RetiredCertificate>, StoreError> {
        let rows = query(
            "SELECT cert_der, retired_at FROM bot_retired_certs WHERE bot_jid = $1 \
             ORDER BY retired_at DESC, rowid DESC",
        )
        .bind(bot)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RetiredCertificate {
                    cert_der: r.try_get("cert_der")?,
                    retired_at: r.try_get("retired_at")?,
                })
            })
            .collect()
    }
}

/// Audits a decision about the bot's own certificate, naming its key.
async fn audit_own_key(
    tx: &mut super::db::Tx,
    at: &str,
    actor: &str,
    action: PinAction,
    identity: &BotIdentity,
) -> Result<(), StoreError> {
    let spki = identity.info.fingerprints.spki_sha256.to_string();
    let entry = Audit {
        action,
        spki: Some(&spki),
        compared: None,
        trust: None,
    };
    audit(tx, at, actor, &identity.jid, None, entry).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Handler;
    use crate::store::tests::{TestDb, test_bot};

    async fn store_with_bot(db: &TestDb) -> (Store, BotIdentity) {
        let store = Store::open(&db.url).await.unwrap();
        let record = test_bot("weather", Handler::Echo);
        let identity = BotIdentity::generate(&record.jid).unwrap();
        store.insert_bot(&record, &identity).await.unwrap();
        (store, identity)
    }

    on_each_backend!(
        the_next_certificate_replaces_the_active_one_and_the_old_one_is_retired,
        a_second_rotation_replaces_the_announced_one_and_sealing_covers_it,
    );

    async fn the_next_certificate_replaces_the_active_one_and_the_old_one_is_retired(db: TestDb) {
        let (store, first) = store_with_bot(&db).await;
        let bot = first.jid.clone();
        let due = "2030-01-01T00:00:00Z";
        assert!(
            store
                .activate_next(&bot, due, "admin")
                .await
                .unwrap()
                .is_none()
        );

        let next = first.reissue().unwrap();
        assert!(
            store
                .announce_next(&next, "2030-01-01T00:00:00Z", "admin")
                .await
                .unwrap()
        );
        let announced = store.next_certificates().await.unwrap();
        assert_eq!(announced.len(), 1);
        assert_eq!(announced[0].bot, bot);
        assert_eq!(announced[0].active_at, "2030-01-01T00:00:00Z");
        assert_eq!(announced[0].identity.cert_der(), next.cert_der());
        assert_eq!(
            announced[0].identity.key_der(),
            first.key_der(),
            "the key is kept"
        );
        // The active one is unchanged until activation.
        assert_eq!(
            store.load_identity(&bot).await.unwrap().cert_der(),
            first.cert_der()
        );

        let active = store
            .activate_next(&bot, due, "component")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(active.cert_der(), next.cert_der());
        assert_eq!(
            store.load_identity(&bot).await.unwrap().cert_der(),
            next.cert_der()
        );
        assert!(store.next_certificates().await.unwrap().is_empty());
        let retired = store.retired_certificates(&bot).await.unwrap();
        assert_eq!(retired.len(), 1);
        assert_eq!(retired[0].cert_der, first.cert_der().to_vec());

        let log = store.audit_log(Some(&bot), 10).await.unwrap();
        let actions: Vec<_> = log.iter().map(|e| (e.action, e.actor.as_str())).collect();
        assert_eq!(
            actions,
            [
                (PinAction::CertificateActivated, "component"),
                (PinAction::CertificateRotated, "admin"),
            ]
        );
        assert_eq!(
            log[0].spki_sha256.as_deref(),
            Some(next.info.fingerprints.spki_sha256.to_string().as_str())
        );
        store.close().await;
    }

    async fn a_second_rotation_replaces_the_announced_one_and_sealing_covers_it(db: TestDb) {
        let (store, first) = store_with_bot(&db).await;
        let bot = first.jid.clone();
        let reissued = first.reissue().unwrap();
        assert!(
            store
                .announce_next(&reissued, "2030-01-01T00:00:00Z", "admin")
                .await
                .unwrap()
        );
        let new_key = BotIdentity::generate(&bot).unwrap();
        assert!(
            store
                .announce_next(&new_key, "2031-01-01T00:00:00Z", "admin")
                .await
                .unwrap()
        );
        let announced = store.next_certificates().await.unwrap();
        assert_eq!(announced.len(), 1);
        assert_eq!(announced[0].identity.key_der(), new_key.key_der());

        // A key added later seals the announced private key in place too.
        let (key, _) = crate::store::StoreKey::generate();
        assert_eq!(store.use_key(key).await.unwrap(), 2);
        let raw: Vec<u8> = query("SELECT key_der FROM bot_next_keys")
            .fetch_one(&store.pool)
            .await
            .unwrap()
            .get(0);
        assert!(crate::store::sealed::is_sealed(&raw));
        assert!(store.has_sealed_secrets().await.unwrap());
        let stale = store.activate_next(&bot, "2030-01-01T00:00:00Z", "admin");
        assert!(
            stale.await.unwrap().is_none(),
            "replaced by the second announcement"
        );
        let due = "2031-01-01T00:00:00Z";
        let active = store
            .activate_next(&bot, due, "admin")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(active.key_der(), new_key.key_der());

        let unknown = BotIdentity::generate("nobody@bots.example.org").unwrap();
        assert!(
            !store
                .announce_next(&unknown, "2030-01-01T00:00:00Z", "admin")
                .await
                .unwrap()
        );
        store.close().await;
    }
}
