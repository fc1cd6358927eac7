//! What a tunnel reports to its owner: events, why it closed, what the handshake established,
//! why a send was refused, and its counters.

use std::fmt;

use minidom::Element;

use crate::certs::Fingerprint;

use super::{TrustVerdict, VerifyError};

/// Why a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// We closed it gracefully (operator or bot request).
    Local,
    /// The peer sent `<close/>`.
    PeerClosed,
    /// The peer's TLS sent a fatal alert.
    PeerAlert(String),
    /// Our TLS refused the peer's bytes.
    TlsError(String),
    /// The peer's certificate was refused, and why.
    CertificateRejected(VerifyError),
    /// The peer answered one of our IQs with an error.
    PeerError(String),
    /// The peer refused our `start` (condition given): it will not talk XTLS with us.
    Refused(String),
    /// The peer answered our `start` that it does not support XTLS (condition given).
    NotSupported(String),
    /// The peer answered our `start` with a `wait` error: busy, try again later.
    Busy(String),
    /// The peer answered our `start` with `conflict`: its own `start` to us won the tie-break
    /// (spec §1.14) and its tunnel takes the place of ours.
    Conflict,
    /// The peer sent something the protocol forbids in this state.
    Protocol(String),
    /// The tunnel plaintext was not acceptable XML (spec §1.9 rules 1 and 6).
    InnerXml(String),
    /// A deadline passed (which one given).
    Timeout(&'static str),
    /// No application data for the idle timeout.
    Idle,
    /// A new `start` from the same peer replaced the tunnel.
    Replaced,
    /// The peer went unavailable or its server reported it gone.
    PeerGone,
    /// The component stream to the server was lost.
    ConnectionLost,
    /// The component is shutting down.
    Shutdown,
    /// The bot was deleted.
    BotDeleted,
    /// What arrived could not be stored, so it was refused.
    StoreUnavailable,
    /// The owner was too busy to take a request of the tunnel and refused it with an error
    /// (after an error both sides consider the tunnel gone, spec §1.11), or the peer sent
    /// inner requests faster than it took our answers.
    Overloaded,
}

impl CloseReason {
    /// The key the peer presented and the keys pinned for it, when the tunnel ended because
    /// the peer's key changed (spec §2.3 step 6).
    pub fn identity_change(&self) -> Option<(&Fingerprint, &[Fingerprint])> {
        match self {
            CloseReason::CertificateRejected(VerifyError::PinMismatch {
                presented,
                pinned,
                ..
            }) => Some((presented, pinned)),
            _ => None,
        }
    }

    /// The key the peer presented, when the tunnel ended because the trust mode did not
    /// accept it: a changed key, or one nobody approved yet.
    pub fn refused_key(&self) -> Option<&Fingerprint> {
        match self {
            CloseReason::CertificateRejected(
                VerifyError::PinMismatch { presented, .. }
                | VerifyError::NotPinned { presented, .. },
            ) => Some(presented),
            _ => None,
        }
    }

    /// A short stable code for the API and the store.
    pub fn code(&self) -> &'static str {
        match self {
            CloseReason::Local => "local_close",
            CloseReason::PeerClosed => "peer_close",
            CloseReason::PeerAlert(_) => "peer_alert",
            CloseReason::TlsError(_) => "tls_error",
            CloseReason::CertificateRejected(_) => "certificate_rejected",
            CloseReason::PeerError(_) => "peer_error",
            CloseReason::Refused(_) => "refused",
            CloseReason::NotSupported(_) => "not_supported",
            CloseReason::Busy(_) => "busy",
            CloseReason::Conflict => "conflict",
            CloseReason::Protocol(_) => "protocol_error",
            CloseReason::InnerXml(_) => "inner_xml",
            CloseReason::Timeout(_) => "timeout",
            CloseReason::Idle => "idle",
            CloseReason::Replaced => "replaced",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::ConnectionLost => "connection_lost",
            CloseReason::Shutdown => "shutdown",
            CloseReason::BotDeleted => "bot_deleted",
            CloseReason::StoreUnavailable => "store_unavailable",
            CloseReason::Overloaded => "overloaded",
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())?;
        match self {
            CloseReason::CertificateRejected(e) => write!(f, ": {e}"),
            CloseReason::PeerAlert(s)
            | CloseReason::TlsError(s)
            | CloseReason::PeerError(s)
            | CloseReason::Refused(s)
            | CloseReason::NotSupported(s)
            | CloseReason::Busy(s)
            | CloseReason::Protocol(s)
            | CloseReason::InnerXml(s) => write!(f, ": {s}"),
            CloseReason::Timeout(which) => write!(f, ": {which}"),
            _ => Ok(()),
        }
    }
}

/// What the handshake established about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// SPKI SHA-256 of the peer's key; `None` when it presented no certificate.
    pub spki_sha256: Option<Fingerprint>,
    /// Certificate DER, kept so pins can answer any digest (spec §1.6).
    pub cert_der: Option<Vec<u8>>,
    /// The trust verdict.
    pub trust: TrustVerdict,
}

/// Facts of an established tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    /// Negotiated TLS version.
    pub tls_version: String,
    /// Negotiated cipher suite.
    pub cipher_suite: String,
    /// The peer's identity.
    pub peer: PeerIdentity,
}

/// What the tunnel reports to its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The handshake finished and the peer was accepted.
    Established(Established),
    /// A stanza arrived through the tunnel, routing restored (spec §1.9 rule 4).
    Stanza(Element),
    /// `send` may be called again after it refused with [`SendError::Blocked`].
    Writable,
    /// Every `data` carrying the stanza that [`Tunnel::send`](super::Tunnel::send) marked so was acknowledged.
    Acknowledged(u64),
    /// A local error answering one of our inner IQ requests that the peer had not answered
    /// when the tunnel closed (spec §1.9 rule 7); it comes just before [`Event::Closed`].
    Unanswered(Element),
    /// The tunnel is gone.
    Closed(CloseReason),
}

/// Why [`Tunnel::send`](super::Tunnel::send) refused a stanza.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// The tunnel is not open (yet or any more), or the peer closed its side (close_notify).
    #[error("tunnel is not open")]
    NotOpen,
    /// The outbound queue is full; wait for [`Event::Writable`].
    #[error("tunnel send queue is full")]
    Blocked,
    /// The stanza holds text XML cannot carry (control characters, U+FFFE, U+FFFF).
    #[error("the stanza holds characters XML cannot carry")]
    NotXml,
    /// An IQ result or error that answers no request of the peer still awaiting one: an inner
    /// IQ get/set gets exactly one answer (spec §1.9 rule 7).
    #[error("no inner IQ request of the peer awaits this answer")]
    NotAwaited,
    /// Too many of our inner IQ requests await the peer's answers.
    #[error("too many inner IQ requests await the peer's answers")]
    TooManyRequests,
}

/// Byte and stanza counters, each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Stats {
    /// Inner stanzas delivered to us.
    pub stanzas_in: u64,
    /// Inner stanzas we sent.
    pub stanzas_out: u64,
    /// Raw TLS bytes received.
    pub bytes_in: u64,
    /// Raw TLS bytes sent.
    pub bytes_out: u64,
}
