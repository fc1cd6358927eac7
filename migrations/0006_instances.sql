-- The instances serving the store, and which one ran each tunnel: at start an instance closes
-- the live rows of instances that are gone (all others, while one instance holds the store
-- alone), not those of instances still running.

CREATE TABLE instances (
    id           TEXT PRIMARY KEY,       -- random, one per process start
    host         TEXT NOT NULL,          -- the host name, for people
    pid          INTEGER NOT NULL,
    started_at   TEXT NOT NULL,          -- RFC 3339
    heartbeat_ms INTEGER NOT NULL        -- Unix ms of the last heartbeat, by the database's clock
);

ALTER TABLE tunnels ADD COLUMN instance_id TEXT;   -- NULL: written before this migration
CREATE INDEX tunnels_live ON tunnels (instance_id) WHERE state != 'closed';
