//! Finding and claiming this instance's bots when instances share a store
//! (`instances.mode = "shared"`): probes at every link up, claims as stanzas arrive, and the
//! owner-only work each new claim starts.

use std::collections::HashSet;
use std::sync::Arc;

use crate::link::slot::route_probe;
use crate::store::Claim;

use super::table::{BotCommand, BotTable, Start, parse_identities};
use xtls::tunnel::TunnelKey;

/// Bots claimed in one store transaction at most.
const CLAIM_BATCH: usize = 512;

/// How long the claimer waits before it tries again when the store fails.
const CLAIM_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl BotTable {
    /// Sends a route probe to every bot, paced by the outbound queue: each comes back to the
    /// instance that the server routes the bot to, which claims it (docs/scaling.md).
    pub async fn probe_all(&self) {
        let shared = self.shared();
        let bots = self.list();
        for bot in &bots {
            let (_, probe) = route_probe(&shared.domain, &bot.record.jid);
            if shared.out.send(probe).await.is_err() {
                return;
            }
        }
        tracing::info!(
            bots = bots.len(),
            "route probes sent: each bot's owner claims it"
        );
    }

    /// Sends one bot's route probe without waiting (a bot created here may belong elsewhere).
    pub(super) fn probe(&self, jid: &str) {
        let shared = self.shared();
        if shared.owners.is_shared() {
            let (_, probe) = route_probe(&shared.domain, jid);
            if shared.out.try_send(probe).is_err() {
                tracing::debug!(bot = jid, "outbound queue full: route probe not sent");
            }
        }
    }

    /// Claims the bots whose stanzas reach this instance, as they arrive, until the component
    /// stops. A bot that changes hands is read again from the store (another instance ran it
    /// meanwhile) and its owner-only work starts: unfinished messages, webhook deliveries.
    pub async fn run_claims(self) {
        let owners = &self.shared().owners;
        loop {
            let queued = owners.queued().await;
            for batch in queued.chunks(CLAIM_BATCH) {
                loop {
                    match self.claim(batch).await {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, bots = batch.len(), "cannot claim bots; retrying");
                            tokio::time::sleep(CLAIM_RETRY).await;
                        }
                    }
                }
            }
        }
    }

    /// Brings the table to the store's bots (instances sharing the store create and delete
    /// bots the others learn of here): reads the bots it lacks, without running them, and
    /// drops those deleted.
    pub async fn follow_store(&self) -> Result<(), super::BotError> {
        let store = &self.shared().store;
        let stored: HashSet<String> = store
            .list_bots()
            .await?
            .into_iter()
            .map(|b| b.jid)
            .collect();
        let known: HashSet<String> = self.list().into_iter().map(|b| b.record.jid).collect();
        for gone in known.difference(&stored) {
            self.forget(gone);
        }
        let mut missing = Vec::new();
        for jid in stored.difference(&known) {
            if let Some(bot) = store.load_bot(jid).await? {
                missing.push(bot);
            }
        }
        for (record, identity, last_seq) in parse_identities(missing).await? {
            let next = store.next_certificate(&record.jid).await?.map(Arc::new);
            let start = Start {
                last_seq,
                recover: false,
                webhook: None,
                next,
            };
            if self.by_jid(&record.jid).is_none() {
                self.start(record, identity, start);
            }
        }
        Ok(())
    }

    /// Claims `batch`, and takes over the bots that changed hands. An error before the claims
    /// are made leaves the batch to try again; a take-over that fails afterwards is logged
    /// and left as far as it got.
    async fn claim(&self, batch: &[String]) -> Result<(), super::BotError> {
        let shared = self.shared();
        let store = &shared.store;
        // Read first: once claimed, a bot is no longer new to a claim tried again.
        let unfinished = store.bots_with_unfinished_messages().await?;
        let mut webhooks = store.webhooks().await?;
        let claims = store.claim_bots(batch).await?;
        for claim in &claims {
            shared.owners.granted(claim.lease.clone());
        }
        // Asked for and not claimed: no such bot (deleted, or not a bot at all).
        for jid in batch {
            if !claims.iter().any(|c| &c.lease.bot == jid) {
                shared.owners.forget(jid);
                self.forget(jid);
            }
        }
        let new: Vec<&Claim> = claims.iter().filter(|c| c.is_new()).collect();
        if new.is_empty() {
            return Ok(());
        }
        // Read again what another instance ran (it may have changed the bot meanwhile) or
        // this one does not know yet; a bot no instance ran is as loaded at start.
        let reread: Vec<String> = new
            .iter()
            .filter(|c| c.previous.is_some() || self.by_jid(&c.lease.bot).is_none())
            .map(|c| c.lease.bot.clone())
            .collect();
        if let Err(e) = self.reread(&reread, &unfinished, &mut webhooks).await {
            tracing::error!(error = %e, bots = reread.len(), "bots claimed, and reading them again failed");
        }
        for claim in &new {
            let Some(handle) = self.by_jid(&claim.lease.bot) else {
                continue;
            };
            if !reread.contains(&claim.lease.bot) {
                // Known here and run by no instance before: its owner-only work starts now.
                if unfinished.contains(&claim.lease.bot) {
                    let _ = handle.send(BotCommand::Recover).await;
                }
                if let Some(webhook) = webhooks.remove(&claim.lease.bot) {
                    handle.start_deliverer(Some(Some(webhook)));
                }
            }
            if !claim.lost.is_empty() {
                let keys = claim
                    .lost
                    .iter()
                    .map(|(local, peer)| TunnelKey {
                        local: local.clone(),
                        peer: peer.clone(),
                    })
                    .collect();
                let _ = handle.send(BotCommand::TakenOver(keys)).await;
            }
        }
        tracing::info!(
            claimed = new.len(),
            held = shared.owners.held(),
            "bots claimed: the server routes their stanzas to this instance"
        );
        Ok(())
    }

    /// Runs these bots, just claimed, as the store has them now.
    async fn reread(
        &self,
        jids: &[String],
        unfinished: &HashSet<String>,
        webhooks: &mut std::collections::HashMap<String, crate::store::Webhook>,
    ) -> Result<(), super::BotError> {
        if jids.is_empty() {
            return Ok(());
        }
        let store = &self.shared().store;
        let stored = store.load_bots_named(jids).await?;
        let mut next: std::collections::HashMap<String, _> = store
            .next_certificates()
            .await?
            .into_iter()
            .map(|n| (n.bot.clone(), Arc::new(n)))
            .collect();
        for (record, identity, last_seq) in parse_identities(stored).await? {
            let start = Start {
                last_seq,
                recover: unfinished.contains(&record.jid),
                webhook: webhooks.remove(&record.jid),
                next: next.remove(&record.jid),
            };
            self.take_over(record, identity, start).await;
        }
        Ok(())
    }
}
