//! xtls-component: an XEP-0114 component that gives XMPP bots end-to-end encrypted XTLS
//! endpoints.
//!
//! Module map, in the direction data flows:
//!
//! | module | role |
//! |---|---|
//! | [`xml`] | incremental XML stream reader shared by the server link and the tunnels |
//! | [`stanza`] | protocol vocabulary: namespaces, IQ envelopes, XTLS elements, stanza errors |
//! | [`certs`] | bot certificates, fingerprints, XmppAddr identity checks |
//! | [`tunnel`] | the sans-IO XTLS engine: one tunnel as a state machine over rustls |

pub mod certs;
pub mod config;
pub mod stanza;
pub mod tunnel;
pub mod xml;
