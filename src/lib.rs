//! xtls-component: an XEP-0114 component that gives XMPP bots end-to-end encrypted XTLS
//! endpoints.
//!
//! The engine (protocol vocabulary, XML stream reader, identities, the sans-IO tunnel) is the
//! `xtls` crate of this workspace. This crate is the async shell around it, one layer per
//! module, listed in the direction data flows; each module may import only the ones below it
//! (`tests/layers.rs` checks it):
//!
//! | module | role |
//! |---|---|
//! | [`app`] | wiring and ordered shutdown; the only module that knows every other |
//! | [`api`] | the HTTP admin and bot API (axum): routes, auth, problem+json, OpenAPI, health |
//! | [`router`] | inbound stanza to the addressed bot, or an answer when no bot owns it |
//! | [`session`] | per-bot drivers owning their tunnels; the live session table |
//! | [`delivery`] | typed bot events, and their delivery by webhook |
//! | [`link`] | the XEP-0114 link to the server: handshake, keepalive, reconnect |
//! | [`store`] | every SQL statement: bots, keys, pins, tunnels, events, webhooks, messages |
//! | [`metrics`] | Prometheus counters and gauges |
//! | [`config`] | the TOML configuration with environment overrides |

#![deny(missing_docs)]

pub mod api;
pub mod app;
pub mod config;
pub mod delivery;
pub mod link;
pub mod metrics;
pub mod router;
pub mod session;
pub mod store;
