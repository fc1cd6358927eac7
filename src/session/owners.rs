//! Which bots this instance runs when several instances share a store
//! (`instances.mode = "shared"`, docs/scaling.md).
//!
//! The XMPP server decides: each bot's stanzas reach one component connection. A stanza that
//! reaches this instance for a bot it does not run yet (a route probe, whoever sent it, or any
//! other) queues a claim, and the bot's stanzas wait here until the claim is made and the bot
//! taken over (read again from the store, its former owner's tunnels closed); then they go to
//! the bot in the order they came. The claim's lease fences the bot's writes; a write refused
//! because another instance claimed the bot since makes this one let the bot go.
//! With one instance per store every bot is this instance's and nothing is fenced.

use std::collections::HashMap;
use std::sync::Mutex;

use minidom::Element;
use tokio::sync::Notify;

use crate::store::{Lease, StoreError};

/// Stanzas held for one bot while it is claimed, at most; beyond, they are refused (`wait`).
const HELD_PER_BOT: usize = 64;

/// Stanzas held for all bots at once, at most.
const HELD_IN_ALL: usize = 16_384;

/// Bots waiting for their claim, at most; beyond, their stanzas are refused until it is made.
const MAX_WAITING: usize = 1 << 20;

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
    /// The leases of the bots this instance runs, by bot.
    leases: HashMap<String, Lease>,
    /// Bots routed here and not run yet, with the stanzas that wait for them.
    waiting: HashMap<String, Vec<Element>>,
    /// Stanzas in `waiting`, all bots together.
    held: usize,
    /// Bots of `waiting` whose claim is to be made, in arrival order.
    queued: Vec<String>,
}

/// What becomes of a stanza for a bot.
#[derive(Debug)]
pub enum Admission {
    /// The bot runs here: deliver it.
    Deliver(Element),
    /// The bot is being claimed: the stanza waits for it.
    Held,
    /// Too much waits already: refuse it.
    Refused(Element),
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
    /// store alone, else while it holds the bot's lease.
    pub fn holds(&self, bot: &str) -> bool {
        !self.shared || self.lock().leases.contains_key(bot)
    }

    /// How many bots this instance holds leases on.
    pub fn held(&self) -> usize {
        self.lock().leases.len()
    }

    /// Says what becomes of a stanza that reached this instance for `bot`.
    pub fn admit(&self, bot: &str, stanza: Element) -> Admission {
        if !self.shared {
            return Admission::Deliver(stanza);
        }
        let mut state = self.lock();
        if state.leases.contains_key(bot) {
            return Admission::Deliver(stanza);
        }
        if !self.wait_for(&mut state, bot) || state.held >= HELD_IN_ALL {
            return Admission::Refused(stanza);
        }
        let held = state.waiting.get_mut(bot).expect("waiting: just made");
        if held.len() >= HELD_PER_BOT {
            return Admission::Refused(stanza);
        }
        held.push(stanza);
        state.held += 1;
        Admission::Held
    }

    /// Notes that a probe for `bot` reached this instance: it claims the bot unless it runs it.
    pub fn routed_here(&self, bot: &str) {
        if self.shared {
            let mut state = self.lock();
            if !state.leases.contains_key(bot) {
                self.wait_for(&mut state, bot);
            }
        }
    }

    /// Makes `bot` wait for its claim (queued once); `false` when too many wait already.
    fn wait_for(&self, state: &mut State, bot: &str) -> bool {
        if state.waiting.contains_key(bot) {
            return true;
        }
        if state.waiting.len() >= MAX_WAITING {
            return false;
        }
        state.waiting.insert(bot.to_owned(), Vec::new());
        state.queued.push(bot.to_owned());
        self.wake.notify_one();
        true
    }

    /// Waits for claims to make, and takes them.
    pub async fn queued(&self) -> Vec<String> {
        loop {
            let wait = self.wake.notified();
            let taken = std::mem::take(&mut self.lock().queued);
            if !taken.is_empty() {
                return taken;
            }
            wait.await;
        }
    }

    /// Queues again the claims of bots still waiting (their take-over failed).
    pub fn retry(&self, bots: &[String]) {
        let mut state = self.lock();
        let again: Vec<String> = bots
            .iter()
            .filter(|b| state.waiting.contains_key(*b))
            .cloned()
            .collect();
        if !again.is_empty() {
            state.queued.extend(again);
            self.wake.notify_one();
        }
    }

