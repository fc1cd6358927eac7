//! The elements of `urn:xmpp:tmp:xtls` (spec §1.3) and the `<data/>` encoding (spec §1.7).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use minidom::Element;

use super::{DefinedCondition, name, ns};

/// Largest raw payload accepted in one `<data/>` (spec §1.7 rule 2, the IBB maximum).
pub const MAX_CHUNK_ACCEPTED: usize = 65_535;

/// A XEP-0250 offer (spec §1.6): the key names an entity can present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer {
    /// `keyinfo/name` values (hex digests of certificates).
    pub key_names: Vec<String>,
    /// Whether `<srp/>` was offered.
    pub srp: bool,
    /// Whether `<insecure/>` was offered (an X.509 key that cannot be verified yet is accepted).
    pub insecure: bool,
}

impl Offer {
    fn parse(element: &Element) -> Offer {
        let mut offer = Offer::default();
        for child in element.children() {
            match (child.ns().as_str(), child.name()) {
                (ns::PUBKEY, "keyinfo") => {
                    if let Some(n) = child.get_child("name", ns::PUBKEY) {
                        offer.key_names.push(n.text().trim().to_owned());
                    }
                }
                (ns::C2CTLS, "srp") => offer.srp = true,
                (ns::C2CTLS, "insecure") => offer.insecure = true,
                _ => {}
            }
        }
        offer
    }

    fn to_element(&self) -> Element {
        let mut offer = Element::bare("offer", ns::C2CTLS);
        for key in &self.key_names {
            let mut keyinfo = Element::bare("keyinfo", ns::PUBKEY);
            let mut n = Element::bare("name", ns::PUBKEY);
            n.append_text(key.clone());
            keyinfo.append_child(n);
            offer.append_child(keyinfo);
        }
        if self.insecure {
            offer.append_child(Element::bare("insecure", ns::C2CTLS));
        }
        if self.srp {
            offer.append_child(Element::bare("srp", ns::C2CTLS));
        }
        offer
    }
}

/// One element of the XTLS namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XtlsElement {
    /// Opens a tunnel (IQ set, initiator).
    Start {
        /// The initiator's offer, if any.
        offer: Option<Offer>,
    },
    /// Accepts a tunnel (IQ result to `start`).
    Proceed {
        /// The responder's offer, if any.
        offer: Option<Offer>,
    },
    /// Carries TLS bytes, still base64-encoded (IQ set).
    Data {
        /// The character data as received.
        text: String,
        /// The optional `method` attribute.
        method: Option<String>,
    },
    /// Closes a tunnel (IQ set).
    Close,
    /// Confirms a close (IQ result to `close`).
    Closed,
}

/// Why an element of the XTLS namespace could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XtlsParseError {
    /// Not in the XTLS namespace at all.
    #[error("not an XTLS element")]
    ForeignNamespace,
    /// An element of the XTLS namespace that this version does not know (spec §1.5 rule 6).
    #[error("unknown XTLS element <{0}/>")]
    Unknown(String),
}

impl XtlsElement {
    /// Reads an element of the XTLS namespace; unknown attributes are ignored (spec §1.2).
    pub fn parse(element: &Element) -> Result<XtlsElement, XtlsParseError> {
        if element.ns() != ns::XTLS {
            return Err(XtlsParseError::ForeignNamespace);
        }
        let offer = || element.get_child("offer", ns::C2CTLS).map(Offer::parse);
        Ok(match element.name() {
            "start" => XtlsElement::Start { offer: offer() },
            "proceed" => XtlsElement::Proceed { offer: offer() },
            "data" => XtlsElement::Data {
                text: element.text(),
                method: element.attr("method").map(str::to_owned),
            },
            "close" => XtlsElement::Close,
            "closed" => XtlsElement::Closed,
            other => return Err(XtlsParseError::Unknown(other.to_owned())),
        })
    }

    /// Builds the element.
    pub fn to_element(&self) -> Element {
        let with_offer = |tag: &str, offer: &Option<Offer>| {
            let mut el = Element::bare(tag, ns::XTLS);
            if let Some(offer) = offer {
                el.append_child(offer.to_element());
            }
            el
        };
        match self {
            XtlsElement::Start { offer } => with_offer("start", offer),
            XtlsElement::Proceed { offer } => with_offer("proceed", offer),
            XtlsElement::Data { text, method } => {
                let mut el = Element::bare("data", ns::XTLS);
                if let Some(method) = method {
                    el.set_attr(rxml::Namespace::NONE, name("method"), method.clone());
                }
                el.append_text(text.clone());
                el
            }
            XtlsElement::Close => Element::bare("close", ns::XTLS),
            XtlsElement::Closed => Element::bare("closed", ns::XTLS),
        }
    }

    /// A `<data/>` element carrying `bytes`.
    pub fn data(bytes: &[u8], method: Option<&str>) -> XtlsElement {
        XtlsElement::Data {
            text: encode_data(bytes),
            method: method.map(str::to_owned),
        }
    }
}

