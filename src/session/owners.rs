//! Which bots this instance runs when several instances share a store
//! (`instances.mode = "shared"`, docs/scaling.md).
//!
//! The XMPP server decides: each bot's stanzas reach one component connection. A stanza that
//! reaches this instance for a bot (a route probe, whoever sent it, or any other) marks the bot
//! *routed* here and queues a claim; the claim's lease fences the driver's writes for the bot.
//! A write refused because another instance claimed the bot since makes this one forget it.
//! With one instance per store every bot is this instance's and nothing is fenced.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::store::{Lease, Store, StoreError};

/// Bots whose claims wait at most; beyond, a bot is claimed by its driver's first write.
const MAX_QUEUED: usize = 1 << 20;

/// This instance's bots, when it shares its store with others.
#[derive(Debug, Default)]
pub struct Ownership {
    /// Whether instances share the store; otherwise every bot is this one's, unfenced.
    shared: bool,
    state: Mutex<State>,
    /// Wakes the claimer when `queued` grows.
    wake: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Bots whose stanzas reach this instance.
    routed: HashSet<String>,
    /// The leases held, by bot.
    leases: HashMap<String, Lease>,
    /// Routed bots not claimed yet, in arrival order.
    queued: Vec<String>,
}

impl Ownership {
    /// Every bot is this instance's (it serves the store alone).
    pub fn sole() -> Ownership {
        Ownership::default()
    }

    /// Bots are this instance's once the server routes them here and the store says so.
    pub fn shared() -> Ownership {
        Ownership {
            shared: true,
            ..Default::default()
        }
    }

    /// Whether instances share the store.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Whether this instance runs `bot` (a normalized bare JID): always when it serves the
    /// store alone, else once the server routed one of the bot's stanzas here.
    pub fn runs(&self, bot: &str) -> bool {
        !self.shared
            || self
                .state
                .lock()
                .expect("ownership lock")
                .routed
                .contains(bot)
    }

    /// Whether this instance holds a lease on `bot` (always when it serves the store alone).
    pub fn holds(&self, bot: &str) -> bool {
        !self.shared
            || self
                .state
                .lock()
                .expect("ownership lock")
                .leases
                .contains_key(bot)
    }

    /// How many bots this instance holds leases on.
    pub fn held(&self) -> usize {
        self.state.lock().expect("ownership lock").leases.len()
    }

    /// Notes that a stanza for `bot` reached this instance; queues its claim the first time.
    pub fn routed_here(&self, bot: &str) {
        if !self.shared {
            return;
        }
        let mut state = self.state.lock().expect("ownership lock");
        if state.routed.contains(bot) {
            return;
        }
        state.routed.insert(bot.to_owned());
        if state.queued.len() < MAX_QUEUED {
            state.queued.push(bot.to_owned());
            self.wake.notify_one();
        }
    }

    /// Waits for claims to make, and takes them.
    pub async fn queued(&self) -> Vec<String> {
        loop {
            let wait = self.wake.notified();
            let taken = std::mem::take(&mut self.state.lock().expect("ownership lock").queued);
            if !taken.is_empty() {
                return taken;
            }
            wait.await;
        }
    }

    /// Records a lease the store granted.
    pub fn granted(&self, lease: Lease) {
        let mut state = self.state.lock().expect("ownership lock");
        state.routed.insert(lease.bot.clone());
        state.leases.insert(lease.bot.clone(), lease);
    }

    /// Forgets `bot`: another instance runs it, or it is gone.
    pub fn forget(&self, bot: &str) {
        let mut state = self.state.lock().expect("ownership lock");
        state.routed.remove(bot);
        state.leases.remove(bot);
    }

    /// Forgets every bot: the link to the server is lost, and the next connection may take
    /// another slot (its probes find this instance's bots again).
    pub fn reset(&self) {
        let mut state = self.state.lock().expect("ownership lock");
        state.routed.clear();
        state.leases.clear();
        state.queued.clear();
    }

    /// The lease that fences writes for `bot`: `None` when this instance serves the store
    /// alone; claimed now when the bot's stanzas reach this instance and its queued claim has
    /// not been made yet; [`StoreError::NotOwner`] when they do not reach it.
    pub async fn lease(&self, store: &Store, bot: &str) -> Result<Option<Lease>, StoreError> {
        if !self.shared {
            return Ok(None);
        }
        {
            let state = self.state.lock().expect("ownership lock");
            if let Some(lease) = state.leases.get(bot) {
                return Ok(Some(lease.clone()));
            }
            if !state.routed.contains(bot) {
                return Err(StoreError::NotOwner(format!(
                    "the server routes the stanzas of bot {bot} to another instance"
                )));
            }
        }
        let claim = store.claim_bots(&[bot.to_owned()]).await?;
        let lease = claim
            .into_iter()
            .next()
            .map(|c| c.lease)
            .ok_or_else(|| StoreError::NotFound(format!("bot {bot}")))?;
        self.granted(lease.clone());
        Ok(Some(lease))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sole_instance_runs_every_bot_and_fences_nothing() {
        let sole = Ownership::sole();
        assert!(sole.runs("a@bots.example.org") && sole.holds("a@bots.example.org"));
        sole.routed_here("a@bots.example.org");
        assert!(sole.state.lock().unwrap().queued.is_empty());
    }

    #[tokio::test]
    async fn a_shared_instance_runs_what_the_server_routes_to_it_and_claims_it_once() {
        let shared = Ownership::shared();
        assert!(!shared.runs("a@bots.example.org"));
        shared.routed_here("a@bots.example.org");
        shared.routed_here("a@bots.example.org");
        shared.routed_here("b@bots.example.org");
        assert!(shared.runs("a@bots.example.org") && !shared.holds("a@bots.example.org"));
        assert_eq!(
            shared.queued().await,
            ["a@bots.example.org", "b@bots.example.org"]
        );
        shared.granted(Lease {
            bot: "a@bots.example.org".into(),
            instance: "i1".into(),
            epoch: 2,
        });
        assert!(shared.holds("a@bots.example.org"));
        assert_eq!(shared.held(), 1);
        shared.forget("a@bots.example.org");
        assert!(!shared.runs("a@bots.example.org") && !shared.holds("a@bots.example.org"));
        // Routed again after it was forgotten: claimed again.
        shared.routed_here("a@bots.example.org");
        assert_eq!(shared.queued().await, ["a@bots.example.org"]);
        // A lost link forgets everything.
        shared.granted(Lease {
            bot: "b@bots.example.org".into(),
            instance: "i1".into(),
            epoch: 1,
        });
        shared.reset();
        assert!(!shared.runs("a@bots.example.org") && !shared.holds("b@bots.example.org"));
    }
}
