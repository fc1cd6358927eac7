//! The tunnel's timers (spec §1.13): its tunable limits and deadlines, the earliest one for
//! the owner to wait on, and what happens when one passes.

use std::time::{Duration, Instant};

use super::{CloseReason, Request, State, Tunnel};

/// Tunable timers and limits of one tunnel (spec §1.13).
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Raw bytes per `<data/>` sent.
    pub chunk_size: usize,
    /// Unacknowledged `data` IQs allowed per tunnel.
    pub window: usize,
    /// Time allowed for the answer to our `start`.
    pub start_timeout: Duration,
    /// Time allowed from `start` to an open tunnel.
    pub handshake_timeout: Duration,
    /// Time allowed for the acknowledgement of one `data`.
    pub ack_timeout: Duration,
    /// Longest the `result` for the peer's `data` waits for a reply the owner writes later,
    /// to leave behind it (see [`Tunnel::poll_transmit`]); zero sends it when polled.
    pub ack_hold: Duration,
    /// Time allowed for the answer to our `close`.
    pub close_timeout: Duration,
    /// Idle time after which an open tunnel is closed; `None` disables.
    pub idle_timeout: Option<Duration>,
    /// Time we wait for the peer's `close` after its close_notify.
    pub peer_eof_timeout: Duration,
    /// Largest inner stanza, in bytes of plaintext.
    pub max_inner_stanza: usize,
    /// Plaintext and ciphertext queued for sending beyond which `send` refuses.
    pub max_queued_out: usize,
    /// Whether the initiator puts a XEP-0250 offer in its `start`.
    pub send_offer: bool,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            chunk_size: 4096,
            window: 4,
            start_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(90),
            ack_timeout: Duration::from_secs(60),
            ack_hold: Duration::ZERO,
            close_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(30 * 60)),
            peer_eof_timeout: Duration::from_secs(30),
            max_inner_stanza: 256 * 1024,
            max_queued_out: 1024 * 1024,
            send_offer: true,
        }
    }
}

impl Tunnel {
    /// The earliest instant at which [`Tunnel::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        [
            self.handshake_deadline,
            self.close_deadline,
            self.idle_deadline,
            self.peer_eof_deadline,
            self.acks_held_until,
            self.outstanding.iter().map(|o| o.deadline).min(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Handles passed deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if self.state == State::Closing {
            if self.close_deadline.is_some_and(|d| d <= now) {
                let reason = self
                    .closing_reason
                    .take()
                    .unwrap_or(CloseReason::Timeout("close answer"));
                self.finish(reason);
            }
            return;
        }
        if self.state == State::Starting {
            if self.outstanding.iter().any(|o| o.deadline <= now) {
                // Best effort: the peer may have created state for our `start`.
                self.outstanding.clear();
                self.send_close_iq(now);
                self.finish(CloseReason::Timeout("start answer"));
            }
            return;
        }
        if self.handshake_deadline.is_some_and(|d| d <= now) {
            self.begin_closing(now, CloseReason::Timeout("handshake"));
            return;
        }
        if self.acks_held_until.is_some_and(|d| d <= now) {
            // No reply came: the acknowledgements leave on their own, and the next ones leave
            // at once until the owner writes again.
            self.release_acks();
            self.expect_reply = false;
        }
        if self
            .outstanding
            .iter()
            .any(|o| matches!(o.kind, Request::Data { .. }) && o.deadline <= now)
        {
            self.begin_closing(now, CloseReason::Timeout("data acknowledgement"));
            return;
        }
        if self.peer_eof_deadline.is_some_and(|d| d <= now) {
            // The peer closed its side but never sent <close/>: close ours the normal way,
            // close_notify first, then <close/> once it is acknowledged (spec §1.10 rule 5).
            self.peer_eof_deadline = None;
            self.close_with(now, CloseReason::PeerClosed);
            return;
        }
        if self.idle_deadline.is_some_and(|d| d <= now) {
            self.close_with(now, CloseReason::Idle);
        }
    }

    pub(super) fn touch(&mut self, now: Instant) {
        self.idle_deadline = self.config.idle_timeout.map(|d| now + d);
    }
}
