//! Per-bot identities: certificate generation (spec §2.2), fingerprints (spec §2.4) and the
//! XmppAddr identity check of peer certificates (spec §2.3).

use std::fmt;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, OtherNameValue, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// id-on-xmppAddr, RFC 6120 §13.7.1.4.
pub const XMPP_ADDR_OID: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 8, 5];
const XMPP_ADDR_OID_STR: &str = "1.3.6.1.5.5.7.8.5";

/// How long a generated bot certificate is valid (spec §2.2: long; pins do not rely on expiry).
pub const DEFAULT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(3650 * 86400);

/// Why a certificate could not be made, read or matched.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Key or certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The DER is not a parsable X.509 certificate (spec §2.3 step 1).
    #[error("certificate is not valid DER X.509: {0}")]
    BadEncoding(String),
    /// The private key is not PKCS#8 DER.
    #[error("private key is not PKCS#8 DER")]
    BadKey,
    /// The requested validity is out of the range a certificate can state.
    #[error("certificate validity out of range")]
    BadValidity,
}

/// A SHA-256 or SHA-1 digest shown as colon-separated uppercase hex pairs.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(Vec<u8>);

impl Fingerprint {
    /// SHA-256 of `bytes`.
    pub fn sha256(bytes: &[u8]) -> Self {
        Fingerprint(Sha256::digest(bytes).to_vec())
    }

    /// SHA-1 of `bytes`.
    pub fn sha1(bytes: &[u8]) -> Self {
        Fingerprint(Sha1::digest(bytes).to_vec())
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Lowercase hex without separators (the XEP-0189 keyinfo name form).
    pub fn to_lower_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads the colon-separated form (case-insensitive).
    pub fn parse(s: &str) -> Option<Fingerprint> {
        let bytes: Option<Vec<u8>> = s
            .split(':')
            .map(|pair| {
                (pair.len() == 2)
                    .then(|| u8::from_str_radix(pair, 16).ok())
                    .flatten()
            })
            .collect();
        bytes
            .filter(|b| b.len() == 32 || b.len() == 20)
            .map(Fingerprint)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// The three fingerprints people compare for a certificate (spec §2.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprints {
    /// SHA-256 of the DER SubjectPublicKeyInfo: the canonical fingerprint.
    pub spki_sha256: Fingerprint,
    /// SHA-256 of the DER certificate (`openssl x509 -fingerprint -sha256`).
    pub cert_sha256: Fingerprint,
    /// SHA-1 of the DER certificate (XEP-0250 offers).
    pub cert_sha1: Fingerprint,
}

/// What a peer certificate says about itself, as far as identity goes.
#[derive(Debug, Clone)]
pub struct PeerCertInfo {
    /// Fingerprints of the certificate.
    pub fingerprints: Fingerprints,
    /// Normalized bare JIDs found as XmppAddr (values with a resource are left out).
    pub xmpp_addrs: Vec<String>,
    /// Start of validity, RFC 3339.
    pub not_before: String,
    /// End of validity, RFC 3339.
    pub not_after: String,
}

impl PeerCertInfo {
    /// Parses a DER certificate (spec §2.3 steps 1–3).
    pub fn parse(der: &[u8]) -> Result<PeerCertInfo, CertError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| CertError::BadEncoding(e.to_string()))?;
        let mut xmpp_addrs = Vec::new();
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertError::BadEncoding(e.to_string()))?;
        for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
            if let GeneralName::OtherName(oid, value) = name {
                if oid.to_id_string() != XMPP_ADDR_OID_STR {
                    continue;
                }
                let Some(addr) = unwrap_xmpp_addr(value) else {
                    tracing::debug!("XmppAddr that is not a UTF8String ignored");
                    continue;
                };
                match normalize_bare(addr) {
                    Some(bare) => xmpp_addrs.push(bare),
                    None => tracing::debug!(addr, "XmppAddr with resource or invalid JID ignored"),
                }
            }
        }
        let spki = cert.tbs_certificate.subject_pki.raw;
        Ok(PeerCertInfo {
            fingerprints: Fingerprints {
                spki_sha256: Fingerprint::sha256(spki),
                cert_sha256: Fingerprint::sha256(der),
                cert_sha1: Fingerprint::sha1(der),
            },
            xmpp_addrs,
            not_before: rfc3339(cert.validity().not_before.to_datetime()),
            not_after: rfc3339(cert.validity().not_after.to_datetime()),
        })
    }

    /// Whether an XmppAddr equals the expected bare JID (spec §2.3 step 4).
    pub fn names(&self, bare_jid: &str) -> bool {
        normalize_bare(bare_jid).is_some_and(|want| self.xmpp_addrs.contains(&want))
    }
}

