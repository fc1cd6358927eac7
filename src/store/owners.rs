//! Bot ownership, for instances that share a store: each bot is run by one instance, the one
//! the XMPP server routes its stanzas to. A claim carries an epoch that grows at every change
//! of owner; writes only an owner may make run in a transaction fenced by that epoch
//! (`Store::fenced`), so a former owner that has not noticed its loss writes nothing.

use serde::Serialize;

use super::db::{Row, Tx, query, query_each};
use super::{Store, StoreError, now};

/// One instance's hold on one bot: the fencing token of its writes for that bot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The bot's bare JID.
    pub bot: String,
    /// The owning instance.
    pub instance: String,
    /// The claim's epoch: 1 for the first owner, one more at every change.
    pub epoch: i64,
}

/// A bot's owner as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct OwnerRecord {
    /// The bot's bare JID.
    pub bot: String,
    /// The instance that runs it.
    pub instance: String,
    /// The epoch of that instance's claim.
    pub epoch: i64,
    /// When that instance claimed it.
    pub claimed_at: String,
}

impl Store {
    /// Makes this instance the owner of `bot`. An owner claiming again keeps its epoch; a new
    /// owner gets the previous epoch plus one.
    pub async fn claim_bot(&self, bot: &str) -> Result<Lease, StoreError> {
        let Some(me) = self.instance_id() else {
            return Err(StoreError::NotFound("this instance's registration".into()));
        };
        let mut tx = self.writer().begin().await?;
        let taken = query(
            "INSERT INTO bot_owners (bot_jid, instance_id, epoch, claimed_at) VALUES ($1, $2, 1, $3) \
             ON CONFLICT (bot_jid) DO UPDATE SET instance_id = excluded.instance_id, \
             epoch = bot_owners.epoch + 1, claimed_at = excluded.claimed_at \
             WHERE bot_owners.instance_id != excluded.instance_id",
        )
        .bind(bot)
        .bind(me)
        .bind(now())
        .execute(&mut tx)
        .await;
        if let Err(sqlx::Error::Database(e)) = &taken
            && e.is_foreign_key_violation()
        {
            return Err(StoreError::NotFound(format!("bot {bot}")));
        }
        taken?;
        let row = query("SELECT instance_id, epoch FROM bot_owners WHERE bot_jid = $1")
            .bind(bot)
            .fetch_one(&mut tx)
            .await?;
        tx.commit().await?;
        Ok(Lease {
            bot: bot.to_owned(),
            instance: row.try_get("instance_id")?,
            epoch: row.try_get("epoch")?,
        })
    }

    /// Starts a transaction for writes only `lease`'s holder may make: a conflict when the bot
    /// has another owner, or the same one under a newer claim. On PostgreSQL the ownership
    /// row stays locked until the transaction ends, so no claim slips in between.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "the writes of instances sharing a store are not fenced yet"
        )
    )]
    pub(crate) async fn fenced(&self, lease: &Lease) -> Result<Tx, StoreError> {
        let mut tx = self.writer().begin().await?;
        let row = query_each(
            "SELECT instance_id, epoch FROM bot_owners WHERE bot_jid = $1",
            "SELECT instance_id, epoch FROM bot_owners WHERE bot_jid = $1 FOR SHARE",
        )
        .bind(&lease.bot)
        .fetch_optional(&mut tx)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::Conflict(format!(
                "bot {} has no owner: instance {} lost it",
                lease.bot, lease.instance
            )));
        };
        let (owner, epoch): (String, i64) = (row.try_get("instance_id")?, row.try_get("epoch")?);
        if owner != lease.instance || epoch != lease.epoch {
            return Err(StoreError::Conflict(format!(
                "bot {} is run by instance {owner} (epoch {epoch}); instance {} held epoch {} and \
                 may not write for it",
                lease.bot, lease.instance, lease.epoch
            )));
        }
        Ok(tx)
    }

    /// Every bot's owner, by bot.
    pub async fn owners(&self) -> Result<Vec<OwnerRecord>, StoreError> {
        let rows = query(
            "SELECT bot_jid, instance_id, epoch, claimed_at FROM bot_owners ORDER BY bot_jid",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(owner_from_row).collect()
    }
}

fn owner_from_row(r: &Row) -> Result<OwnerRecord, StoreError> {
    Ok(OwnerRecord {
        bot: r.try_get("bot_jid")?,
        instance: r.try_get("instance_id")?,
        epoch: r.try_get("epoch")?,
        claimed_at: r.try_get("claimed_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Handler;
    use crate::store::tests::{TestDb, test_bot};
    use xtls::BotIdentity;

    on_each_backend!(a_former_owner_writes_nothing_after_another_instance_claims_the_bot);

    async fn a_former_owner_writes_nothing_after_another_instance_claims_the_bot(db: TestDb) {
        let a = Store::open(&db.url).await.unwrap();
        let b = Store::open(&db.url).await.unwrap();
        let (ia, ib) = (
            a.register_instance(None).await.unwrap(),
            b.register_instance(None).await.unwrap(),
        );
        let bot = test_bot("echo", Handler::Echo);
        a.insert_bot(&bot, &BotIdentity::generate(&bot.jid).unwrap())
            .await
            .unwrap();

        let first = a.claim_bot(&bot.jid).await.unwrap();
        assert_eq!((first.instance.as_str(), first.epoch), (ia.as_str(), 1));
        assert_eq!(
            a.claim_bot(&bot.jid).await.unwrap(),
            first,
            "a claim again keeps its epoch"
        );
        let second = b.claim_bot(&bot.jid).await.unwrap();
        assert_eq!((second.instance.as_str(), second.epoch), (ib.as_str(), 2));

        // The former owner's fenced write is refused, and says who runs the bot now.
        match a.fenced(&first).await {
            Err(StoreError::Conflict(why)) => {
                assert!(why.contains(&ib) && why.contains("epoch 2"), "{why}")
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        // The owner's goes through.
        let mut tx = b.fenced(&second).await.unwrap();
        query("UPDATE bots SET handler = 'api' WHERE jid = $1")
            .bind(&bot.jid)
            .execute(&mut tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(a.list_bots().await.unwrap()[0].handler, Handler::Api);

        // Taking the bot back is a new claim, not the old one revived.
        let third = a.claim_bot(&bot.jid).await.unwrap();
        assert_eq!(third.epoch, 3);
        assert!(a.fenced(&first).await.is_err());
        assert!(matches!(
            b.fenced(&second).await,
            Err(StoreError::Conflict(_))
        ));
        let owners = b.owners().await.unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].instance.as_str(), owners[0].epoch),
            (ia.as_str(), 3)
        );

        assert!(matches!(
            a.claim_bot("nobody@bots.example.org").await,
            Err(StoreError::NotFound(_))
        ));
        // A deleted bot has no owner.
        assert!(a.delete_bot(&bot.jid).await.unwrap());
        assert!(a.owners().await.unwrap().is_empty());
    }
}
