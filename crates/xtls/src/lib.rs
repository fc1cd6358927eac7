//! XTLS: TLS 1.3 tunnels between two XMPP entities, carried base64-encoded inside IQ stanzas
//! of namespace `urn:xmpp:tmp:xtls` (`start`/`proceed`, `data`, `close`/`closed`).
//!
//! The servers on the path relay the tunnel and see only ciphertext. Inside it travel
//! ordinary stanzas with their routing stripped. The protocol as this crate speaks it is
//! `docs/protocol.md` in the repository; "spec §N" in the documentation refers to its sections.
//!
//! This crate is the engine only: no sockets, no clock, no tasks, no async runtime. A client,
//! a bot host or a test feeds it stanzas and instants and drains the stanzas it wants sent
//! and the events it reports, the way `rustls` and `quinn-proto` work.
//!
//! ```text
//!     your XMPP connection                                         your application
//!   ─────────────────────────┐                            ┌────────────────────────────
//!   IQ from the peer  ──────▶│ Tunnel::handle_iq(now, iq) │
//!   deadline passed   ──────▶│ Tunnel::handle_timeout(now)│◀── Tunnel::send(now, stanza)
//!                            │                            │◀── Tunnel::close(now)
//!   IQ to write       ◀──────│ Tunnel::poll_transmit()    │
//!   next deadline     ◀──────│ Tunnel::poll_timeout()     │
//!                            │ Tunnel::poll_event()       │──▶ Established, Stanza,
//!   ─────────────────────────┘                            └──▶ Writable, Acknowledged, Closed
//! ```
//!
//! The contract:
//!
//! 1. Make a tunnel with [`Tunnel::initiate`] (you send `start`, you are the TLS client) or
//!    [`Tunnel::accept`] (a peer's `start` arrived, you are the TLS server). Each side has a
//!    [`certs::BotIdentity`]: a key and a self-signed certificate whose XmppAddr is its JID.
//! 2. Give every IQ addressed to the tunnel's [`TunnelKey`] to [`Tunnel::handle_iq`]; call
//!    [`Tunnel::handle_timeout`] once the instant from [`Tunnel::poll_timeout`] has passed.
//! 3. After every call, write out [`Tunnel::poll_transmit`] in order and act on
//!    [`Tunnel::poll_event`]. Instants are yours and never go backwards.
//! 4. Once [`Tunnel::is_gone`] and both queues are empty, drop it.
//!
//! `examples/pair.rs` runs two tunnels against each other in memory and prints every IQ.
//!
//! | module | what it holds |
//! |---|---|
//! | [`stanza`] | the vocabulary: namespaces, IQ envelopes, the XTLS elements, stanza errors |
//! | [`xml`] | incremental XML stream reading with size and depth caps; serialization |
//! | [`certs`] | identities: certificate generation, fingerprints, XmppAddr checks |
//! | [`tunnel`] | the sans-IO state machine of one tunnel over rustls |
//! | [`sas`] | short authentication strings: the commit–reveal exchange inside a tunnel |
//! | [`pair`] | pairing codes: SPAKE2 inside a tunnel, bound to it, with a typed one-time code |

#![deny(missing_docs)]

/// Gives a fieldless enum its stable wire and storage names: `as_str`, `Display`, `FromStr`
/// (an unknown name is an error, never a default) and `ALL`.
macro_rules! named_enum {
    ($ty:ident, $what:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The stable name used on the wire, in the API and in the store.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = $crate::UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err($crate::UnknownName {
                        kind: $what,
                        value: s.to_owned(),
                    }),
                }
            }
        }
    };
}

pub mod certs;
pub mod pair;
pub mod sas;
pub mod stanza;
pub mod tunnel;
pub mod xml;

pub use certs::{BotIdentity, Fingerprint};

/// A name that is none of an enum's values (read from a store, a config or the wire).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} '{value}'")]
pub struct UnknownName {
    /// Which enum was asked for, e.g. `tunnel state`.
    pub kind: &'static str,
    /// The name that matched none of its values.
    pub value: String,
}
pub use tunnel::{
    CloseReason, Event, PeerPolicy, Role, State, Tunnel, TunnelConfig, TunnelKey, TunnelParams,
};
