-- PostgreSQL twin of ../0001_initial.sql: bots, their keys and certificates, the peers they
-- pinned, and tunnel history. Integers are BIGINT (the program reads every one as i64), flags
-- BOOLEAN, DER and sealed keys BYTEA; times stay RFC 3339 text, as on SQLite.

CREATE TABLE bots (
    jid        TEXT PRIMARY KEY,          -- normalized bare JID
    localpart  TEXT NOT NULL UNIQUE,
    handler    TEXT NOT NULL,
    peer_auth  TEXT NOT NULL,             -- required | optional
    trust      TEXT NOT NULL,             -- tofu | manual | verified_only
    created_at TEXT NOT NULL              -- RFC 3339
);

CREATE TABLE bot_keys (
    bot_jid    TEXT PRIMARY KEY REFERENCES bots(jid) ON DELETE CASCADE,
    key_der    BYTEA NOT NULL,            -- PKCS#8 private key
    cert_der   BYTEA NOT NULL,            -- self-signed certificate
    created_at TEXT NOT NULL
);

CREATE TABLE peer_pins (
    bot_jid     TEXT NOT NULL REFERENCES bots(jid) ON DELETE CASCADE,
    peer        TEXT NOT NULL,            -- peer bare JID
    spki_sha256 TEXT NOT NULL,            -- colon-separated uppercase hex
    cert_der    BYTEA,
    verified    BOOLEAN NOT NULL DEFAULT FALSE,
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
    stanzas_in      BIGINT NOT NULL DEFAULT 0,
    stanzas_out     BIGINT NOT NULL DEFAULT 0,
    bytes_in        BIGINT NOT NULL DEFAULT 0,
    bytes_out       BIGINT NOT NULL DEFAULT 0,
    opened_at       TEXT NOT NULL,
    established_at  TEXT,
    closed_at       TEXT,
    close_reason    TEXT
);
CREATE INDEX tunnels_by_opened ON tunnels (opened_at DESC);

CREATE TABLE health (
    id         BIGINT PRIMARY KEY CHECK (id = 1),
    checked_at TEXT NOT NULL
);
