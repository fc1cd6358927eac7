//! Pairing codes: a one-time code, typed by a person, that proves to a bot that the key of the
//! tunnel is theirs, and to them that the bot is the one that showed them the code
//! (docs/verification.md).
//!
//! The bot's operator mints the code for one peer and shows it somewhere the XMPP servers do
//! not control (a web page over HTTPS). Inside an open tunnel the peer (SPAKE2 side A) and the
//! bot (side B) run SPAKE2 (RFC 9382, the Ed25519 group of the `spake2` crate, compatible with
//! python-spake2) with the code as password and the two bare JIDs as identities, then confirm
//! the shared key bound to this TLS session: `HMAC-SHA256(K, label ‖ cb)` where `cb` is the
//! `tls-exporter` channel binding (RFC 9266). The code never travels, in clear or encrypted;
//! someone who does not know it learns only that their one guess was wrong.

use std::fmt;

use hmac::{Hmac, Mac};
use minidom::Element;
use sha2::Sha256;
use spake2::{Ed25519Group, Identity, Password, Spake2};

use crate::stanza::xtls::{decode_data, encode_data};

/// The inner namespace of the exchange.
pub const NS: &str = "urn:xmpp:tmp:xtls:pair";
/// The channel binding's exporter label (RFC 9266 `tls-exporter`), empty context, 32 bytes.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-Channel-Binding";
/// The HMAC label of the peer's confirmation.
const CONFIRM_A: &[u8] = b"xtls-pair confirm A";
/// The HMAC label of the bot's confirmation.
const CONFIRM_B: &[u8] = b"xtls-pair confirm B";
/// The alphabet of codes: Crockford's base 32 (no I, L, O, U).
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Characters in a code (50 bits), shown in two groups of five.
const CODE_LEN: usize = 10;

/// A channel binding: the TLS exporter's 32 bytes for [`CHANNEL_BINDING_LABEL`].
pub type ChannelBinding = [u8; 32];

/// A new random code, `XXXXX-XXXXX`.
pub fn new_code() -> String {
    let mut code = String::with_capacity(CODE_LEN + 1);
    for i in 0..CODE_LEN {
        if i == CODE_LEN / 2 {
            code.push('-');
        }
        code.push(ALPHABET[rand::random_range(0..ALPHABET.len())] as char);
    }
    code
}

/// A code as typed, as the PAKE's password: upper case, without separators and spaces, with
/// the letters people confuse with digits read as those digits (Crockford).
pub fn normalize_code(typed: &str) -> String {
    typed
        .chars()
        .filter(|c| !matches!(c, '-' | ' ' | '\t'))
        .map(|c| match c.to_ascii_uppercase() {
            'I' | 'L' => '1',
            'O' => '0',
            other => other,
        })
        .collect()
}

/// One message of the exchange, as carried in an inner IQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairMessage {
    /// `<pake/>`: a SPAKE2 message (the peer's in an IQ set, the bot's in the result).
    Pake(Vec<u8>),
    /// `<confirm/>`: a key confirmation (the peer's in an IQ set, the bot's in the result).
    Confirm([u8; 32]),
}

/// Why pairing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    /// Not an element of the exchange, or a payload of the wrong size or encoding.
    #[error("malformed pairing message: {0}")]
    Malformed(&'static str),
    /// The SPAKE2 message was refused.
    #[error("the pairing message was refused: {0}")]
    Pake(String),
    /// The other side's confirmation does not match: a wrong code, or another TLS session.
    #[error("the confirmation does not match: wrong code, or not this tunnel")]
    Mismatch,
}

impl PairMessage {
    /// The payload element.
    pub fn to_element(&self) -> Element {
        let (name, bytes): (&str, &[u8]) = match self {
            PairMessage::Pake(m) => ("pake", m),
            PairMessage::Confirm(c) => ("confirm", c),
        };
        Element::builder(name, NS)
            .append(encode_data(bytes))
            .build()
    }

