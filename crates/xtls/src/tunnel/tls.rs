//! The rustls adapter: TLS 1.3 profile (spec §1.8), per-tunnel certificate verifiers that bind
//! the peer's XmppAddr to its bare JID and apply the bot's trust mode (spec §2.3).
//!
//! This is the only file of the crate that names rustls connection and verifier types.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, Connection, DigitallySignedStruct,
    DistinguishedName, OtherError, ServerConfig, ServerConnection, SignatureScheme,
};

use crate::certs::{BotIdentity, Fingerprint, PeerCertInfo};

/// Whether a peer must present a certificate (spec "Scope").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub enum PeerAuth {
    /// A client certificate is requested and required.
    #[default]
    Required,
    /// A client certificate is requested; peers without one are admitted as unauthenticated.
    Optional,
}

/// How a bot decides whether a peer's key is trusted (spec §2.3 step 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub enum TrustMode {
    /// Trust on first use: an unknown peer is pinned, a changed key is refused.
    #[default]
    Tofu,
    /// Only keys already pinned for the peer's bare JID are accepted. The handshake runs even
    /// when none is, so that a refused key can be named ([`VerifyError::NotPinned`]).
    Pinned,
}

/// The verdict on a peer's identity once the handshake is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub enum TrustVerdict {
    /// No certificate was presented (allowed under [`PeerAuth::Optional`]).
    Unauthenticated,
    /// First use: the key was unknown and is now pinned, not yet verified out of band.
    TofuNew,
    /// The key matched a pin held for the peer's bare JID.
    Pinned,
    /// The key would be refused, but a pairing code is waiting for the peer: the tunnel is
    /// admitted for pairing only ([`crate::pair`]), and the key is trusted once it pairs.
    Pairing,
}

named_enum!(PeerAuth, "peer_auth", {
    Required => "required",
    Optional => "optional",
});

named_enum!(TrustMode, "trust mode", {
    Tofu => "tofu",
    Pinned => "pinned",
});

named_enum!(TrustVerdict, "trust verdict", {
    Unauthenticated => "unauthenticated",
    TofuNew => "tofu_new",
    Pinned => "pinned",
    Pairing => "pairing",
});

/// Everything a tunnel needs to judge its peer.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    /// Whether a certificate is required.
    pub peer_auth: PeerAuth,
    /// The trust mode of the bot.
    pub trust: TrustMode,
    /// SPKI SHA-256 pins held for the peer's bare JID.
    pub pins: Vec<Fingerprint>,
    /// Offer key names (lowercase hex SHA-1 and SHA-256) of the certificates seen with those
    /// pins: a `start` offer naming one of them is answered without `<insecure/>`.
    pub pinned_cert_names: Vec<String>,
    /// A pairing code waits for the peer: a key that would be refused is admitted with
    /// [`TrustVerdict::Pairing`] instead, for the pairing exchange alone.
    pub pairing: bool,
}

/// Why a peer's certificate was refused (spec §2.3): the typed reason a tunnel carries up to
/// its owner in [`CloseReason::CertificateRejected`](super::CloseReason::CertificateRejected).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The policy requires a certificate and the peer presented none.
    #[error("the peer presented no certificate and one is required")]
    NoCertificate,
    /// The certificate could not be parsed.
    #[error("peer certificate unreadable: {0}")]
    Unreadable(String),
    /// No XmppAddr equals the peer's bare JID.
    #[error("peer certificate has no XmppAddr for {expected} (found: {found:?})")]
    WrongAddress {
        /// The bare JID the server stamped on the peer's stanzas.
        expected: String,
        /// The XmppAddr values found in the certificate.
        found: Vec<String>,
    },
    /// The key differs from every key pinned for the peer: its identity changed.
    #[error("peer key {presented} does not match the key pinned for {jid}")]
    PinMismatch {
        /// The peer's bare JID.
        jid: String,
        /// SPKI SHA-256 of the presented key.
        presented: Fingerprint,
        /// SPKI SHA-256 of the keys pinned for the peer.
        pinned: Vec<Fingerprint>,
    },
    /// Pinned mode and no pin is held for the peer.
    #[error("peer key {presented} is not approved for {jid}: the bot accepts approved keys only")]
    NotPinned {
        /// The peer's bare JID.
        jid: String,
        /// SPKI SHA-256 of the presented key, for someone to approve.
        presented: Fingerprint,
    },
    /// TLS refused the certificate for another reason (a bad signature, say).
    #[error("peer certificate refused: {0}")]
    Invalid(String),
}