    /// The lease this instance holds on `bot`, if any.
    pub fn lease_of(&self, bot: &str) -> Option<Lease> {
        self.lock().leases.get(bot).cloned()
    }

    /// Records a lease: the bot runs here from now on; the stanzas that waited for it, in order.
    pub fn granted(&self, lease: Lease) -> Vec<Element> {
        let mut state = self.lock();
        let held = state.waiting.remove(&lease.bot).unwrap_or_default();
        state.held -= held.len();
        state.leases.insert(lease.bot.clone(), lease);
        held
    }

    /// `bot` does not exist: it waits no more; the stanzas that waited for it.
    pub fn dropped(&self, bot: &str) -> Vec<Element> {
        let mut state = self.lock();
        let held = state.waiting.remove(bot).unwrap_or_default();
        state.held -= held.len();
        held
    }

    /// Lets `bot` go: another instance runs it now, or it is gone.
    pub fn forget(&self, bot: &str) {
        self.lock().leases.remove(bot);
    }

    /// The lease that fences writes for `bot`: `None` when this instance serves the store
    /// alone; [`StoreError::NotOwner`] when it does not run the bot.
    pub fn lease(&self, bot: &str) -> Result<Option<Lease>, StoreError> {
        if !self.shared {
            return Ok(None);
        }
        match self.lock().leases.get(bot) {
            Some(lease) => Ok(Some(lease.clone())),
            None => Err(StoreError::NotOwner(format!(
                "this instance does not run bot {bot} (another one does, or it is being claimed)"
            ))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("ownership lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: usize) -> Element {
        Element::builder("message", "jabber:component:accept")
            .attr(xtls::stanza::name("id"), n.to_string())
            .build()
    }

    fn lease(bot: &str, epoch: i64) -> Lease {
        Lease {
            bot: bot.into(),
            instance: "i1".into(),
            epoch,
        }
    }

    #[tokio::test]
    async fn a_sole_instance_runs_every_bot_and_fences_nothing() {
        let sole = Ownership::sole();
        assert!(sole.holds("a@bots.example.org"));
        assert!(matches!(
            sole.admit("a@bots.example.org", message(1)),
            Admission::Deliver(_)
        ));
        assert_eq!(sole.lease("a@bots.example.org").unwrap(), None);
        sole.routed_here("a@bots.example.org");
        assert!(sole.lock().queued.is_empty());
    }

    #[tokio::test]
    async fn stanzas_wait_for_the_claim_then_go_in_order() {
        let shared = Ownership::shared();
        let a = "a@bots.example.org";
        assert!(!shared.holds(a));
        assert!(matches!(shared.lease(a), Err(StoreError::NotOwner(_))));
        for n in 0..3 {
            assert!(matches!(shared.admit(a, message(n)), Admission::Held));
        }
        shared.routed_here(a);
        shared.routed_here("b@bots.example.org");
        assert_eq!(shared.queued().await, [a, "b@bots.example.org"]);
        let held = shared.granted(lease(a, 2));
        let ids: Vec<_> = held.iter().map(|s| s.attr("id").unwrap()).collect();
        assert_eq!(ids, ["0", "1", "2"]);
        assert!(shared.holds(a) && shared.held() == 1);
        assert_eq!(shared.lease(a).unwrap(), Some(lease(a, 2)));
        assert!(matches!(shared.admit(a, message(3)), Admission::Deliver(_)));
        // A bot that is not there: what waited for it comes back, to be refused.
        shared.admit("b@bots.example.org", message(4));
        assert_eq!(shared.dropped("b@bots.example.org").len(), 1);
        assert_eq!(shared.lock().held, 0);
        // Let go, then routed here again: claimed again.
        shared.forget(a);
        assert!(!shared.holds(a));
        shared.routed_here(a);
        assert_eq!(shared.queued().await, [a]);
    }

    #[tokio::test]
    async fn what_waits_for_a_claim_is_bounded() {
        let shared = Ownership::shared();
        let a = "a@bots.example.org";
        for n in 0..HELD_PER_BOT {
            assert!(matches!(shared.admit(a, message(n)), Admission::Held));
        }
        assert!(matches!(
            shared.admit(a, message(99)),
            Admission::Refused(_)
        ));
        // A failed take-over is tried again only for bots still waiting.
        shared.queued().await;
        shared.retry(&[a.to_owned(), "gone@bots.example.org".to_owned()]);
        assert_eq!(shared.queued().await, [a]);
    }
}
