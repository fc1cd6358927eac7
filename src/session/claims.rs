//! Finding and claiming this instance's bots when instances share a store
//! (`instances.mode = "shared"`): probes at every link up, claims as stanzas arrive, and the
//! owner-only work each new claim starts.

use std::collections::HashSet;

use crate::link::slot::route_probe;
use crate::store::Claim;

use super::table::{BotCommand, BotTable, Start, next_by_bot, parse_each, parse_identities};
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
            // The link went down meanwhile: the next link up probes again.
            if !shared.link_up.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
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

    /// Sends one bot's route probe without waiting, when instances share the store: the
    /// instance its stanzas reach claims it.
    pub fn probe(&self, jid: &str) {
        let shared = self.shared();
        if shared.owners.is_shared() {
            let (_, probe) = route_probe(&shared.domain, jid);
            if shared.out.try_send(probe).is_err() {
                tracing::debug!(bot = jid, "outbound queue full: route probe not sent");
            }
        }
    }

    /// Claims the bots whose stanzas reach this instance, as they arrive, until the component
    /// stops: each is read again from the store (another instance may have run it), its
    /// owner-only work starts (unfinished messages, webhook deliveries, telling the peers of
    /// its former owner's tunnels), and then the stanzas that waited for it go to it.
    pub async fn run_claims(self) {
        let owners = &self.shared().owners;
        loop {
            let mut queued = owners.queued().await;
            // In one order on every instance: two claiming overlapping batches do not deadlock.
            queued.sort_unstable();
            for batch in queued.chunks(CLAIM_BATCH) {
                let failed = loop {
                    match self.claim(batch).await {
                        Ok(failed) => break failed,
                        Err(e) => {
                            tracing::warn!(error = %e, bots = batch.len(), "cannot claim bots; retrying");
                            tokio::time::sleep(CLAIM_RETRY).await;
                        }
                    }
                };
                if !failed.is_empty() {
                    tracing::warn!(
                        bots = failed.len(),
                        "bots claimed and not taken over; retrying"
                    );
                    tokio::time::sleep(CLAIM_RETRY).await;
                    owners.retry(&failed);
                }
            }
        }
    }

    /// Brings the table to the store's bots (instances sharing the store create and delete
    /// bots the others learn of here): reads the bots it lacks, without running them, and
    /// drops those deleted.
    pub async fn follow_store(&self) -> Result<(), super::BotError> {
        let store = &self.shared().store;
        // Known first: a bot added meanwhile is in the store's list, not taken for deleted.
        let known: HashSet<String> = self.list().into_iter().map(|b| b.record.jid).collect();
        let stored: HashSet<String> = store
            .list_bots()
            .await?
            .into_iter()
            .map(|b| b.jid)
            .collect();
        for gone in known.difference(&stored) {
            self.forget(gone);
        }
        let missing: Vec<String> = stored.difference(&known).cloned().collect();
        if missing.is_empty() {
            return Ok(());
        }
        let loaded = store.load_bots_named(&missing).await?;
        let mut next = next_by_bot(store).await?;
        for (record, identity, last_seq) in parse_identities(loaded).await? {
            let next = next.remove(&record.jid);
            self.learn(record, identity, last_seq, next);
        }
        Ok(())
    }

    /// Claims `batch` and takes over every bot claimed that this instance did not run under
    /// that claim yet; returns those whose take-over failed (they keep waiting). An error
    /// means nothing was claimed.
    async fn claim(&self, batch: &[String]) -> Result<Vec<String>, super::BotError> {
        let shared = self.shared();
        let store = &shared.store;
        let claims = store.claim_bots(batch).await?;
        // Asked for and not claimed: no such bot (deleted, or not a bot at all).
        for jid in batch {
            if !claims.iter().any(|c| &c.lease.bot == jid) {
                let held = shared.owners.dropped(jid);
                self.refuse_all(held);
                self.forget(jid);
            }
        }
        let mut failed = Vec::new();
        let fresh: Vec<&Claim> = claims
            .iter()
            .filter(|c| shared.owners.lease_of(&c.lease.bot).as_ref() != Some(&c.lease))
            .collect();
        // What the take-overs start from, read once for the batch and only when there are
        // some (a claim made again under the same lease needs none of it).
        let (unfinished, webhooks) = match fresh.is_empty() {
            true => Default::default(),
            false => match store.bots_with_unfinished_messages().await {
                Ok(unfinished) => {
                    // One secret that cannot be opened must not stop every take-over: the
                    // deliverers of this batch then read their webhooks themselves.
                    let webhooks = store
                        .webhooks()
                        .await
                        .inspect_err(|e| tracing::warn!(error = %e, "cannot read the webhooks; each deliverer reads its own"))
                        .ok();
                    (unfinished, webhooks)
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the unfinished messages");
                    return Ok(fresh.iter().map(|c| c.lease.bot.clone()).collect());
                }
            },
        };
        let stored = match store
            .load_bots_named(
                &fresh
                    .iter()
                    .map(|c| c.lease.bot.clone())
                    .collect::<Vec<_>>(),
            )
            .await
        {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the bots claimed");
                return Ok(fresh.iter().map(|c| c.lease.bot.clone()).collect());
            }
        };
        let read_next = async {
            match fresh.is_empty() {
                true => Ok(Default::default()),
                false => next_by_bot(store).await,
            }
        };
        let mut next = match read_next.await {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the announced certificates");
                return Ok(fresh.iter().map(|c| c.lease.bot.clone()).collect());
            }
        };
        // One unreadable key fails its own bot only.
        let jids: Vec<String> = stored.iter().map(|b| b.record.jid.clone()).collect();
        let mut parsed = std::collections::HashMap::new();
        for (jid, outcome) in jids.into_iter().zip(parse_each(stored).await) {
            match outcome {
                Ok(bot) => {
                    parsed.insert(jid, bot);
                }
                Err(e) => tracing::error!(bot = jid, error = %e, "claimed bot unreadable"),
            }
        }
        for claim in &fresh {
            let jid = &claim.lease.bot;
            let Some((record, identity, last_seq)) = parsed.remove(jid) else {
                failed.push(jid.clone());
                continue;
            };
            let start = Start {
                last_seq,
                recover: unfinished.contains(jid),
                webhook: webhooks.as_ref().and_then(|w| w.get(jid).cloned()),
                next: next.remove(jid),
            };
            let api = record.handler == crate::config::Handler::Api;
            let handle = self.take_over(record, identity, start).await;
            if api && webhooks.is_none() {
                handle.start_deliverer(None);
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
            let held = shared.owners.granted(claim.lease.clone());
            for stanza in held {
                if let Some(answer) = self.deliver(&handle, stanza) {
                    self.answer(answer);
                }
            }
            tracing::debug!(
                bot = jid,
                epoch = claim.lease.epoch,
                lost = claim.lost.len(),
                "bot taken over"
            );
        }
        // Claimed again under the lease this instance holds (a probe after a reconnect).
        for claim in claims.iter().filter(|c| !fresh.contains(c)) {
            let held = shared.owners.granted(claim.lease.clone());
            if let Some(handle) = self.by_jid(&claim.lease.bot) {
                for stanza in held {
                    if let Some(answer) = self.deliver(&handle, stanza) {
                        self.answer(answer);
                    }
                }
            }
        }
        if !fresh.is_empty() {
            tracing::info!(
                claimed = fresh.len(),
                held = shared.owners.held(),
                "bots claimed: the server routes their stanzas to this instance"
            );
        }
        Ok(failed)
    }

    /// Answers, without waiting, what waited for a bot that is not there.
    fn refuse_all(&self, held: Vec<minidom::Element>) {
        for stanza in held {
            if super::table::is_request(&stanza) {
                self.answer(xtls::stanza::error_reply(
                    &stanza,
                    xtls::stanza::ErrorType::Cancel,
                    xtls::stanza::DefinedCondition::ServiceUnavailable,
                    "",
                ));
            }
        }
    }

    /// Sends an answer without waiting (the claimer must not wait for the link).
    fn answer(&self, answer: minidom::Element) {
        if self.shared().out.try_send(answer).is_err() {
            tracing::warn!("outbound queue full: answer dropped");
        }
    }
}