    /// Reads a payload element; `None` when it is not of [`NS`].
    pub fn parse(el: &Element) -> Option<Result<PairMessage, PairError>> {
        if el.ns() != NS {
            return None;
        }
        // Encoded as `<data/>` is (spec §1.7 rule 1): the same reader, with its size cap.
        let Ok(raw) = decode_data(&el.text()) else {
            return Some(Err(PairError::Malformed("not base64")));
        };
        Some(match el.name() {
            // A SPAKE2 message over Ed25519: a side byte and a point.
            "pake" if raw.len() == 33 => Ok(PairMessage::Pake(raw)),
            "pake" => Err(PairError::Malformed("not a SPAKE2 message")),
            "confirm" => raw
                .try_into()
                .map(PairMessage::Confirm)
                .map_err(|_| PairError::Malformed("not 32 bytes")),
            _ => Err(PairError::Malformed("unknown element")),
        })
    }
}

fn confirmation(key: &[u8], label: &[u8], cb: &ChannelBinding) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(cb);
    mac
}

/// The peer's side (SPAKE2 side A): the person typed the code.
pub struct Claimant {
    spake: Spake2<Ed25519Group>,
}

impl fmt::Debug for Claimant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claimant").finish_non_exhaustive()
    }
}

/// The peer's side once the bot answered: checks the bot's confirmation.
pub struct Claimed {
    key: Vec<u8>,
    cb: ChannelBinding,
}

impl fmt::Debug for Claimed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claimed").finish_non_exhaustive()
    }
}

impl Claimant {
    /// Starts with the typed code; the message to send in an IQ set.
    pub fn start(code: &str, peer_bare: &str, bot_bare: &str) -> (Claimant, PairMessage) {
        let (spake, message) = Spake2::<Ed25519Group>::start_a(
            &Password::new(normalize_code(code).as_bytes()),
            &Identity::new(peer_bare.as_bytes()),
            &Identity::new(bot_bare.as_bytes()),
        );
        (Claimant { spake }, PairMessage::Pake(message))
    }

    /// Takes the bot's SPAKE2 message; our confirmation to send in an IQ set.
    pub fn on_pake(
        self,
        message: PairMessage,
        cb: &ChannelBinding,
    ) -> Result<(Claimed, PairMessage), PairError> {
        let PairMessage::Pake(theirs) = message else {
            return Err(PairError::Malformed("expected the bot's SPAKE2 message"));
        };
        let key = self
            .spake
            .finish(&theirs)
            .map_err(|e| PairError::Pake(e.to_string()))?;
        let ours = confirmation(&key, CONFIRM_A, cb)
            .finalize()
            .into_bytes()
            .into();
        Ok((Claimed { key, cb: *cb }, PairMessage::Confirm(ours)))
    }
}

impl Claimed {
    /// Checks the bot's confirmation: `Ok` means the bot knows the code.
    pub fn on_confirm(&self, message: PairMessage) -> Result<(), PairError> {
        let PairMessage::Confirm(theirs) = message else {
            return Err(PairError::Malformed("expected the bot's confirmation"));
        };
        confirmation(&self.key, CONFIRM_B, &self.cb)
            .verify_slice(&theirs)
            .map_err(|_| PairError::Mismatch)
    }
}

/// The bot's side (SPAKE2 side B): it minted the code.
pub struct Verifier {
    key: Vec<u8>,
    cb: ChannelBinding,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// Answers the peer's SPAKE2 message with the code minted for it; the message to put in
    /// the result.
    pub fn respond(
        code: &str,
        peer_bare: &str,
        bot_bare: &str,
        message: PairMessage,
        cb: &ChannelBinding,
    ) -> Result<(Verifier, PairMessage), PairError> {
        let PairMessage::Pake(theirs) = message else {
            return Err(PairError::Malformed("expected the peer's SPAKE2 message"));
        };
        let (spake, ours) = Spake2::<Ed25519Group>::start_b(
            &Password::new(normalize_code(code).as_bytes()),
            &Identity::new(peer_bare.as_bytes()),
            &Identity::new(bot_bare.as_bytes()),
        );
        let key = spake
            .finish(&theirs)
            .map_err(|e| PairError::Pake(e.to_string()))?;
        Ok((Verifier { key, cb: *cb }, PairMessage::Pake(ours)))
    }

