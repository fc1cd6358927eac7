//! Checking a peer's key inside an open tunnel (docs/verification.md): the short
//! authentication string, from either end, and pairing with a code the peer's operator gave.
//!
//! It is fed the inner IQs of one tunnel and answers with the IQs to send back through it
//! and what to tell the person; the tunnel's exporter is handed in, never held.

use minidom::Element;
use xtls::pair::{self, Claimant, Claimed, PairMessage};
use xtls::sas::{self, Answerer, Committer, SasCode, SasMessage};
use xtls::stanza::{DefinedCondition, ErrorType, Iq, IqType, build_iq, error_element};

/// Fills a buffer from the tunnel's TLS exporter: `(out, label, context)`.
pub type Exporter<'a> = &'a dyn Fn(&mut [u8], &[u8], &[u8]) -> Option<()>;

/// What the verification asks of the chat.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this inner stanza through the tunnel.
    Send(Element),
    /// Both ends now show this code: ask the person to compare.
    Code(SasCode),
    /// The exchange failed; say why.
    Failed(String),
    /// Pairing succeeded: the peer knew the code.
    Paired,
}

enum Sas {
    /// We committed (request id); waiting for the peer's nonce.
    Committed(String, Committer),
    /// We revealed (request id); the code is known once the peer accepts the reveal.
    Revealed(String, SasCode),
    /// The peer committed and we answered with our nonce; waiting for its reveal.
    Answered(Answerer),
}

enum Pair {
    /// Our SPAKE2 message went out (request id).
    Started(String, Claimant),
    /// Our confirmation went out (request id).
    Confirming(String, Claimed),
}

/// The verification state of one tunnel.
#[derive(Default)]
pub struct Verification {
    sas: Option<Sas>,
    pair: Option<Pair>,
    /// Our commit's request id, when the peer's commit crossed it and ours was given up.
    abandoned: Option<String>,
    next_id: u64,
}

impl Verification {
    /// Starts a short authentication string exchange as the committer.
    pub fn start_sas(&mut self) -> Element {
        let (committer, commit) = Committer::start(rand::random());
        let id = self.id("sas");
        let request = build_request(&id, commit.to_element());
        self.sas = Some(Sas::Committed(id, committer));
        request
    }

    /// Starts pairing with the code the peer's operator gave.
    pub fn start_pair(&mut self, code: &str, own_bare: &str, peer_bare: &str) -> Element {
        let (claimant, pake) = Claimant::start(code, own_bare, peer_bare);
        let id = self.id("pair");
        let request = build_request(&id, pake.to_element());
        self.pair = Some(Pair::Started(id, claimant));
        request
    }

    /// Handles an inner IQ of the tunnel; `None` when it is no part of a verification.
    pub fn on_iq(&mut self, stanza: &Element, export: Exporter<'_>) -> Option<Vec<Step>> {
        let iq = Iq::parse(stanza).ok()?;
        if iq.type_.is_request() {
            let payload = iq.single_payload()?;
            let message = SasMessage::parse(payload)?;
            return Some(self.on_sas_request(&iq, message, export));
        }
        if let Some(steps) = self.on_sas_answer(&iq, export) {
            return Some(steps);
        }
        self.on_pair_answer(&iq, export)
    }

    fn on_sas_request(
        &mut self,
        iq: &Iq,
        message: Result<SasMessage, sas::SasError>,
        export: Exporter<'_>,
    ) -> Vec<Step> {
        let refuse = |condition, text: &str| vec![Step::Send(answer_error(iq, condition, text))];
        if iq.type_ != IqType::Set {
            return refuse(
                DefinedCondition::BadRequest,
                "SAS messages travel in IQ set",
            );
        }
        let message = match message {
            Ok(m) => m,
            Err(e) => return refuse(DefinedCondition::BadRequest, &e.to_string()),
        };
        match message {
            SasMessage::Commit(_) => {
                // A new commit starts over, whatever was in flight; ours, if it crossed theirs,
                // is given up (its answer is then reported, not ignored).
                if let Some(Sas::Committed(id, _)) = &self.sas {
                    self.abandoned = Some(id.clone());
                }
                let (answerer, nonce) =
                    Answerer::on_commit(message, rand::random()).expect("a commit");
                self.sas = Some(Sas::Answered(answerer));
                vec![Step::Send(answer(iq, Some(nonce.to_element())))]
            }
            SasMessage::Reveal(_) => {
                let Some(Sas::Answered(answerer)) = &self.sas else {
                    return refuse(DefinedCondition::UnexpectedRequest, "no commitment before");
                };
                match answerer.on_reveal(message) {
                    Ok(context) => {
                        self.sas = None;
                        match code(export, &context) {
                            Some(code) => vec![Step::Send(answer(iq, None)), Step::Code(code)],
                            None => vec![
                                Step::Send(answer(iq, None)),
                                Step::Failed("the tunnel has no exporter any more".into()),
                            ],
                        }
                    }
                    Err(e) => {
                        self.sas = None;
                        vec![
                            Step::Send(answer_error(iq, DefinedCondition::NotAcceptable, "")),
                            Step::Failed(format!(
                                "{e}: someone changed the exchange on its way; do not trust \
                                 this tunnel"
                            )),
                        ]
                    }
                }
            }
            SasMessage::Nonce(_) => refuse(DefinedCondition::BadRequest, "a nonce is an answer"),
        }
    }

