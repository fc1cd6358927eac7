//! Short authentication strings in a bot's driver: the exchange of `xtls::sas` over a live
//! tunnel's inner IQs, in either direction, and the decision a person takes on the code.
//!
//! The peer may start (it commits, the bot answers) or the bot may, when the API asks (the bot
//! commits). Once both nonces are in, the code is in the tunnel's row (`sas`) and in a
//! `tunnel.sas` event; confirming it over the API verifies the peer's key (audited, `compared`
//! `sas:<code>`), rejecting it closes the tunnel. The exchange's IQs never reach the handler.

use tokio::time::Instant;

use crate::delivery::event::BotEvent;
use crate::store::{PinChange, SasSide, SasState, SasStatus};
use xtls::certs::Fingerprint;
use xtls::sas::{Answerer, Committer, EXPORT_LEN, EXPORTER_LABEL, SasCode, SasError, SasMessage};
use xtls::stanza::{DefinedCondition, ErrorType, Iq, IqType, build_iq};
use xtls::tunnel::{State, TunnelKey, bare};

use super::driver::{BotDriver, Live};

/// Where a tunnel's exchange is, beyond what its row shows.
#[derive(Debug)]
pub(super) enum SasEngine {
    /// We committed; waiting for the result carrying the peer's nonce.
    Committed { committer: Committer, id: String },
    /// We revealed; waiting for the peer's acknowledgement (the code is already known).
    Revealed { id: String },
    /// The peer committed and has our nonce; waiting for its reveal.
    Answered { answerer: Answerer },
    /// Nothing in flight.
    Idle,
}

/// What the API asks of a tunnel's exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SasRequest {
    /// Start an exchange, the bot committing.
    Start,
    /// The person says the codes match, as `actor`: the peer's key becomes verified.
    Confirm {
        /// Who decided: `admin` or `bot-token:<id>`.
        actor: String,
        /// The code they compared, when they say (either form): it must be the tunnel's.
        code: Option<String>,
    },
    /// The person says the codes differ: the tunnel is closed.
    Reject {
        /// Who decided.
        actor: String,
    },
}

/// Why the API's request could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasRefusal {
    /// No live tunnel has that id.
    #[error("no live tunnel with that id")]
    NoTunnel,
    /// The tunnel is not open, or presented no certificate to verify.
    #[error("the tunnel is not open with an authenticated peer")]
    NotOpen,
    /// An exchange is in flight, or the code is not ready to decide on.
    #[error("{0}")]
    Conflict(&'static str),
    /// The code the person compared is not the tunnel's.
    #[error("that is not the tunnel's code: nothing was confirmed")]
    WrongCode,
    /// The store failed.
    #[error("the store failed: {0}")]
    Store(String),
}

fn nonce() -> [u8; 32] {
    rand::random()
}

impl BotDriver {
    /// Takes an inner stanza that belongs to a short authentication string exchange; `false`
    /// when it is none of the exchange's and goes to the handler.
    pub(super) fn on_sas_iq(&mut self, key: &TunnelKey, iq: &Iq) -> bool {
        match iq.type_ {
            IqType::Set | IqType::Get => {
                let Some(result) = iq.children.first().and_then(SasMessage::parse) else {
                    return false;
                };
                self.on_sas_request(key, iq, result);
                true
            }
            IqType::Result | IqType::Error => {
                let Some(live) = self.tunnels.get(key) else {
                    return false;
                };
                let awaited = match &live.sas {
                    SasEngine::Committed { id, .. } | SasEngine::Revealed { id } => *id == iq.id,
                    _ => false,
                };
                // An answer to an exchange given up since is the exchange's too: dropped.
                let ours = awaited || live.sas_ids.contains(&iq.id);
                if awaited {
                    self.on_sas_answer(key, iq);
                }
                ours
            }
        }
    }