/// Formats a timestamp as RFC 3339.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Normalizes a bare JID; `None` for invalid JIDs or JIDs with a resource.
pub fn normalize_bare(s: &str) -> Option<String> {
    match jid::Jid::new(s) {
        Ok(j) if j.resource().is_none() => Some(j.to_string()),
        _ => None,
    }
}

/// Takes the UTF-8 string out of `[0] EXPLICIT UTF8String` (the otherName value encoding).
fn unwrap_xmpp_addr(value: &[u8]) -> Option<&str> {
    let inner = der_value(value, 0xa0)?;
    let utf8 = der_value(inner, 0x0c)?;
    std::str::from_utf8(utf8).ok()
}

/// The content of one DER TLV with the expected tag that spans all of `input`.
fn der_value(input: &[u8], tag: u8) -> Option<&[u8]> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() == len).then_some(rest)
}

/// A bot's key and self-signed certificate.
#[derive(Clone)]
pub struct BotIdentity {
    /// The bot's normalized bare JID, the certificate's only XmppAddr.
    pub jid: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
    /// Parsed facts about the certificate.
    pub info: PeerCertInfo,
}

impl fmt::Debug for BotIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BotIdentity")
            .field("jid", &self.jid)
            .field("spki_sha256", &self.info.fingerprints.spki_sha256)
            .finish_non_exhaustive()
    }
}

impl BotIdentity {
    /// Generates an ECDSA P-256 key and a certificate per spec §2.2.
    pub fn generate(bare_jid: &str) -> Result<BotIdentity, CertError> {
        Self::generate_valid_for(bare_jid, DEFAULT_VALIDITY)
    }

    /// Generates a key and a certificate valid for `validity` from now.
    pub fn generate_valid_for(
        bare_jid: &str,
        validity: std::time::Duration,
    ) -> Result<BotIdentity, CertError> {
        Self::issue(bare_jid, &KeyPair::generate()?, validity)
    }

    /// A new certificate (new serial, new validity) for the same key: the SPKI fingerprint,
    /// which peers pin, stays; the certificate's own digests change.
    pub fn reissue(&self) -> Result<BotIdentity, CertError> {
        self.reissue_valid_for(DEFAULT_VALIDITY)
    }

    /// Like [`Self::reissue`], valid for `validity` from now.
    pub fn reissue_valid_for(
        &self,
        validity: std::time::Duration,
    ) -> Result<BotIdentity, CertError> {
        let key = KeyPair::try_from(self.key_der.as_slice()).map_err(|_| CertError::BadKey)?;
        Self::issue(&self.jid, &key, validity)
    }

    /// A self-signed certificate for `key` per spec §2.2.
    fn issue(
        bare_jid: &str,
        key: &KeyPair,
        validity: std::time::Duration,
    ) -> Result<BotIdentity, CertError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, bare_jid);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::OtherName((
            XMPP_ADDR_OID.to_vec(),
            OtherNameValue::Utf8String(bare_jid.to_owned()),
        ))];
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after =
            now + time::Duration::try_from(validity).map_err(|_| CertError::BadValidity)?;
        let mut serial = [0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params.self_signed(key)?;
        Self::from_der(bare_jid, cert.der().to_vec(), key.serialize_der())
    }

    /// Rebuilds an identity from stored DER.
    pub fn from_der(
        bare_jid: &str,
        cert_der: Vec<u8>,
        key_der: Vec<u8>,
    ) -> Result<Self, CertError> {
        let info = PeerCertInfo::parse(&cert_der)?;
        Ok(BotIdentity {
            jid: bare_jid.to_owned(),
            cert_der: CertificateDer::from(cert_der),
            key_der,
            info,
        })
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The certificate, PEM.
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert_der)
    }

    /// The private key for rustls; stays inside the process.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// The private key's PKCS#8 DER, for the store only.
    pub fn key_der(&self) -> &[u8] {
        &self.key_der
    }
}

