//! Pairing codes in the component: the codes minted over the API, waiting for their peer, and
//! the exchange of `xtls::pair` over a tunnel's inner IQs on the bot's side.
//!
//! A code is minted for one (bot, peer bare JID), lives in memory only (a restart forgets it;
//! minting again is cheap), expires, and allows [`MAX_ATTEMPTS`] wrong confirmations. While
//! one waits, a key the bot would refuse is admitted for pairing alone
//! (`TrustVerdict::Pairing`): nothing of that tunnel reaches the bot, and nothing the bot
//! sends goes into it, until it pairs; a wrong code closes it. A right code pins the key as
//! verified (audited as the minter's decision, `compared` `pairing`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use minidom::Element;

use crate::delivery::event::BotEvent;
use crate::store::{PeerTrust, PinChange};
use xtls::certs::Fingerprint;
use xtls::pair::{CHANNEL_BINDING_LABEL, ChannelBinding, PairMessage, Verifier, new_code};
use xtls::stanza::{DefinedCondition, ErrorType, Iq, IqType};
use xtls::tunnel::{CloseReason, TunnelKey, VerifyError, bare};

use super::driver::BotDriver;

/// Wrong confirmations a code allows before it is revoked.
pub const MAX_ATTEMPTS: u8 = 3;

/// A minted code.
struct Pending {
    code: String,
    expires: Instant,
    attempts_left: u8,
    /// Who minted it: the audit log names them for the pin it makes.
    actor: String,
}

/// The codes waiting for their peers, by (bot, peer bare JID).
#[derive(Default)]
pub struct Pairings(Mutex<HashMap<(String, String), Pending>>);

impl std::fmt::Debug for Pairings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the codes.
        let waiting = self.0.lock().map(|m| m.len()).unwrap_or_default();
        f.debug_struct("Pairings")
            .field("waiting", &waiting)
            .finish()
    }
}

/// A code just minted, to show the person once.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The code, `XXXXX-XXXXX`.
    pub code: String,
    /// How long it stays valid.
    pub ttl: Duration,
    /// Wrong attempts it allows.
    pub attempts: u8,
}

impl Pairings {
    /// Mints a code for a peer of a bot, replacing one minted before.
    pub fn mint(&self, bot: &str, peer: &str, ttl: Duration, actor: &str) -> Minted {
        let code = new_code();
        let pending = Pending {
            code: code.clone(),
            expires: Instant::now() + ttl,
            attempts_left: MAX_ATTEMPTS,
            actor: actor.to_owned(),
        };
        let mut map = self.0.lock().expect("pairings lock");
        map.retain(|_, p| p.expires > Instant::now());
        map.insert((bot.to_owned(), peer.to_owned()), pending);
        Minted {
            code,
            ttl,
            attempts: MAX_ATTEMPTS,
        }
    }

    /// Revokes a peer's code; `false` when none was waiting.
    pub fn revoke(&self, bot: &str, peer: &str) -> bool {
        let mut map = self.0.lock().expect("pairings lock");
        map.remove(&(bot.to_owned(), peer.to_owned()))
            .is_some_and(|p| p.expires > Instant::now())
    }

    /// Whether a code waits for this peer.
    pub(super) fn waiting(&self, bot: &str, peer: &str) -> bool {
        self.code(bot, peer).is_some()
    }

    /// The code waiting for this peer and who minted it.
    fn code(&self, bot: &str, peer: &str) -> Option<(String, String)> {
        let map = self.0.lock().expect("pairings lock");
        map.get(&(bot.to_owned(), peer.to_owned()))
            .filter(|p| p.expires > Instant::now())
            .map(|p| (p.code.clone(), p.actor.clone()))
    }

    /// Counts a wrong confirmation; the code is revoked after the last.
    fn failed(&self, bot: &str, peer: &str) {
        let mut map = self.0.lock().expect("pairings lock");
        let key = (bot.to_owned(), peer.to_owned());
        if let Some(p) = map.get_mut(&key) {
            p.attempts_left = p.attempts_left.saturating_sub(1);
            if p.attempts_left == 0 {
                map.remove(&key);
            }
        }
    }

    /// The code paired: it is spent.
    fn used(&self, bot: &str, peer: &str) {
        let mut map = self.0.lock().expect("pairings lock");
        map.remove(&(bot.to_owned(), peer.to_owned()));
    }
}

