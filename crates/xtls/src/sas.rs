//! Short authentication strings: a commit–reveal exchange inside an open tunnel, then a short
//! code both people compare (docs/verification.md).
//!
//! Whoever starts (either TLS role) is the *committer*: it sends the SHA-256 of a fresh 32-byte
//! nonce `nC`; the other side answers with its own nonce `nA`; the committer reveals `nC`, which
//! the other side checks against the commitment. Both then derive
//! `E = TLS-Exporter("EXPERIMENTAL-xtls-sas", nC ‖ nA, 32)` and show `sas28x5(E[0..3])` and six
//! decimal digits. The committer fixes its nonce before it sees the other's, and the other
//! sends its nonce before it sees the committer's, so a man in the middle, who holds two TLS
//! sessions, gets one 2^-24 guess per attempt instead of grinding.
//!
//! The three messages are inner IQs of namespace [`NS`]; this module builds and reads their
//! payloads and keeps the state, sans IO: the caller sends and receives the IQs through the
//! tunnel and supplies the exporter output ([`crate::tunnel::Tunnel::export_keying_material`]).

use std::fmt;

use minidom::Element;
use sha2::{Digest, Sha256};

use crate::stanza::xtls::{decode_data, encode_data};

/// The inner namespace of the exchange.
pub const NS: &str = "urn:xmpp:tmp:xtls:sas";
/// The TLS exporter label (RFC 5705 private use).
pub const EXPORTER_LABEL: &[u8] = b"EXPERIMENTAL-xtls-sas";
/// Nonce length, bytes.
pub const NONCE_LEN: usize = 32;
/// Exporter output length, bytes.
pub const EXPORT_LEN: usize = 32;
/// The alphabet of `sas28x5` (XEP-0116).
const SAS28: &[u8; 28] = b"acdefghikmopqruvwxy123456789";

/// A nonce of the exchange.
pub type Nonce = [u8; NONCE_LEN];

/// The code people compare, in both forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasCode {
    /// Five base-28 characters from the first 24 bits (XEP-0116 `sas28x5`).
    pub sas28x5: String,
    /// Six decimal digits: the first 32 bits, big-endian, modulo 10^6.
    pub decimal: String,
}

impl SasCode {
    /// The code of an exporter output.
    pub fn from_export(e: &[u8; EXPORT_LEN]) -> SasCode {
        let mut n = u32::from_be_bytes([0, e[0], e[1], e[2]]);
        let mut digits = [0u8; 5];
        for d in digits.iter_mut().rev() {
            *d = SAS28[(n % 28) as usize];
            n /= 28;
        }
        let decimal = u32::from_be_bytes([e[0], e[1], e[2], e[3]]) % 1_000_000;
        SasCode {
            sas28x5: String::from_utf8(digits.to_vec()).expect("ASCII alphabet"),
            decimal: format!("{decimal:06}"),
        }
    }
}

impl fmt::Display for SasCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.sas28x5, self.decimal)
    }
}

/// The exporter context: the committer's nonce, then the other side's.
pub fn exporter_context(committed: &Nonce, answered: &Nonce) -> [u8; 2 * NONCE_LEN] {
    let mut context = [0u8; 2 * NONCE_LEN];
    context[..NONCE_LEN].copy_from_slice(committed);
    context[NONCE_LEN..].copy_from_slice(answered);
    context
}

/// One message of the exchange, as carried in an inner IQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SasMessage {
    /// `<commit/>` in an IQ set: SHA-256 of the committer's nonce.
    Commit([u8; 32]),
    /// `<nonce/>` in the result to the commit: the other side's nonce.
    Nonce(Nonce),
    /// `<reveal/>` in an IQ set: the committer's nonce.
    Reveal(Nonce),
}

/// Why a message of the exchange is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// Not an element of the exchange, or not 32 bytes of base64.
    #[error("malformed SAS message: {0}")]
    Malformed(&'static str),
    /// The revealed nonce does not match the commitment: someone changed a message.
    #[error("the revealed nonce does not match its commitment")]
    CommitmentMismatch,
    /// A message out of order.
    #[error("unexpected SAS message in state {0}")]
    Unexpected(&'static str),
}

impl SasMessage {
    /// The payload element.
    pub fn to_element(&self) -> Element {
        let (name, bytes): (&str, &[u8]) = match self {
            SasMessage::Commit(h) => ("commit", h),
            SasMessage::Nonce(n) => ("nonce", n),
            SasMessage::Reveal(n) => ("reveal", n),
        };
        Element::builder(name, NS)
            .append(encode_data(bytes))
            .build()
    }

    /// Reads a payload element; `None` when it is not of [`NS`].
    pub fn parse(el: &Element) -> Option<Result<SasMessage, SasError>> {
        if el.ns() != NS {
            return None;
        }
        // Encoded as `<data/>` is (spec §1.7 rule 1): the same reader, with its size cap.
        let bytes = |el: &Element| -> Result<[u8; 32], SasError> {
            let raw = decode_data(&el.text()).map_err(|_| SasError::Malformed("not base64"))?;
            raw.try_into()
                .map_err(|_| SasError::Malformed("not 32 bytes"))
        };
        Some(match el.name() {
            "commit" => bytes(el).map(SasMessage::Commit),
            "nonce" => bytes(el).map(SasMessage::Nonce),
            "reveal" => bytes(el).map(SasMessage::Reveal),
            _ => Err(SasError::Malformed("unknown element")),
        })
    }
}

/// The commitment to a nonce.
pub fn commitment(nonce: &Nonce) -> [u8; 32] {
    Sha256::digest(nonce).into()
}

/// The side that starts: commits, receives the other's nonce, reveals.
#[derive(Clone)]
pub struct Committer {
    nonce: Nonce,
    answered: Option<Nonce>,
}

impl fmt::Debug for Committer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Committer")
            .field("answered", &self.answered.is_some())
            .finish_non_exhaustive()
    }
}

