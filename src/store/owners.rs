//! Bot ownership, for instances that share a store: each bot is run by one instance, the one
//! the XMPP server routes its stanzas to. A claim carries an epoch that grows at every change
//! of owner; writes only an owner may make run in a transaction fenced by that epoch
//! (`Store::fenced`), so a former owner that has not noticed its loss writes nothing.

use std::collections::HashMap;

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

/// What one claim gave: the lease, and the tunnels it closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The lease this instance holds now.
    pub lease: Lease,
    /// The bot's tunnels other instances left open, closed by this claim as `instance_lost`:
    /// each one's local and peer JIDs, whose peers are to be told.
    pub lost: Vec<(String, String)>,
}

/// Where a bot runs, for a request about it that reached another instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotOwner {
    /// The registered instance that claimed it last, if one did and is still registered.
    pub instance: Option<String>,
    /// That instance's admin API (`instances.advertise_url`).
    pub admin_url: Option<String>,
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
    /// Makes this instance the owner of `bot` ([`Store::claim_bots`] for one bot).
    #[cfg(test)]
    pub async fn claim_bot(&self, bot: &str) -> Result<Lease, StoreError> {
        let mut claimed = self.claim_bots(&[bot.to_owned()]).await?;
        claimed
            .pop()
            .map(|c| c.lease)
            .ok_or_else(|| StoreError::NotFound(format!("bot {bot}")))
    }

    /// Makes this instance the owner of each of `bots` that exists, in one transaction: an
    /// owner claiming again keeps its epoch, a new owner gets the previous epoch plus one, and
    /// the bot's tunnel rows other instances left open are closed as `instance_lost`. What
    /// each claim gave, in the order asked; bots deleted meanwhile are left out. A few
    /// statements per 512 bots, whatever their number.
    pub async fn claim_bots(&self, bots: &[String]) -> Result<Vec<Claim>, StoreError> {
        let Some(me) = self.instance_id() else {
            return Err(StoreError::NotFound("this instance's registration".into()));
        };
        let mut tx = self.writer().begin().await?;
        // Who owned each bot before the claim.
        let mut before: HashMap<String, (String, i64)> = HashMap::new();
        let mut taken: HashMap<String, i64> = HashMap::new();
        let mut lost: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for part in bots.chunks(512) {
            let list = |from: usize| super::params(from, part.len());
            // Who owns them now (locked until the claim commits, on PostgreSQL).
            let mut sql = format!(
                "SELECT bot_jid, instance_id, epoch FROM bot_owners WHERE bot_jid IN ({})",
                list(1)
            );
            if self.backend() == super::Backend::Postgres {
                sql.push_str(" FOR UPDATE");
            }
            let mut owned = query(sql);
            for bot in part {
                owned = owned.bind(bot);
            }
            for row in owned.fetch_all(&mut tx).await? {
                let bot: String = row.try_get("bot_jid")?;
                before.insert(bot, (row.try_get("instance_id")?, row.try_get("epoch")?));
            }
            let others: Vec<&String> = part
                .iter()
                .filter(|b| before.get(*b).is_none_or(|(owner, _)| owner != me))
                .collect();
            if others.is_empty() {
                continue;
            }
            // The epoch grows in the row itself: a claim that raced this one to insert it
            // still makes a new epoch. A bot deleted meanwhile has no row to own.
            let mut claim = query(format!(
                "INSERT INTO bot_owners (bot_jid, instance_id, epoch, claimed_at) \
                 SELECT jid, $1, 1, $2 FROM bots WHERE jid IN ({}) \
                 ON CONFLICT (bot_jid) DO UPDATE SET instance_id = excluded.instance_id, \
                 epoch = bot_owners.epoch + 1, claimed_at = excluded.claimed_at \
                 RETURNING bot_jid, epoch",
                super::params(3, others.len())
            ))
            .bind(me)
            .bind(now());
            for bot in &others {
                claim = claim.bind(*bot);
            }
            for row in claim.fetch_all(&mut tx).await? {
                taken.insert(row.try_get("bot_jid")?, row.try_get("epoch")?);
            }
            // What another instance ran for those bots is gone: closed with the claim.
            let mut close = query(format!(
                "UPDATE tunnels SET state = 'closed', closed_at = $1, close_reason = 'instance_lost' \
                 WHERE bot_jid IN ({}) AND state != 'closed' \
                 AND (instance_id IS NULL OR instance_id != $2) \
                 RETURNING bot_jid, local_jid, peer",
                super::params(3, others.len())
            ))
            .bind(now())
            .bind(me);
            for bot in &others {
                close = close.bind(*bot);
            }
            for row in close.fetch_all(&mut tx).await? {
                lost.entry(row.try_get("bot_jid")?)
                    .or_default()
                    .push((row.try_get("local_jid")?, row.try_get("peer")?));
            }
        }
        tx.commit().await?;
        let mine = |epoch: i64, bot: &String| Lease {
            bot: bot.clone(),
            instance: me.to_owned(),
            epoch,
        };
        Ok(bots
            .iter()
            .filter_map(|bot| match (taken.get(bot), before.get(bot)) {
                (Some(epoch), _) => Some(Claim {
                    lease: mine(*epoch, bot),
                    lost: lost.remove(bot).unwrap_or_default(),
                }),
                (None, Some((owner, epoch))) if owner == me => Some(Claim {
                    lease: mine(*epoch, bot),
                    lost: Vec::new(),
                }),
                _ => None,
            })
            .collect())
    }

    /// Starts a transaction for writes only `lease`'s holder may make: a conflict when the bot
    /// has another owner, or the same one under a newer claim. On PostgreSQL the ownership
    /// row stays locked until the transaction ends, so no claim slips in between.
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
            return Err(StoreError::NotOwner(format!(
                "bot {} has no owner: instance {} lost it",
                lease.bot, lease.instance
            )));
        };
        let (owner, epoch): (String, i64) = (row.try_get("instance_id")?, row.try_get("epoch")?);
        if owner != lease.instance || epoch != lease.epoch {
            return Err(StoreError::NotOwner(format!(
                "bot {} is run by instance {owner} (epoch {epoch}); instance {} held epoch {} and \
                 may not write for it",
                lease.bot, lease.instance, lease.epoch
            )));
        }
        Ok(tx)
    }

    /// Starts a write transaction: fenced by `lease` when there is one (instances sharing the
    /// store), a plain one otherwise.
    pub(crate) async fn begin_for(&self, lease: Option<&Lease>) -> Result<Tx, StoreError> {
        match lease {
            Some(lease) => self.fenced(lease).await,
            None => Ok(self.writer().begin().await?),
        }
    }

    /// Who runs `bot` now, as the store knows it: `None` when there is no such bot; a
    /// [`BotOwner`] without an instance when no live instance has claimed it.
    pub async fn bot_owner(&self, bot: &str) -> Result<Option<BotOwner>, StoreError> {
        let row = query(
            "SELECT i.id, i.admin_url FROM bots b \
             LEFT JOIN bot_owners o ON o.bot_jid = b.jid \
             LEFT JOIN instances i ON i.id = o.instance_id WHERE b.jid = $1",
        )
        .bind(bot)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok(BotOwner {
                instance: r.try_get(0)?,
                admin_url: r.try_get(1)?,
            })
        })
        .transpose()
    }

    /// Runs one write: fenced by `lease` when there is one, on the writer otherwise.
    pub(crate) async fn write_for(
        &self,
        lease: Option<&Lease>,
        write: super::db::Query,
    ) -> Result<(), StoreError> {
        match lease {
            None => {
                write.execute(self.writer()).await?;
            }
            Some(lease) => {
                let mut tx = self.fenced(lease).await?;
                write.execute(&mut tx).await?;
                tx.commit().await?;
            }
        }
        Ok(())
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
        assert_eq!(
            a.bot_owner(&bot.jid).await.unwrap(),
            Some(BotOwner {
                instance: Some(ib.clone()),
                admin_url: None
            })
        );
        assert_eq!(a.bot_owner("nobody@bots.example.org").await.unwrap(), None);
        // In a batch a bot that does not exist is left out; one taken from another
        // instance gets a new epoch, and claiming it again keeps that one.
        let batch = a
            .claim_bots(&[bot.jid.clone(), "nobody@bots.example.org".into()])
            .await
            .unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(
            (batch[0].lease.instance.as_str(), batch[0].lease.epoch),
            (ia.as_str(), 3)
        );
        let again = a.claim_bots(std::slice::from_ref(&bot.jid)).await.unwrap();
        assert_eq!(again[0].lease, batch[0].lease);
        assert!(again[0].lost.is_empty());
        let second = b.claim_bot(&bot.jid).await.unwrap();
        assert_eq!(second.epoch, 4);

        // The former owner's fenced write is refused, and says who runs the bot now.
        match a.fenced(&first).await {
            Err(StoreError::NotOwner(why)) => {
                assert!(why.contains(&ib) && why.contains("epoch 4"), "{why}")
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        // The owner's goes through: a tunnel row, fenced.
        let key = xtls::tunnel::TunnelKey {
            local: bot.jid.clone(),
            peer: "alice@example.net/phone".into(),
        };
        let row = crate::store::TunnelRecord::new(
            "t1".to_owned().into(),
            &bot.jid,
            &key,
            xtls::tunnel::Role::Responder,
            xtls::tunnel::State::Open,
            now(),
        );
        b.save_tunnel(&row, Some(&second)).await.unwrap();
        assert!(matches!(
            a.save_tunnel(&row, Some(&first)).await,
            Err(StoreError::NotOwner(_))
        ));
        let mut tx = b.fenced(&second).await.unwrap();
        query("UPDATE bots SET handler = 'api' WHERE jid = $1")
            .bind(&bot.jid)
            .execute(&mut tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(a.list_bots().await.unwrap()[0].handler, Handler::Api);

        // Taking the bot back is a new claim, not the old one revived; the tunnels the former
        // owner ran are closed with it, and the new owner learns whom to tell.
        let back = a.claim_bots(std::slice::from_ref(&bot.jid)).await.unwrap();
        let third = back[0].lease.clone();
        assert_eq!(third.epoch, 5);
        assert_eq!(back[0].lost, [(key.local.clone(), key.peer.clone())]);
        let closed = a.tunnel(&row.id).await.unwrap().unwrap();
        assert_eq!(closed.close_reason.as_deref(), Some("instance_lost"));
        assert!(a.fenced(&first).await.is_err());
        assert!(matches!(
            b.fenced(&second).await,
            Err(StoreError::NotOwner(_))
        ));
        let owners = b.owners().await.unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].instance.as_str(), owners[0].epoch),
            (ia.as_str(), 5)
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
