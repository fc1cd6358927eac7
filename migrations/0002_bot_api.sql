-- The bot-facing API: per-bot event log and its cursor, webhooks, bot tokens, outbound messages.

ALTER TABLE bots ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;

CREATE TABLE events (
    bot_jid          TEXT NOT NULL REFERENCES bots(jid) ON DELETE CASCADE,
    seq              INTEGER NOT NULL,    -- per bot, gap-free, from 1
    id               TEXT NOT NULL UNIQUE,
    type             TEXT NOT NULL,
    tunnel_id        TEXT,
    peer             TEXT,
    occurred_at      TEXT NOT NULL,
    data             TEXT NOT NULL,       -- JSON object
    state            INTEGER NOT NULL DEFAULT 0, -- 0 pending, 1 acknowledged, 2 dead letter
    attempts         INTEGER NOT NULL DEFAULT 0,
    first_attempt_ms INTEGER,             -- Unix ms of the first webhook attempt
    next_attempt_ms  INTEGER,             -- Unix ms before which no retry is made
    last_error       TEXT,
    acked_at         TEXT,
    PRIMARY KEY (bot_jid, seq)
) WITHOUT ROWID;
CREATE INDEX events_by_state ON events (bot_jid, state, seq);

CREATE TABLE webhooks (
    bot_jid         TEXT PRIMARY KEY REFERENCES bots(jid) ON DELETE CASCADE,
    url             TEXT NOT NULL,
    secret          TEXT NOT NULL,        -- whsec_<base64>; never returned by the API
    timeout_ms      INTEGER NOT NULL,
    max_in_flight   INTEGER NOT NULL,
    last_success_at TEXT,
    last_error      TEXT,
    updated_at      TEXT NOT NULL
);

CREATE TABLE delivery_attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    bot_jid     TEXT NOT NULL REFERENCES bots(jid) ON DELETE CASCADE,
    event_id    TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    at          TEXT NOT NULL,
    status      INTEGER,                  -- HTTP status; NULL when no answer came
    error       TEXT,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX delivery_attempts_by_bot ON delivery_attempts (bot_jid, id DESC);

CREATE TABLE bot_tokens (
    id         TEXT PRIMARY KEY,
    bot_jid    TEXT NOT NULL REFERENCES bots(jid) ON DELETE CASCADE,
    sha256     TEXT NOT NULL UNIQUE,      -- hex SHA-256 of the token
    created_at TEXT NOT NULL
);

CREATE TABLE messages (
    id              TEXT PRIMARY KEY,
    bot_jid         TEXT NOT NULL REFERENCES bots(jid) ON DELETE CASCADE,
    idempotency_key TEXT,
    to_jid          TEXT NOT NULL,
    stanza          TEXT NOT NULL,        -- the inner stanza to send
    reopen          INTEGER NOT NULL DEFAULT 0,
    status          TEXT NOT NULL,
    reason          TEXT,
    tunnel_id       TEXT,
    history         TEXT NOT NULL,        -- JSON array of {status, at, reason}
    created_at      TEXT NOT NULL,
    UNIQUE (bot_jid, idempotency_key)
);
CREATE INDEX messages_unfinished ON messages (bot_jid, status);