impl BotDriver {
    /// Takes an inner stanza of the pairing exchange; `false` when it is none of its.
    pub(super) async fn on_pair_iq(&mut self, key: &TunnelKey, iq: &Iq) -> bool {
        let Some(message) = iq.children.first().and_then(PairMessage::parse) else {
            return false;
        };
        if !matches!(iq.type_, IqType::Set | IqType::Get) {
            return true; // an answer to nothing we asked: the exchange's, dropped
        }
        let refuse = |condition, text: &str| iq.error(ErrorType::Cancel, condition, text);
        let reply = match message {
            Err(e) => refuse(DefinedCondition::BadRequest, &e.to_string()),
            Ok(_) if iq.type_ != IqType::Set => {
                refuse(DefinedCondition::BadRequest, "pairing requests are IQ sets")
            }
            Ok(pake @ PairMessage::Pake(_)) => self.pair_start(key, iq, pake),
            Ok(confirm @ PairMessage::Confirm(_)) => {
                let (reply, paired) = self.pair_confirm(key, iq, confirm).await;
                if let Some(reply) = reply {
                    self.send_inner(key, reply);
                }
                if paired {
                    // What waited for this peer may go now that its key is trusted.
                    self.send_waiting(key).await;
                }
                return true;
            }
        };
        self.send_inner(key, reply);
        true
    }

    /// Ends a tunnel admitted for pairing that will not pair, as a key that was refused.
    pub(super) fn close_unpaired(&mut self, key: &TunnelKey) {
        let now = tokio::time::Instant::now().into_std();
        let Some(live) = self.tunnels.get_mut(key) else {
            return;
        };
        let spki = live.record.peer_identity.spki_sha256.as_deref();
        let Some(presented) = spki.and_then(Fingerprint::parse) else {
            return;
        };
        let refusal = VerifyError::NotPinned {
            jid: bare(&key.peer).to_owned(),
            presented,
        };
        live.refused = true;
        live.tunnel
            .close_because(now, CloseReason::CertificateRejected(refusal));
    }

    /// Writes an answer of the exchange into the tunnel.
    fn send_inner(&mut self, key: &TunnelKey, reply: Element) {
        let now = tokio::time::Instant::now().into_std();
        if let Some(live) = self.tunnels.get_mut(key)
            && let Err(e) = live.tunnel.send(now, reply)
        {
            tracing::warn!(error = %e, tunnel = %live.record.id, "pairing answer not sent");
        }
    }

    /// The peer's SPAKE2 message: answered with ours when a code waits for it.
    fn pair_start(&mut self, key: &TunnelKey, iq: &Iq, pake: PairMessage) -> Element {
        let peer = bare(&key.peer);
        let Some((code, _)) = self.shared.pairings.code(&self.bot.jid, peer) else {
            return iq.error(
                ErrorType::Cancel,
                DefinedCondition::NotAuthorized,
                "no pairing code is waiting for you",
            );
        };
        let Some(live) = self.tunnels.get_mut(key) else {
            return iq.error(ErrorType::Cancel, DefinedCondition::ItemNotFound, "");
        };
        let mut cb: ChannelBinding = [0; 32];
        if live
            .tunnel
            .export_keying_material(&mut cb, CHANNEL_BINDING_LABEL, b"")
            .is_none()
        {
            return iq.error(
                ErrorType::Wait,
                DefinedCondition::UnexpectedRequest,
                "not open",
            );
        }
        match Verifier::respond(&code, peer, &self.bot.jid, pake, &cb) {
            Ok((verifier, ours)) => {
                live.pair = Some((verifier, code));
                iq.result(Some(ours.to_element()))
            }
            Err(e) => iq.error(
                ErrorType::Modify,
                DefinedCondition::BadRequest,
                &e.to_string(),
            ),
        }
    }