    /// Checks the peer's confirmation; ours to put in the result when it matches.
    pub fn on_confirm(&self, message: PairMessage) -> Result<PairMessage, PairError> {
        let PairMessage::Confirm(theirs) = message else {
            return Err(PairError::Malformed("expected the peer's confirmation"));
        };
        confirmation(&self.key, CONFIRM_A, &self.cb)
            .verify_slice(&theirs)
            .map_err(|_| PairError::Mismatch)?;
        let ours = confirmation(&self.key, CONFIRM_B, &self.cb)
            .finalize()
            .into_bytes()
            .into();
        Ok(PairMessage::Confirm(ours))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "alice@example.net";
    const BOT: &str = "weather@bots.example.org";

    fn run(
        typed: &str,
        minted: &str,
        peer_cb: &ChannelBinding,
        bot_cb: &ChannelBinding,
    ) -> Result<(), PairError> {
        let (claimant, pake) = Claimant::start(typed, PEER, BOT);
        let wire = PairMessage::parse(&pake.to_element()).unwrap()?;
        let (verifier, answer) = Verifier::respond(minted, PEER, BOT, wire, bot_cb)?;
        let (claimed, confirm) = claimant.on_pake(answer, peer_cb)?;
        let back = verifier.on_confirm(confirm)?;
        claimed.on_confirm(back)
    }

    #[test]
    fn the_right_code_on_one_tunnel_pairs_and_anything_else_does_not() {
        let code = new_code();
        assert_eq!(code.len(), 11);
        assert_eq!(code.as_bytes()[5], b'-');
        let cb = [5; 32];
        assert_eq!(run(&code, &code, &cb, &cb), Ok(()));
        // Typed as people type: lower case, no dash, O for 0.
        let typed = code.replace('-', " ").to_lowercase().replace('0', "o");
        assert_eq!(run(&typed, &code, &cb, &cb), Ok(()));
        let wrong = if code.starts_with('A') {
            code.replacen('A', "B", 1)
        } else {
            format!("A{}", &code[1..])
        };
        assert_eq!(run(&wrong, &code, &cb, &cb), Err(PairError::Mismatch));
        // The right code through a man in the middle (two TLS sessions): no match either.
        assert_eq!(run(&code, &code, &cb, &[6; 32]), Err(PairError::Mismatch));
    }

    #[test]
    fn confirmations_follow_the_documented_vectors() {
        // docs/verification.md: K = 32 bytes 01, cb = 32 bytes 02.
        let hex = |mac: Hmac<Sha256>| -> String {
            mac.finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        assert_eq!(
            hex(confirmation(&[1; 32], CONFIRM_A, &[2; 32])),
            "53519d2ad9b647bf2d4239edb623264fd89bff8fe688376e2c28b2b460d21027"
        );
        assert_eq!(
            hex(confirmation(&[1; 32], CONFIRM_B, &[2; 32])),
            "74e4dba1b59e4f28b7f71c1140ea2674c9aedf6918a63ce72fd2d7e3ff5ea066"
        );
    }

    #[test]
    fn codes_normalize_as_people_type_them() {
        assert_eq!(normalize_code("ab1cd-ef0gh"), "AB1CDEF0GH");
        assert_eq!(normalize_code(" iLo0 "), "1100");
        assert_ne!(new_code(), new_code());
    }

    proptest::proptest! {
        #[test]
        fn any_payload_reads_without_panic_and_what_reads_writes_back(
            name in "pake|confirm|other",
            text in "[A-Za-z0-9+/= \t*]{0,60}",
        ) {
            let el = Element::builder(name.as_str(), NS).append(text.as_str()).build();
            if let Some(Ok(message)) = PairMessage::parse(&el) {
                proptest::prop_assert_eq!(PairMessage::parse(&message.to_element()), Some(Ok(message)));
            }
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let el = |xml: &str| -> Element { xml.parse().unwrap() };
        assert_eq!(
            PairMessage::parse(&el("<pake xmlns='urn:x'>AA==</pake>")),
            None
        );
        assert_eq!(
            PairMessage::parse(&el("<pake xmlns='urn:xmpp:tmp:xtls:pair'>AA==</pake>")),
            Some(Err(PairError::Malformed("not a SPAKE2 message")))
        );
        assert_eq!(
            PairMessage::parse(&el("<confirm xmlns='urn:xmpp:tmp:xtls:pair'>*</confirm>")),
            Some(Err(PairError::Malformed("not base64")))
        );
        let (claimant, _) = Claimant::start("X", PEER, BOT);
        assert!(
            claimant
                .on_pake(PairMessage::Pake(vec![0; 33]), &[0; 32])
                .is_err()
        );
    }
}
