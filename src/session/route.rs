//! Route probes: whether the XMPP server routes a bot's stanzas to this instance's connection.
//!
//! Where a server spreads one domain over several connections (ejabberd's `domain_balancing`),
//! each bot's stanzas reach exactly one of them. A probe is a message from the domain to the
//! bot's JID (`link::slot::route_probe`); it comes back to this connection only if the bot's
//! stanzas do. The router hands arriving probes to [`RouteProbes::arrived`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::Shared;
use crate::link::slot::route_probe;

/// How long a probe waits to come back before the answer is "not here".
pub const ROUTE_WAIT: Duration = Duration::from_secs(3);

/// Most probes waiting at once; more are refused rather than queued.
const MAX_WAITING: usize = 64;

/// The probes sent from this instance that have not come back yet, by id.
#[derive(Debug, Default)]
pub struct RouteProbes {
    waiting: Mutex<HashMap<String, oneshot::Sender<()>>>,
}

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Whether the bot's stanzas reach this instance's connection.
    pub reaches_here: bool,
    /// How long the probe took to come back, or how long it was waited for.
    pub waited: Duration,
}

/// Why a probe could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// The component link is not up.
    #[error("the component link is down")]
    LinkDown,
    /// Too many probes are waiting already, or the outbound queue stayed full.
    #[error(
        "the component is busy: {MAX_WAITING} route probes wait, or the outbound queue is full"
    )]
    Busy,
}

impl RouteProbes {
    /// Wakes the waiter of the probe `id`; whether one was waiting (probes of other
    /// instances, and late ones, reach nobody).
    pub fn arrived(&self, id: &str) -> bool {
        let waiter = self.lock().remove(id);
        waiter.is_some_and(|w| w.send(()).is_ok())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<()>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes a probe's entry however its wait ends.
struct Waiting<'a> {
    probes: &'a RouteProbes,
    id: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.probes.lock().remove(&self.id);
    }
}

impl Shared {
    /// Sends a probe to `bot` (a bare JID in the component's domain) and waits up to
    /// [`ROUTE_WAIT`] for it to come back to this connection.
    pub async fn probe_route(&self, bot: &str) -> Result<Route, RouteError> {
        if !self.link_up.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(RouteError::LinkDown);
        }
        let (id, probe) = route_probe(&self.domain, bot);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.routes.lock();
            if waiting.len() >= MAX_WAITING {
                return Err(RouteError::Busy);
            }
            waiting.insert(id.clone(), tx);
        }
        let _entry = Waiting {
            probes: &self.routes,
            id,
        };
        let started = Instant::now();
        match tokio::time::timeout(ROUTE_WAIT, self.out.send(probe)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(RouteError::LinkDown),
            // The outbound queue stayed full for the whole wait.
            Err(_) => return Err(RouteError::Busy),
        }
        let came_back = tokio::time::timeout(ROUTE_WAIT.saturating_sub(started.elapsed()), rx)
            .await
            .is_ok_and(|r| r.is_ok());
        Ok(Route {
            reaches_here: came_back,
            waited: started.elapsed(),
        })
    }
}
