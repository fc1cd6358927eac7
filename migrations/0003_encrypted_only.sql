-- Per-bot policy (docs/protocol.md §1.9 rule 8): refuse stanzas sent in clear, with an error
-- telling the sender to use XTLS. Off by default: clear messages reach the bot marked as such.
ALTER TABLE bots ADD COLUMN encrypted_only INTEGER NOT NULL DEFAULT 0;
