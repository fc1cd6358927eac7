-- PostgreSQL twin of ../0008_instance_admin_url.sql: where each instance's admin API is reached.

ALTER TABLE instances ADD COLUMN admin_url TEXT;
