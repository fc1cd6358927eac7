//! The capacity caps a new tunnel must fit under (`[limits]`): tunnels per bot, per peer and
//! in all, concurrent handshakes. The per-peer start rate is in [`super::rate`].

use std::sync::atomic::Ordering;

use xtls::tunnel::{TunnelKey, bare};

use super::driver::BotDriver;

impl BotDriver {
    /// Which capacity cap a new tunnel to `key` would exceed.
    pub(super) fn over_limit(&self, key: &TunnelKey) -> Option<&'static str> {
        let over = self.which_limit(key);
        if let Some((kind, _)) = over {
            self.shared.metrics.rejected(kind);
        }
        over.map(|(_, text)| text)
    }

    /// The limit (kind and text) a new tunnel to `key` would exceed.
    pub(super) fn which_limit(&self, key: &TunnelKey) -> Option<(&'static str, &'static str)> {
        if self.stopping.is_some() {
            return Some(("stopping", "the bot is stopping"));
        }
        let limits = self.shared.limits.get();
        let peer_bare = bare(&key.peer);
        let per_peer = self
            .tunnels
            .keys()
            .filter(|k| bare(&k.peer) == peer_bare)
            .count();
        if self.tunnels.len() >= limits.tunnels_per_bot {
            Some(("tunnels_per_bot", "too many tunnels for this bot"))
        } else if per_peer >= limits.tunnels_per_peer {
            Some(("tunnels_per_peer", "too many tunnels for this peer"))
        } else if self.shared.tunnels.load(Ordering::Relaxed) >= limits.tunnels_total {
            Some(("tunnels_total", "too many tunnels"))
        } else if self.shared.handshakes.load(Ordering::Relaxed) >= limits.handshakes {
            Some(("handshakes", "too many handshakes in progress"))
        } else {
            None
        }
    }
}
