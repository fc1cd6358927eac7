//! What the bot backend sees: the typed events of each bot's durable log, and their delivery
//! by webhook (docs/bot-api.md).
//!
//! Owns: [`event::BotEvent`], the contract of the log, and the webhook deliverer (signing,
//! retries, dead letters). The session layer makes the events and spawns deliverers; the API
//! serves the logs by poll and SSE. It calls down into [`crate::store`], which keeps the log
//! (`store::events`): the bot's driver is its only writer and appends a batch of events in one
//! transaction before acknowledging the `data` IQs that produced them; readers (poll, SSE,
//! webhook) share one cursor per bot, the highest `seq` up to which every event is
//! acknowledged or dead.

pub mod event;
pub mod guard;
pub mod webhook;
