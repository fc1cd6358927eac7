-- Where each instance's admin API is reached (`instances.advertise_url`), for people reading
-- the instance list and for instances that forward requests to one another; NULL when the
-- instance does not say.

ALTER TABLE instances ADD COLUMN admin_url TEXT;
