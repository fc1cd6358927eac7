-- Certificate rotation: a bot's next certificate, announced before it replaces the active one
-- (`bot_keys`), and the certificates it used before.

CREATE TABLE bot_next_keys (
    bot_jid    TEXT PRIMARY KEY REFERENCES bots(jid) ON DELETE CASCADE,
    key_der    BLOB NOT NULL,                    -- PKCS#8, sealed as bot_keys.key_der is
    cert_der   BLOB NOT NULL,
    created_at TEXT NOT NULL,                    -- RFC 3339: when it was announced
    active_at  TEXT NOT NULL                     -- RFC 3339: when it becomes the active one
);

CREATE TABLE bot_retired_certs (
    bot_jid    TEXT NOT NULL REFERENCES bots(jid) ON DELETE CASCADE,
    cert_der   BLOB NOT NULL,
    retired_at TEXT NOT NULL
);
CREATE INDEX bot_retired_certs_by_bot ON bot_retired_certs (bot_jid, retired_at);
