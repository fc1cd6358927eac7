//! Finding and claiming this instance's bots when instances share a store
//! (`instances.mode = "shared"`): probes at every link up, claims as stanzas arrive, and the
//! owner-only work each new claim starts.

use std::sync::Arc;

use crate::link::slot::route_probe;
use crate::store::Claim;

use super::table::{BotTable, Start, parse_identities};

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

    /// Claims `batch`, and takes over the bots that changed hands.
    async fn claim(&self, batch: &[String]) -> Result<(), super::BotError> {
        let shared = self.shared();
        let store = &shared.store;
        let claims = store.claim_bots(batch).await?;
        let new: Vec<&Claim> = claims.iter().filter(|c| c.is_new()).collect();
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
        if new.is_empty() {
            return Ok(());
        }
        let unfinished = store.bots_with_unfinished_messages().await?;
        let mut webhooks = store.webhooks().await?;
        let mut stored = Vec::with_capacity(new.len());
        for claim in &new {
            if let Some(bot) = store.load_bot(&claim.lease.bot).await? {
                stored.push(bot);
            }
        }
        for (record, identity, last_seq) in parse_identities(stored).await? {
            let next = store.next_certificate(&record.jid).await?.map(Arc::new);
            let start = Start {
                last_seq,
                recover: unfinished.contains(&record.jid),
                webhook: webhooks.remove(&record.jid),
                next,
            };
            tracing::debug!(bot = record.jid, "bot claimed");
            self.take_over(record, identity, start).await;
        }
        tracing::info!(
            claimed = new.len(),
            held = shared.owners.held(),
            "bots claimed: the server routes their stanzas to this instance"
        );
        Ok(())
    }
}
