-- PostgreSQL twin of ../0006_instances.sql: the instances serving the store, and which one ran
-- each tunnel.

CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          BIGINT NOT NULL,
    started_at   TEXT NOT NULL,
    heartbeat_ms BIGINT NOT NULL
);

ALTER TABLE tunnels ADD COLUMN instance_id TEXT;
CREATE INDEX tunnels_live ON tunnels (instance_id) WHERE state != 'closed';