    fn on_sas_answer(&mut self, iq: &Iq, export: Exporter<'_>) -> Option<Vec<Step>> {
        if self.abandoned.as_deref() == Some(iq.id.as_str()) {
            self.abandoned = None;
            return Some(vec![Step::Failed(
                "both ends started a comparison at once; the peer's goes on, or run /sas again"
                    .into(),
            )]);
        }
        match self.sas.take() {
            Some(Sas::Committed(id, mut committer)) if id == iq.id => {
                if iq.type_ == IqType::Error {
                    return Some(vec![Step::Failed(format!(
                        "the peer refused the exchange ({})",
                        iq.error_condition()
                    ))]);
                }
                let message = iq
                    .single_payload()
                    .and_then(SasMessage::parse)
                    .and_then(Result::ok);
                let Some(message) = message else {
                    return Some(vec![Step::Failed("the peer's nonce is unreadable".into())]);
                };
                let (reveal, context) = match committer.on_nonce(message) {
                    Ok(next) => next,
                    Err(e) => return Some(vec![Step::Failed(e.to_string())]),
                };
                let Some(code) = code(export, &context) else {
                    return Some(vec![Step::Failed(
                        "the tunnel has no exporter any more".into(),
                    )]);
                };
                let id = self.id("sas");
                let request = build_request(&id, reveal.to_element());
                self.sas = Some(Sas::Revealed(id, code));
                Some(vec![Step::Send(request)])
            }
            Some(Sas::Revealed(id, code)) if id == iq.id => Some(if iq.type_ == IqType::Error {
                vec![Step::Failed(format!(
                    "the peer did not accept our reveal ({}): someone changed the exchange on \
                     its way; do not trust this tunnel",
                    iq.error_condition()
                ))]
            } else {
                vec![Step::Code(code)]
            }),
            other => {
                self.sas = other;
                None
            }
        }
    }

    fn on_pair_answer(&mut self, iq: &Iq, export: Exporter<'_>) -> Option<Vec<Step>> {
        match self.pair.take() {
            Some(Pair::Started(id, claimant)) if id == iq.id => {
                let message = match pair_answer(iq) {
                    Ok(message) => message,
                    Err(step) => return Some(vec![step]),
                };
                let mut cb = [0u8; 32];
                if export(&mut cb, pair::CHANNEL_BINDING_LABEL, &[]).is_none() {
                    return Some(vec![Step::Failed(
                        "the tunnel has no exporter any more".into(),
                    )]);
                }
                let (claimed, confirm) = match claimant.on_pake(message, &cb) {
                    Ok(next) => next,
                    Err(e) => return Some(vec![Step::Failed(format!("pairing failed: {e}"))]),
                };
                let id = self.id("pair");
                let request = build_request(&id, confirm.to_element());
                self.pair = Some(Pair::Confirming(id, claimed));
                Some(vec![Step::Send(request)])
            }
            Some(Pair::Confirming(id, claimed)) if id == iq.id => {
                let message = match pair_answer(iq) {
                    Ok(message) => message,
                    Err(step) => return Some(vec![step]),
                };
                Some(match claimed.on_confirm(message) {
                    Ok(()) => vec![Step::Paired],
                    _ => vec![Step::Failed(
                        "the peer's confirmation does not match: it does not know the code, or \
                         someone is in the middle; do not trust this tunnel"
                            .into(),
                    )],
                })
            }
            other => {
                self.pair = other;
                None
            }
        }
    }

    fn id(&mut self, kind: &str) -> String {
        self.next_id += 1;
        format!("{kind}-{:08x}-{}", rand::random::<u32>(), self.next_id)
    }
}

/// The peer's pairing message in an answer, or the step that says why there is none.
fn pair_answer(iq: &Iq) -> Result<PairMessage, Step> {
    if iq.type_ == IqType::Error {
        let condition = iq.error_condition();
        let why = match condition.as_str() {
            "not-authorized" => "wrong or expired code, or the peer expects no code from you",
            _ => "refused",
        };
        return Err(Step::Failed(format!("pairing failed: {why} ({condition})")));
    }
    iq.single_payload()
        .and_then(PairMessage::parse)
        .and_then(Result::ok)
        .ok_or_else(|| Step::Failed("the peer's pairing answer is unreadable".into()))
}

