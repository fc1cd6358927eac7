-- PostgreSQL twin of ../0003_encrypted_only.sql: per-bot policy refusing stanzas sent in clear.
ALTER TABLE bots ADD COLUMN encrypted_only BOOLEAN NOT NULL DEFAULT FALSE;
