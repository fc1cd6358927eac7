-- Which instance runs each bot, for instances that share a store: the one whose connection the
-- XMPP server routes the bot's stanzas to. `epoch` grows by one at every change of owner; an
-- owner's writes for the bot name the epoch they hold (a fencing token), so an instance that
-- lost a bot and has not noticed yet cannot write over its successor.

CREATE TABLE bot_owners (
    bot_jid     TEXT PRIMARY KEY REFERENCES bots(jid) ON DELETE CASCADE,
    instance_id TEXT NOT NULL,
    epoch       INTEGER NOT NULL,       -- 1 for the first owner, one more at every change
    claimed_at  TEXT NOT NULL           -- RFC 3339
);
CREATE INDEX bot_owners_instance ON bot_owners (instance_id);