fn code(export: Exporter<'_>, context: &[u8]) -> Option<SasCode> {
    let mut out = [0u8; sas::EXPORT_LEN];
    export(&mut out, sas::EXPORTER_LABEL, context)?;
    Some(SasCode::from_export(&out))
}

/// An inner IQ set: no addresses, the tunnel stands for them.
fn build_request(id: &str, payload: Element) -> Element {
    let mut iq = build_iq(IqType::Set, id, "", "", Some(payload));
    strip_routing(&mut iq);
    iq
}

fn answer(iq: &Iq, payload: Option<Element>) -> Element {
    let mut reply = iq.result(payload);
    strip_routing(&mut reply);
    reply
}

fn answer_error(iq: &Iq, condition: DefinedCondition, text: &str) -> Element {
    let mut reply = build_iq(IqType::Error, &iq.id, "", "", None);
    reply.append_child(error_element(ErrorType::Cancel, condition, text));
    strip_routing(&mut reply);
    reply
}

fn strip_routing(iq: &mut Element) {
    xtls::stanza::remove_attr(iq, "from");
    xtls::stanza::remove_attr(iq, "to");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two verifications wired to each other with one shared "exporter": the committer's
    /// and the answerer's codes are the same.
    #[test]
    fn both_ends_of_an_exchange_show_the_same_code() {
        let export = |out: &mut [u8], label: &[u8], context: &[u8]| {
            for (i, b) in out.iter_mut().enumerate() {
                *b = label.len() as u8 ^ context[i % context.len()] ^ i as u8;
            }
            Some(())
        };
        let mut c = Verification::default();
        let mut a = Verification::default();
        let commit = c.start_sas();
        let mut to_c = a.on_iq(&commit, &export).unwrap();
        let Step::Send(nonce) = to_c.remove(0) else {
            panic!()
        };
        let mut to_a = c.on_iq(&nonce, &export).unwrap();
        let Step::Send(reveal) = to_a.remove(0) else {
            panic!()
        };
        let steps = a.on_iq(&reveal, &export).unwrap();
        let [Step::Send(done), Step::Code(code_a)] = <[Step; 2]>::try_from(steps).unwrap() else {
            panic!()
        };
        let steps = c.on_iq(&done, &export).unwrap();
        assert_eq!(steps, vec![Step::Code(code_a)]);
    }

    #[test]
    fn crossing_commits_end_in_one_exchange_and_the_given_up_one_is_reported() {
        let export = |out: &mut [u8], _: &[u8], context: &[u8]| {
            out.copy_from_slice(&context[..out.len()]);
            Some(())
        };
        let mut a = Verification::default();
        let mut b = Verification::default();
        let commit_a = a.start_sas();
        let commit_b = b.start_sas();
        // Each gets the other's commit and answers it, giving up its own.
        let Step::Send(nonce_for_b) = a.on_iq(&commit_b, &export).unwrap().remove(0) else {
            panic!()
        };
        let Step::Send(nonce_for_a) = b.on_iq(&commit_a, &export).unwrap().remove(0) else {
            panic!()
        };
        let told_a = a.on_iq(&nonce_for_a, &export).unwrap();
        assert!(
            matches!(&told_a[..], [Step::Failed(why)] if why.contains("at once")),
            "{told_a:?}"
        );
        let told_b = b.on_iq(&nonce_for_b, &export).unwrap();
        assert!(matches!(&told_b[..], [Step::Failed(_)]), "{told_b:?}");
    }

    #[test]
    fn a_reveal_that_does_not_match_the_commitment_fails_and_says_so() {
        let export = |out: &mut [u8], _: &[u8], _: &[u8]| {
            out.fill(7);
            Some(())
        };
        let mut c = Verification::default();
        let mut a = Verification::default();
        let commit = c.start_sas();
        let steps = a.on_iq(&commit, &export).unwrap();
        let Step::Send(nonce) = &steps[0] else {
            panic!()
        };
        let mut to_a = c.on_iq(nonce, &export).unwrap();
        let Step::Send(mut reveal) = to_a.remove(0) else {
            panic!()
        };
        let forged = SasMessage::Reveal([9; 32]).to_element();
        reveal = {
            let id = reveal.attr("id").unwrap().to_owned();
            build_request(&id, forged)
        };
        let steps = a.on_iq(&reveal, &export).unwrap();
        assert!(matches!(&steps[0], Step::Send(e) if e.attr("type") == Some("error")));
        assert!(matches!(&steps[1], Step::Failed(why) if why.contains("commitment")));
    }
}
