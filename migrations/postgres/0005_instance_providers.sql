-- The providers each instance has in its config (a JSON array of names), written with its
-- heartbeat: a provider one instance no longer has is still served while another lists it.
ALTER TABLE instances ADD COLUMN providers TEXT NOT NULL DEFAULT '[]';