    /// The peer commits or reveals.
    fn on_sas_request(&mut self, key: &TunnelKey, iq: &Iq, message: Result<SasMessage, SasError>) {
        let now = Instant::now().into_std();
        let Some(live) = self.tunnels.get_mut(key) else {
            return;
        };
        let refuse = |condition, text: &str| iq.error(ErrorType::Cancel, condition, text);
        let (reply, status) = match (message, std::mem::replace(&mut live.sas, SasEngine::Idle)) {
            (Err(e), engine) => {
                live.sas = engine;
                (refuse(DefinedCondition::BadRequest, &e.to_string()), None)
            }
            (Ok(_), engine) if iq.type_ != IqType::Set => {
                live.sas = engine;
                (
                    refuse(DefinedCondition::BadRequest, "SAS requests are IQ sets"),
                    None,
                )
            }
            // A commit starts a new exchange, whatever was in flight: the peer may restart
            // one it gave up on, and each new one has new nonces, so a new code.
            (Ok(commit @ SasMessage::Commit(_)), _) => {
                let (answerer, ours) = Answerer::on_commit(commit, nonce()).expect("a commit");
                live.sas = SasEngine::Answered { answerer };
                let status = exchanging(SasSide::Peer);
                (iq.result(Some(ours.to_element())), Some(status))
            }
            (Ok(reveal @ SasMessage::Reveal(_)), SasEngine::Answered { answerer }) => {
                match answerer.on_reveal(reveal) {
                    Ok(context) => {
                        let status = match code(&live.tunnel, &context) {
                            Some(code) => ready(SasSide::Peer, code),
                            None => failed(SasSide::Peer, "the tunnel closed during the exchange"),
                        };
                        (iq.result(None), Some(status))
                    }
                    Err(e) => (
                        refuse(DefinedCondition::NotAcceptable, &e.to_string()),
                        Some(failed(SasSide::Peer, &e.to_string())),
                    ),
                }
            }
            (Ok(_), engine) => {
                live.sas = engine;
                let text = "no SAS exchange to continue";
                (refuse(DefinedCondition::UnexpectedRequest, text), None)
            }
        };
        if let Err(e) = live.tunnel.send(now, reply) {
            tracing::warn!(error = %e, tunnel = %live.record.id, "SAS answer not sent");
        }
        if let Some(status) = status {
            self.sas_moved(key, status);
        }
    }

    /// The peer answers our commit (its nonce) or our reveal.
    fn on_sas_answer(&mut self, key: &TunnelKey, iq: &Iq) {
        let Some(live) = self.tunnels.get_mut(key) else {
            return;
        };
        let engine = std::mem::replace(&mut live.sas, SasEngine::Idle);
        if iq.type_ == IqType::Error {
            // Refusing our reveal means our nonce did not match what the peer saw committed:
            // someone changed a message, whatever the code says.
            let why = format!("the peer refused: {}", iq.error_condition());
            self.sas_moved(key, failed(SasSide::Bot, &why));
            return;
        }
        let SasEngine::Committed { mut committer, .. } = engine else {
            return; // the result to our reveal: nothing more to do
        };
        let answer = iq.children.first().and_then(SasMessage::parse);
        let status = match answer.map(|m| m.and_then(|m| committer.on_nonce(m))) {
            Some(Ok((reveal, context))) => {
                match (
                    send_request(live, key, &reveal),
                    code(&live.tunnel, &context),
                ) {
                    (Ok(id), Some(code)) => {
                        live.sas = SasEngine::Revealed { id };
                        ready(SasSide::Bot, code)
                    }
                    _ => failed(SasSide::Bot, "the tunnel closed during the exchange"),
                }
            }
            Some(Err(e)) => failed(SasSide::Bot, &e.to_string()),
            None => failed(SasSide::Bot, "the peer answered without its nonce"),
        };
        self.sas_moved(key, status);
    }