    /// The peer's confirmation: the right code pins its key verified (the answer, and whether
    /// the tunnel was provisional and is trusted now); a wrong one counts.
    async fn pair_confirm(
        &mut self,
        key: &TunnelKey,
        iq: &Iq,
        confirm: PairMessage,
    ) -> (Option<Element>, bool) {
        let now = tokio::time::Instant::now().into_std();
        let peer = bare(&key.peer).to_owned();
        let Some(live) = self.tunnels.get_mut(key) else {
            return (
                Some(iq.error(ErrorType::Cancel, DefinedCondition::ItemNotFound, "")),
                false,
            );
        };
        let Some((verifier, used)) = live.pair.take() else {
            return (
                Some(iq.error(
                    ErrorType::Cancel,
                    DefinedCondition::UnexpectedRequest,
                    "no pairing exchange to confirm",
                )),
                false,
            );
        };
        // The code must still be the one the exchange began with: one minted meanwhile
        // replaces it, and an old code someone else holds must not pair.
        let current = self.shared.pairings.code(&self.bot.jid, &peer);
        let confirmed = match current {
            Some((code, _)) if code == used => verifier.on_confirm(confirm),
            _ => Err(xtls::pair::PairError::Mismatch),
        };
        let ours = match confirmed {
            Ok(ours) => ours,
            Err(e) => {
                self.shared.pairings.failed(&self.bot.jid, &peer);
                tracing::warn!(bot = self.bot.jid, peer, tunnel = %live.record.id, "pairing failed: wrong code");
                let refusal = iq.error(
                    ErrorType::Cancel,
                    DefinedCondition::NotAuthorized,
                    &e.to_string(),
                );
                // A tunnel admitted for pairing alone has nothing left to do: the answer,
                // then the close, as a refused key.
                if live.record.peer_identity.trust == PeerTrust::Pairing {
                    if let Err(e) = live.tunnel.send(now, refusal) {
                        tracing::warn!(error = %e, "pairing refusal not sent");
                    }
                    self.close_unpaired(key);
                    return (None, false);
                }
                return (Some(refusal), false);
            }
        };
        let Some((_, minter)) = self.shared.pairings.code(&self.bot.jid, &peer) else {
            return (
                Some(iq.error(
                    ErrorType::Cancel,
                    DefinedCondition::NotAuthorized,
                    "the code expired",
                )),
                false,
            );
        };
        let Some(spki) = live
            .record
            .peer_identity
            .spki_sha256
            .as_deref()
            .and_then(Fingerprint::parse)
        else {
            return (
                Some(iq.error(
                    ErrorType::Cancel,
                    DefinedCondition::NotAcceptable,
                    "no key to pair",
                )),
                false,
            );
        };
        let change = PinChange {
            bot: &self.bot.jid,
            peer: &peer,
            spki: &spki,
            verified: true,
            compared: Some("pairing".into()),
            actor: &minter,
        };
        let action = match self.shared.store.set_pin(&change).await {
            Ok((_, _, action)) => action,
            Err(e) => {
                tracing::error!(error = %e, "cannot store the paired key");
                return (
                    Some(iq.error(ErrorType::Wait, DefinedCondition::InternalServerError, "")),
                    false,
                );
            }
        };
        self.shared.pairings.used(&self.bot.jid, &peer);
        tracing::info!(bot = self.bot.jid, peer, spki = %spki, actor = minter, "peer key verified by pairing");
        let reply = iq.result(Some(ours.to_element()));
        let Some(live) = self.tunnels.get_mut(key) else {
            return (Some(reply), false);
        };
        let was_pairing = live.record.peer_identity.trust == PeerTrust::Pairing;
        let id = Some(live.record.id.clone());
        if was_pairing {
            live.record.peer_identity.trust = PeerTrust::Pinned;
            self.shared.table.put(&live.record);
            // Only now is the tunnel the bot's: established, with the key it trusts.
            if let Some(est) = live.tunnel.established() {
                let established = BotEvent::TunnelEstablished {
                    tls_version: est.tls_version.clone(),
                    cipher_suite: est.cipher_suite.clone(),
                    identity: crate::delivery::event::Identity {
                        spki_sha256: Some(spki.to_string()),
                        trust: xtls::tunnel::TrustVerdict::Pinned,
                    },
                };
                self.log(
                    None,
                    established.into_row(id.clone(), Some(key.peer.clone())),
                );
            }
        }
        let decision = BotEvent::PeerKeyDecision {
            peer: peer.clone(),
            spki_sha256: spki.to_string(),
            action,
            actor: minter,
            compared: Some("pairing".into()),
        };
        self.log(None, decision.into_row(id, Some(key.peer.clone())));
        (Some(reply), was_pairing)
    }
}