/// A per-tunnel verifier: it knows the peer's bare JID and the bot's policy for it.
#[derive(Debug)]
struct PeerVerifier {
    expected: String,
    policy: PeerPolicy,
    provider: Arc<CryptoProvider>,
    /// The certificate accepted, with its SPKI digest and verdict: read once the handshake
    /// is done instead of parsing the certificate again.
    accepted: std::sync::Mutex<Option<Judged>>,
}

/// A certificate the verifier accepted, and what it concluded.
#[derive(Debug, Clone)]
pub struct Judged {
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// SHA-256 of its SubjectPublicKeyInfo.
    pub spki_sha256: Fingerprint,
    /// The trust verdict.
    pub trust: TrustVerdict,
}

impl PeerVerifier {
    fn new(expected: &str, policy: PeerPolicy, provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(PeerVerifier {
            expected: expected.to_owned(),
            policy,
            provider,
            accepted: std::sync::Mutex::default(),
        })
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        judge(&self.expected, &self.policy, end_entity)
            .map(|(info, trust)| {
                *self.accepted.lock().expect("verifier lock") = Some(Judged {
                    cert_der: end_entity.to_vec(),
                    spki_sha256: info.fingerprints.spki_sha256,
                    trust,
                });
            })
            .map_err(|e| {
                let cert_error = match e {
                    VerifyError::Unreadable(_) => CertificateError::BadEncoding,
                    other => CertificateError::Other(OtherError(Arc::new(other))),
                };
                rustls::Error::InvalidCertificate(cert_error)
            })
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

/// Applies spec §2.3 to a certificate: the XmppAddr match, then the trust mode.
pub fn judge(
    expected_bare: &str,
    policy: &PeerPolicy,
    der: &[u8],
) -> Result<(PeerCertInfo, TrustVerdict), VerifyError> {
    let info = PeerCertInfo::parse(der).map_err(|e| VerifyError::Unreadable(e.to_string()))?;
    if !info.names(expected_bare) {
        return Err(VerifyError::WrongAddress {
            expected: expected_bare.to_owned(),
            found: info.xmpp_addrs.clone(),
        });
    }
    let spki = &info.fingerprints.spki_sha256;
    let verdict = if policy.pins.contains(spki) {
        TrustVerdict::Pinned
    } else if policy.pairing && (!policy.pins.is_empty() || policy.trust == TrustMode::Pinned) {
        TrustVerdict::Pairing
    } else if !policy.pins.is_empty() {
        return Err(VerifyError::PinMismatch {
            jid: expected_bare.to_owned(),
            presented: spki.clone(),
            pinned: policy.pins.clone(),
        });
    } else if policy.trust == TrustMode::Pinned {
        return Err(VerifyError::NotPinned {
            jid: expected_bare.to_owned(),
            presented: spki.clone(),
        });
    } else {
        TrustVerdict::TofuNew
    };
    Ok((info, verdict))
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.policy.peer_auth == PeerAuth::Required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// A bot's TLS credentials, prepared once and shared by all its tunnels.
#[derive(Debug, Clone)]
pub struct BotCredentials {
    /// The bot's identity (certificate, fingerprints).
    pub identity: Arc<BotIdentity>,
    key: Arc<CertifiedKey>,
    provider: Arc<CryptoProvider>,
}

/// Why credentials could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("bot key unusable for TLS: {0}")]
pub struct CredentialsError(#[source] rustls::Error);

impl BotCredentials {
    /// Loads the bot's key for rustls.
    pub fn new(identity: BotIdentity) -> Result<BotCredentials, CredentialsError> {
        Self::from_shared(Arc::new(identity))
    }

    /// Loads the key of an identity others hold too.
    pub fn from_shared(identity: Arc<BotIdentity>) -> Result<BotCredentials, CredentialsError> {
        let provider = provider();
        let key = CertifiedKey::from_der(
            vec![identity.cert_der().clone()],
            identity.private_key(),
            &provider,
        )
        .map_err(CredentialsError)?;
        Ok(BotCredentials {
            identity,
            key: Arc::new(key),
            provider,
        })
    }
}

/// The crypto provider every bot shares: built once.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The outcome of feeding bytes to TLS.
#[derive(Debug)]
pub enum TlsFailure {
    /// The peer sent a fatal alert: answer `result`, then discard (spec §1.11).
    PeerAlert(String),
    /// The peer's certificate was refused: `not-acceptable`.
    CertificateRejected(VerifyError),
    /// Any other TLS protocol error: `bad-request`.
    Protocol(String),
}

/// One side of a tunnel's TLS connection, driven over byte buffers.
pub struct TlsSession {
    conn: Connection,
    /// Until the handshake's outcome is taken (then dropped: an idle tunnel keeps nothing).
    verifier: Option<Arc<PeerVerifier>>,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.conn.is_handshaking())
            .finish()
    }
}

/// TLS 1.3 only (spec §1.8).
static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn tls13_only() -> &'static [&'static rustls::SupportedProtocolVersion] {
    TLS13_ONLY
}

impl TlsSession {
    /// Fills `out` from the TLS exporter (RFC 8446 §7.5); fails before the handshake is done.
    pub fn export_keying_material(
        &self,
        out: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), rustls::Error> {
        self.conn
            .export_keying_material(out, label, Some(context))
            .map(|_| ())
    }

