-- PostgreSQL twin of ../0007_bot_owners.sql: which instance runs each bot, and the epoch that
-- fences its writes.

CREATE TABLE bot_owners (
    bot_jid     TEXT PRIMARY KEY REFERENCES bots(jid) ON DELETE CASCADE,
    instance_id TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    claimed_at  TEXT NOT NULL
);
CREATE INDEX bot_owners_instance ON bot_owners (instance_id);