impl Committer {
    /// Starts with a fresh random nonce; the message to send in an IQ set.
    pub fn start(nonce: Nonce) -> (Committer, SasMessage) {
        let commit = SasMessage::Commit(commitment(&nonce));
        (
            Committer {
                nonce,
                answered: None,
            },
            commit,
        )
    }

    /// Takes the other side's nonce (the result to the commit); the reveal to send in an IQ
    /// set, and the exporter context.
    pub fn on_nonce(
        &mut self,
        message: SasMessage,
    ) -> Result<(SasMessage, [u8; 2 * NONCE_LEN]), SasError> {
        match (message, self.answered) {
            (SasMessage::Nonce(theirs), None) => {
                self.answered = Some(theirs);
                Ok((
                    SasMessage::Reveal(self.nonce),
                    exporter_context(&self.nonce, &theirs),
                ))
            }
            (_, Some(_)) => Err(SasError::Unexpected("revealed")),
            _ => Err(SasError::Unexpected("committed")),
        }
    }
}

/// The side that answers: receives the commitment, sends its nonce, checks the reveal.
#[derive(Clone)]
pub struct Answerer {
    commitment: [u8; 32],
    nonce: Nonce,
}

impl fmt::Debug for Answerer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Answerer").finish_non_exhaustive()
    }
}

impl Answerer {
    /// Takes a commitment with a fresh random nonce of ours; the nonce to put in the result.
    pub fn on_commit(
        message: SasMessage,
        nonce: Nonce,
    ) -> Result<(Answerer, SasMessage), SasError> {
        match message {
            SasMessage::Commit(commitment) => {
                Ok((Answerer { commitment, nonce }, SasMessage::Nonce(nonce)))
            }
            _ => Err(SasError::Unexpected("idle")),
        }
    }

    /// Checks the revealed nonce; the exporter context.
    pub fn on_reveal(&self, message: SasMessage) -> Result<[u8; 2 * NONCE_LEN], SasError> {
        match message {
            SasMessage::Reveal(theirs) if commitment(&theirs) == self.commitment => {
                Ok(exporter_context(&theirs, &self.nonce))
            }
            SasMessage::Reveal(_) => Err(SasError::CommitmentMismatch),
            _ => Err(SasError::Unexpected("answered")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_documented_vectors() {
        let counting: [u8; 32] = std::array::from_fn(|i| i as u8);
        let code = SasCode::from_export(&counting);
        assert_eq!(code.sas28x5, "aaamh");
        assert_eq!(code.decimal, "066051");
        let ones = SasCode::from_export(&[0xff; 32]);
        assert_eq!(ones.sas28x5, "9kiui");
        assert_eq!(ones.decimal, "967295");
        assert_eq!(ones.to_string(), "9kiui (967295)");
    }

    #[test]
    fn both_sides_reach_the_same_context_and_a_changed_nonce_is_caught() {
        let (mut committer, commit) = Committer::start([7; 32]);
        let wire = SasMessage::parse(&commit.to_element()).unwrap().unwrap();
        assert_eq!(wire, commit);
        let (answerer, nonce) = Answerer::on_commit(wire, [9; 32]).unwrap();
        let (reveal, ours) = committer.on_nonce(nonce).unwrap();
        let theirs = answerer.on_reveal(reveal.clone()).unwrap();
        assert_eq!(ours, theirs);
        assert_eq!(&ours[..32], &[7; 32]);
        assert_eq!(&ours[32..], &[9; 32]);
        assert_eq!(
            committer.on_nonce(SasMessage::Nonce([1; 32])),
            Err(SasError::Unexpected("revealed"))
        );

        // A man in the middle that changes the revealed nonce is caught by the commitment.
        assert_eq!(
            answerer.on_reveal(SasMessage::Reveal([8; 32])),
            Err(SasError::CommitmentMismatch)
        );
    }

    proptest::proptest! {
        #[test]
        fn any_payload_reads_without_panic_and_what_reads_writes_back(
            name in "commit|nonce|reveal|other",
            text in "[A-Za-z0-9+/= \t*]{0,60}",
        ) {
            let el = Element::builder(name.as_str(), NS).append(text.as_str()).build();
            if let Some(Ok(message)) = SasMessage::parse(&el) {
                proptest::prop_assert_eq!(SasMessage::parse(&message.to_element()), Some(Ok(message)));
            }
        }
    }

    #[test]
    fn malformed_messages_are_refused_and_foreign_ones_are_not_ours() {
        let el = |xml: &str| -> Element { xml.parse().unwrap() };
        assert_eq!(
            SasMessage::parse(&el("<nonce xmlns='urn:x'>AAAA</nonce>")),
            None
        );
        assert_eq!(
            SasMessage::parse(&el("<nonce xmlns='urn:xmpp:tmp:xtls:sas'>AAAA</nonce>")),
            Some(Err(SasError::Malformed("not 32 bytes")))
        );
        assert_eq!(
            SasMessage::parse(&el("<nonce xmlns='urn:xmpp:tmp:xtls:sas'>*</nonce>")),
            Some(Err(SasError::Malformed("not base64")))
        );
        assert_eq!(
            SasMessage::parse(&el("<other xmlns='urn:xmpp:tmp:xtls:sas'/>")),
            Some(Err(SasError::Malformed("unknown element")))
        );
    }
}