    /// The responder's TLS server, requesting a client certificate (spec §1.8).
    pub fn server(creds: &BotCredentials, peer_bare: &str, policy: PeerPolicy) -> TlsSession {
        let verifier = PeerVerifier::new(peer_bare, policy, creds.provider.clone());
        let mut config = ServerConfig::builder_with_provider(creds.provider.clone())
            .with_protocol_versions(tls13_only())
            .expect("the ring provider supports TLS 1.3")
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(creds.key.clone())));
        config.send_tls13_tickets = 0;
        // No resumption, so no session cache: rustls' default one preallocates 256 entries,
        // and a config is built per tunnel (its verifier knows the expected peer).
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let conn = ServerConnection::new(Arc::new(config)).expect("a valid server config");
        TlsSession::wrap(conn.into(), verifier)
    }

    /// The initiator's TLS client, SNI off, presenting the bot's certificate (spec §1.8).
    pub fn client(creds: &BotCredentials, peer_bare: &str, policy: PeerPolicy) -> TlsSession {
        let verifier = PeerVerifier::new(peer_bare, policy, creds.provider.clone());
        let mut config = ClientConfig::builder_with_provider(creds.provider.clone())
            .with_protocol_versions(tls13_only())
            .expect("the ring provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(creds.key.clone())));
        config.enable_sni = false;
        config.resumption = rustls::client::Resumption::disabled();
        // With SNI off the name is never sent; rustls still wants one.
        let name = ServerName::try_from("xtls.invalid").expect("a valid DNS name");
        let conn = ClientConnection::new(Arc::new(config), name).expect("a valid client config");
        TlsSession::wrap(conn.into(), verifier)
    }

    fn wrap(mut conn: Connection, verifier: Arc<PeerVerifier>) -> TlsSession {
        // The tunnel bounds its own queue (`max_queued_out`); rustls' default 64 KiB limit on
        // buffered records would refuse one large stanza half written.
        conn.set_buffer_limit(None);
        TlsSession {
            conn,
            verifier: Some(verifier),
        }
    }

    /// The peer certificate our verifier accepted and its verdict; asked once, when the
    /// handshake is done.
    pub fn take_judged(&mut self) -> Option<Judged> {
        let verifier = self.verifier.take()?;
        verifier.accepted.lock().expect("verifier lock").take()
    }

    /// Whether the handshake is still running.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Feeds received TLS bytes; plaintext goes to `plaintext`, and `Ok(true)` means the peer
    /// sent close_notify.
    pub fn feed(&mut self, mut bytes: &[u8], plaintext: &mut Vec<u8>) -> Result<bool, TlsFailure> {
        let mut eof = false;
        loop {
            let mut refused = None;
            let mut consumed = 0;
            if !bytes.is_empty() {
                match self.conn.read_tls(&mut bytes) {
                    Ok(n) => consumed = n,
                    // The received-plaintext buffer is full: drain it below, then retry.
                    Err(e) => refused = Some(e),
                }
            }
            let state = self.conn.process_new_packets().map_err(classify)?;
            let available = state.plaintext_bytes_to_read();
            let was_refused = refused.is_some();
            if let Some(e) = refused.filter(|_| available == 0) {
                return Err(TlsFailure::Protocol(e.to_string()));
            }
            if available > 0 {
                let start = plaintext.len();
                plaintext.resize(start + available, 0);
                let n = self
                    .conn
                    .reader()
                    .read(&mut plaintext[start..])
                    .map_err(|e| TlsFailure::Protocol(e.to_string()))?;
                plaintext.truncate(start + n);
            }
            if state.peer_has_closed() {
                eof = true;
            }
            if bytes.is_empty() {
                return Ok(eof);
            }
            if consumed == 0 && !was_refused {
                // rustls reads nothing after close_notify: the rest can never be consumed.
                return Err(TlsFailure::Protocol(
                    "TLS records after close_notify".into(),
                ));
            }
        }
    }

    /// Encrypts application plaintext.
    pub fn write_plaintext(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.conn.writer().write_all(bytes)
    }

    /// Queues a close_notify alert.
    pub fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    /// Moves every pending TLS record into `out`.
    pub fn drain_output(&mut self, out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            if self.conn.write_tls(out).is_err() {
                break;
            }
        }
    }

    /// Negotiated version, cipher suite and the peer's end-entity certificate.
    pub fn negotiated(&self) -> (String, String, Option<Vec<u8>>) {
        let version = self
            .conn
            .protocol_version()
            .map(|v| match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        let suite = self
            .conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str().map(str::to_owned))
            .unwrap_or_default();
        let cert = self
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        (version, suite, cert)
    }
}

fn classify(err: rustls::Error) -> TlsFailure {
    match err {
        rustls::Error::AlertReceived(alert) => TlsFailure::PeerAlert(format!("{alert:?}")),
        rustls::Error::NoCertificatesPresented => {
            TlsFailure::CertificateRejected(VerifyError::NoCertificate)
        }
        rustls::Error::InvalidCertificate(e) => TlsFailure::CertificateRejected(rejection(e)),
        other => TlsFailure::Protocol(other.to_string()),
    }
}

/// Recovers our verifier's own verdict from the error rustls wraps it in.
fn rejection(e: CertificateError) -> VerifyError {
    match e {
        CertificateError::BadEncoding => {
            VerifyError::Unreadable("not a parsable X.509 certificate".into())
        }
        CertificateError::Other(OtherError(inner)) => match inner.downcast_ref::<VerifyError>() {
            Some(ours) => ours.clone(),
            None => VerifyError::Invalid(inner.to_string()),
        },
        other => VerifyError::Invalid(rustls::Error::InvalidCertificate(other).to_string()),
    }
}