/// DER bytes as PEM with this label.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificate_follows_the_profile() {
        let id = BotIdentity::generate("weather@bots.example.org").unwrap();
        assert_eq!(
            id.info.xmpp_addrs,
            vec!["weather@bots.example.org".to_owned()]
        );
        assert!(id.info.names("weather@bots.example.org"));
        assert!(!id.info.names("other@bots.example.org"));
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(id.cert_der()).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names.len(),
            1,
            "exactly one SAN, no dNSName"
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(cert.basic_constraints().unwrap().is_none());
        assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
        assert!(id.cert_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
    }

    #[test]
    fn san_encoding_matches_the_spec_vector() {
        let id = BotIdentity::generate("weather@bots.example.org").unwrap();
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(id.cert_der()).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "2.5.29.17")
            .unwrap();
        let mut want = vec![
            0x30, 0x28, 0xa0, 0x26, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05,
        ];
        want.extend([0x07, 0x08, 0x05, 0xa0, 0x1a, 0x0c, 0x18]);
        want.extend(b"weather@bots.example.org");
        assert_eq!(ext.value, want.as_slice());
    }

    #[test]
    fn fingerprints_format_and_parse() {
        let fp = Fingerprint::sha256(b"abc");
        let s = fp.to_string();
        assert_eq!(s.len(), 32 * 3 - 1);
        assert!(s.starts_with("BA:78:16:BF"));
        assert_eq!(Fingerprint::parse(&s), Some(fp.clone()));
        assert_eq!(Fingerprint::parse(&s.to_lowercase()), Some(fp));
        assert_eq!(Fingerprint::parse("BA:78"), None);
        assert_eq!(Fingerprint::sha1(b"abc").to_lower_hex().len(), 40);
    }

    #[test]
    fn spki_fingerprint_survives_reissue_with_the_same_key() {
        let id = BotIdentity::generate("a@b.example").unwrap();
        let reissued = id.reissue().unwrap();
        assert_ne!(reissued.cert_der(), id.cert_der(), "a new certificate");
        let (old, new) = (&id.info.fingerprints, &reissued.info.fingerprints);
        assert_ne!(new.cert_sha256, old.cert_sha256);
        assert_ne!(new.cert_sha1, old.cert_sha1);
        assert_eq!(
            new.spki_sha256, old.spki_sha256,
            "the pinned key's digest stays"
        );
        assert_eq!(reissued.info.xmpp_addrs, vec!["a@b.example".to_owned()]);
        // A peer that pinned the old certificate's key accepts the new certificate.
        let policy = crate::tunnel::PeerPolicy {
            pins: vec![old.spki_sha256.clone()],
            ..Default::default()
        };
        let (_, verdict) =
            crate::tunnel::judge("a@b.example", &policy, reissued.cert_der()).unwrap();
        assert_eq!(verdict, crate::tunnel::TrustVerdict::Pinned);
    }

    #[test]
    fn stored_der_reads_back_to_the_same_identity() {
        let id = BotIdentity::generate("a@b.example").unwrap();
        let reread =
            BotIdentity::from_der("a@b.example", id.cert_der().to_vec(), id.key_der().to_vec())
                .unwrap();
        assert_eq!(reread.info.fingerprints, id.info.fingerprints);
    }

    #[test]
    fn xmpp_addr_unwrap_is_strict() {
        assert_eq!(unwrap_xmpp_addr(&[0xa0, 0x03, 0x0c, 0x01, b'a']), Some("a"));
        assert_eq!(unwrap_xmpp_addr(&[0xa0, 0x03, 0x13, 0x01, b'a']), None);
        assert_eq!(unwrap_xmpp_addr(&[0xa0, 0x04, 0x0c, 0x01, b'a']), None);
        assert_eq!(unwrap_xmpp_addr(&[0xa0, 0x03, 0x0c, 0x01, 0xff]), None);
        assert_eq!(unwrap_xmpp_addr(&[]), None);
    }

    #[test]
    fn garbage_is_a_bad_encoding() {
        assert!(matches!(
            PeerCertInfo::parse(b"not a certificate"),
            Err(CertError::BadEncoding(_))
        ));
    }
}