    /// Carries out the API's request on the tunnel with this id.
    pub(super) async fn sas_request(
        &mut self,
        tunnel: &crate::store::TunnelId,
        request: SasRequest,
    ) -> Result<SasStatus, SasRefusal> {
        let now = Instant::now().into_std();
        let key = self
            .tunnels
            .iter()
            .find(|(_, l)| l.record.id == *tunnel)
            .map(|(k, _)| k.clone())
            .ok_or(SasRefusal::NoTunnel)?;
        let live = self.tunnels.get_mut(&key).expect("found");
        if live.tunnel.state() != State::Open || !live.trusted() {
            return Err(SasRefusal::NotOpen);
        }
        match request {
            // A new exchange replaces one in flight (the peer may have given up on it).
            SasRequest::Start => {
                let (committer, commit) = Committer::start(nonce());
                let id = send_request(live, &key, &commit).map_err(|_| SasRefusal::NotOpen)?;
                live.sas = SasEngine::Committed { committer, id };
                let status = exchanging(SasSide::Bot);
                self.sas_moved(&key, status.clone());
                Ok(status)
            }
            SasRequest::Confirm { actor, code } => {
                let mut status = awaiting_decision(&live.record)?;
                if let Some(code) = code.as_deref().map(str::trim) {
                    let lower = code.to_lowercase();
                    if status.sas28x5.as_deref() != Some(lower.as_str())
                        && status.decimal.as_deref() != Some(code)
                    {
                        return Err(SasRefusal::WrongCode);
                    }
                }
                let spki = live
                    .record
                    .peer_identity
                    .spki_sha256
                    .as_deref()
                    .and_then(Fingerprint::parse)
                    .ok_or(SasRefusal::NotOpen)?;
                let peer = bare(&key.peer).to_owned();
                let compared = format!("sas:{}", status.sas28x5.as_deref().unwrap_or_default());
                let change = PinChange {
                    bot: &self.bot.jid,
                    peer: &peer,
                    spki: &spki,
                    verified: true,
                    compared: Some(compared.clone()),
                    actor: &actor,
                };
                let (_, _, action) = self
                    .shared
                    .store
                    .set_pin(&change)
                    .await
                    .map_err(|e| SasRefusal::Store(e.to_string()))?;
                tracing::info!(bot = self.bot.jid, peer, spki = %spki, actor, "peer key verified by SAS");
                let decision = BotEvent::PeerKeyDecision {
                    peer: peer.clone(),
                    spki_sha256: spki.to_string(),
                    action,
                    actor,
                    compared: Some(compared),
                };
                let id = Some(tunnel.clone());
                self.log(None, decision.into_row(id, Some(key.peer.clone())));
                status.state = SasState::Confirmed;
                self.sas_moved(&key, status.clone());
                Ok(status)
            }
            SasRequest::Reject { actor } => {
                let mut status = awaiting_decision(&live.record)?;
                tracing::warn!(bot = self.bot.jid, peer = key.peer, tunnel = %tunnel, actor, "SAS codes differ: tunnel closed");
                live.tunnel.close(now);
                status.state = SasState::Rejected;
                self.sas_moved(&key, status.clone());
                Ok(status)
            }
        }
    }

    /// Puts a new status in the tunnel's row and the bot's log.
    fn sas_moved(&mut self, key: &TunnelKey, status: SasStatus) {
        let Some(live) = self.tunnels.get_mut(key) else {
            return;
        };
        if !matches!(status.state, SasState::Exchanging) {
            live.sas = match std::mem::replace(&mut live.sas, SasEngine::Idle) {
                // Still waiting for the acknowledgement of our reveal, whatever was decided:
                // it is the exchange's, never the handler's.
                revealed @ SasEngine::Revealed { .. } if status.state != SasState::Failed => {
                    revealed
                }
                _ => SasEngine::Idle,
            };
        }
        live.record.sas = Some(status.clone());
        self.shared.table.put(&live.record);
        let id = Some(live.record.id.clone());
        self.log(
            None,
            BotEvent::TunnelSas(status).into_row(id, Some(key.peer.clone())),
        );
    }
}

/// The tunnel's status when its code waits for a person's decision.
fn awaiting_decision(record: &crate::store::TunnelRecord) -> Result<SasStatus, SasRefusal> {
    record
        .sas
        .clone()
        .filter(|s| s.state == SasState::Ready)
        .ok_or(SasRefusal::Conflict("no code is waiting for a decision"))
}

/// Sends one of the exchange's requests into the tunnel, under a new id (unpredictable, as
/// every id we originate) kept with the tunnel's few newest; the id.
fn send_request(
    live: &mut Live,
    key: &TunnelKey,
    message: &SasMessage,
) -> Result<String, xtls::tunnel::SendError> {
    let id = format!("sas-{:016x}", rand::random::<u64>());
    let request = build_iq(
        IqType::Set,
        &id,
        &key.local,
        &key.peer,
        Some(message.to_element()),
    );
    live.tunnel.send(Instant::now().into_std(), request)?;
    if live.sas_ids.len() >= 8 {
        live.sas_ids.remove(0);
    }
    live.sas_ids.push(id.clone());
    Ok(id)
}

fn exchanging(by: SasSide) -> SasStatus {
    SasStatus {
        state: SasState::Exchanging,
        started_by: by,
        sas28x5: None,
        decimal: None,
        error: None,
    }
}

/// The code of an open tunnel for this exporter context.
fn code(tunnel: &xtls::tunnel::Tunnel, context: &[u8]) -> Option<SasCode> {
    let mut out = [0u8; EXPORT_LEN];
    tunnel.export_keying_material(&mut out, EXPORTER_LABEL, context)?;
    Some(SasCode::from_export(&out))
}

fn ready(by: SasSide, code: SasCode) -> SasStatus {
    SasStatus {
        state: SasState::Ready,
        started_by: by,
        sas28x5: Some(code.sas28x5),
        decimal: Some(code.decimal),
        error: None,
    }
}

fn failed(by: SasSide, why: &str) -> SasStatus {
    SasStatus {
        state: SasState::Failed,
        started_by: by,
        sas28x5: None,
        decimal: None,
        error: Some(why.to_owned()),
    }
}
