//! What the bot backend sees: each bot's durable event log and its delivery by webhook.
//!
//! Owns: the event log (append, read, acknowledge, prune) and its shared cursor, and the
//! webhook deliverer (signing, retries, dead letters). The session layer appends events and
//! spawns deliverers; the API reads the logs and manages webhooks. It calls down into
//! [`crate::store`] only.

pub mod event;
pub mod webhook;
