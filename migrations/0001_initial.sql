-- Bots, their keys and certificates, the peers they pinned, and tunnel history.

CREATE TABLE bots (
    jid        TEXT PRIMARY KEY,          -- normalized bare JID
    localpart  TEXT NOT NULL UNIQUE,
    handler    TEXT NOT NULL,
    peer_auth  TEXT NOT NULL,             -- required | optional
    trust      TEXT NOT NULL,             -- tofu | pinned
    created_at TEXT NOT NULL              -- RFC 3339
);

CREATE TABLE bot_keys (
    bot_jid    TEXT PRIMARY KEY REFERENCES bots(jid) ON DELETE CASCADE,
    key_der    BLOB NOT NULL,             -- PKCS#8 private key
    cert_der   BLOB NOT NULL,             -- self-signed certificate (spec §2.2)
    created_at TEXT NOT NULL
);

CREATE TABLE peer_pins (
    bot_jid     TEXT NOT NULL REFERENCES bots(jid) ON DELETE CASCADE,
    peer        TEXT NOT NULL,            -- peer bare JID
    spki_sha256 TEXT NOT NULL,            -- colon-separated uppercase hex
    cert_der    BLOB,
    verified    INTEGER NOT NULL DEFAULT 0,
    first_seen  TEXT NOT NULL,
    last_seen   TEXT NOT NULL,
    PRIMARY KEY (bot_jid, peer, spki_sha256)
);

CREATE TABLE tunnels (
    id              TEXT PRIMARY KEY,
    bot_jid         TEXT NOT NULL,        -- kept after the bot is deleted
    local_jid       TEXT NOT NULL,
    peer            TEXT NOT NULL,
    role            TEXT NOT NULL,
    state           TEXT NOT NULL,
    tls_version     TEXT,
    cipher_suite    TEXT,
    peer_spki       TEXT,
    trust           TEXT,
    stanzas_in      INTEGER NOT NULL DEFAULT 0,
    stanzas_out     INTEGER NOT NULL DEFAULT 0,
    bytes_in        INTEGER NOT NULL DEFAULT 0,
    bytes_out       INTEGER NOT NULL DEFAULT 0,
    opened_at       TEXT NOT NULL,
    established_at  TEXT,
    closed_at       TEXT,
    close_reason    TEXT
);
CREATE INDEX tunnels_by_opened ON tunnels (opened_at DESC);

CREATE TABLE health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at TEXT NOT NULL
);
