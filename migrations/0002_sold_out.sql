-- Set in the transaction that sells an event's last seat; joins are refused (410) from then on.
ALTER TABLE events ADD COLUMN sold_out_at TIMESTAMPTZ;
