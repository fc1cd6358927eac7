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
//! | [`component`] | the XEP-0114 link to the server: handshake, keepalive, reconnect |
//! | [`router`] | inbound stanza to the addressed bot, or an answer when no bot owns it |
//! | [`session`] | per-bot drivers owning their tunnels; the live session table |
//! | [`store`] | SQLite: bots, keys, pins, tunnel history |
//! | [`eventlog`] | the durable per-bot event log and its shared cursor |
//! | [`webhook`] | signed webhook delivery of the event logs, retries and dead letters |
//! | [`http`] | the HTTP server under the admin API: deadlines, caps, `Host` allow-list |
//! | [`admin`] | the axum admin API |
//! | [`botapi`] | the bot-facing routes: events, webhook, deliveries, tokens |
//! | [`apidoc`] | the admin API's OpenAPI document, generated from the handlers |
//! | [`metrics`] | Prometheus counters and gauges, `/metrics` |
//! | [`config`] | the TOML configuration with environment overrides |
//! | [`app`] | wiring and ordered shutdown |

pub mod api;
pub mod app;
pub mod config;
pub mod delivery;
pub mod link;
pub mod metrics;
pub mod router;
pub mod session;
pub mod store;