/// Why the character data of a `<data/>` element was refused (spec §1.7 rules 1–2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DataError {
    /// Not RFC 4648 §4 base64 with padding.
    #[error("invalid base64: {0}")]
    BadBase64(String),
    /// More raw bytes than [`MAX_CHUNK_ACCEPTED`].
    #[error("chunk of {0} bytes exceeds the limit of {MAX_CHUNK_ACCEPTED}")]
    TooLarge(usize),
}

impl DataError {
    /// The stanza error that answers this refusal (spec §1.7 rules 1–2).
    pub fn condition(&self) -> DefinedCondition {
        match self {
            DataError::BadBase64(_) => DefinedCondition::BadRequest,
            DataError::TooLarge(_) => DefinedCondition::PolicyViolation,
        }
    }
}

/// Encodes raw TLS bytes for `<data/>`: padded base64, no whitespace.
pub fn encode_data(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes `<data/>` character data: XML whitespace is stripped, then strict padded base64.
pub fn decode_data(text: &str) -> Result<Vec<u8>, DataError> {
    let compact: Vec<u8> = text
        .bytes()
        .filter(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .collect();
    // Every 4 base64 characters carry 3 bytes: refuse before decoding anything oversized.
    let max_encoded = MAX_CHUNK_ACCEPTED.div_ceil(3) * 4 + 4;
    if compact.len() > max_encoded {
        return Err(DataError::TooLarge(compact.len() / 4 * 3));
    }
    let bytes = STANDARD
        .decode(&compact)
        .map_err(|e| DataError::BadBase64(e.to_string()))?;
    if bytes.len() > MAX_CHUNK_ACCEPTED {
        return Err(DataError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(xml: &str) -> Result<XtlsElement, XtlsParseError> {
        XtlsElement::parse(&xml.parse::<Element>().unwrap())
    }

    #[test]
    fn parses_every_element() {
        assert_eq!(
            parse("<start xmlns='urn:xmpp:tmp:xtls' sid='future'/>"),
            Ok(XtlsElement::Start { offer: None })
        );
        assert_eq!(
            parse("<proceed xmlns='urn:xmpp:tmp:xtls'/>"),
            Ok(XtlsElement::Proceed { offer: None })
        );
        assert_eq!(
            parse("<data xmlns='urn:xmpp:tmp:xtls' method='x509'>FgMB</data>"),
            Ok(XtlsElement::Data {
                text: "FgMB".into(),
                method: Some("x509".into())
            })
        );
        assert_eq!(
            parse("<close xmlns='urn:xmpp:tmp:xtls'/>"),
            Ok(XtlsElement::Close)
        );
        assert_eq!(
            parse("<closed xmlns='urn:xmpp:tmp:xtls'/>"),
            Ok(XtlsElement::Closed)
        );
        assert_eq!(
            parse("<foo xmlns='urn:xmpp:tmp:xtls'/>"),
            Err(XtlsParseError::Unknown("foo".into()))
        );
        assert_eq!(
            parse("<start xmlns='urn:other'/>"),
            Err(XtlsParseError::ForeignNamespace)
        );
    }

    #[test]
    fn parses_an_offer() {
        let el = parse(
            "<start xmlns='urn:xmpp:tmp:xtls'><offer xmlns='urn:xmpp:tmp:c2ctls'>\
             <keyinfo xmlns='urn:xmpp:tmp:pubkey'><name>abc</name></keyinfo><srp/></offer></start>",
        )
        .unwrap();
        let XtlsElement::Start { offer: Some(offer) } = el else {
            panic!("no offer in {el:?}")
        };
        assert_eq!(offer.key_names, vec!["abc".to_owned()]);
        assert!(offer.srp);
        let round = XtlsElement::parse(
            &XtlsElement::Start {
                offer: Some(offer.clone()),
            }
            .to_element(),
        );
        assert_eq!(round, Ok(XtlsElement::Start { offer: Some(offer) }));
    }

    #[test]
    fn base64_accepts_xml_whitespace() {
        assert_eq!(decode_data(" Fg\r\nMB\t").unwrap(), vec![0x16, 0x03, 0x01]);
        assert_eq!(decode_data("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn base64_rejects_every_malformation() {
        for bad in [
            "ab=c",
            "*AAA",
            "AAA",
            "AA=A",
            "AAAA=",
            "A===",
            "Zg=",
            "Zh==",
            "AA\u{a0}AA",
        ] {
            assert!(
                matches!(decode_data(bad), Err(DataError::BadBase64(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn chunk_size_limit() {
        assert!(decode_data(&encode_data(&vec![0u8; MAX_CHUNK_ACCEPTED])).is_ok());
        assert_eq!(
            decode_data(&encode_data(&vec![0u8; MAX_CHUNK_ACCEPTED + 1])),
            Err(DataError::TooLarge(MAX_CHUNK_ACCEPTED + 1))
        );
    }

    proptest! {
        #[test]
        fn base64_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            prop_assert_eq!(decode_data(&encode_data(&bytes)).unwrap(), bytes);
        }

        #[test]
        fn decode_never_panics(text in "\\PC{0,200}") {
            let _ = decode_data(&text);
        }
    }
}
