-- Pins people act on over the API: who verified a key, when, and the fingerprint they said
-- they compared; and the audit log of every decision about a pin (trust on first use
-- included), kept after the bot is deleted.
ALTER TABLE peer_pins ADD COLUMN verified_at TEXT;
ALTER TABLE peer_pins ADD COLUMN verified_by TEXT;   -- admin | bot-token:<id>
ALTER TABLE peer_pins ADD COLUMN compared TEXT;      -- SPKI SHA-256 the verifier compared

CREATE TABLE trust_audit (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          TEXT NOT NULL,
    actor       TEXT NOT NULL,                   -- admin | bot-token:<id> | component
    action      TEXT NOT NULL,                   -- pinned_on_first_use | approved | verified | unverified | removed | trust_set
    bot_jid     TEXT NOT NULL,
    peer        TEXT,                            -- NULL: the bot's own trust mode (trust_set)
    spki_sha256 TEXT,                            -- NULL for a trust mode
    compared    TEXT,
    trust       TEXT                             -- the peer's trust mode set (trust_set)
);
CREATE INDEX trust_audit_by_bot ON trust_audit (bot_jid, seq);

-- The trust mode `pinned` is now called `manual` (only keys someone approved get in); a new
-- mode `verified_only` accepts only keys someone verified. Old rows are renamed.
UPDATE bots SET trust = 'manual' WHERE trust = 'pinned';

-- A trust mode for one peer of one bot, overriding the bot's (e.g. `verified_only` for an
-- administrator's account on a `tofu` bot).
CREATE TABLE peer_trust (
    bot_jid    TEXT NOT NULL REFERENCES bots(jid) ON DELETE CASCADE,
    peer       TEXT NOT NULL,                    -- bare JID
    trust      TEXT NOT NULL,                    -- tofu | manual | verified_only
    updated_at TEXT NOT NULL,
    PRIMARY KEY (bot_jid, peer)
);
