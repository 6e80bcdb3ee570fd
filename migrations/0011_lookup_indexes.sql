-- Settling a checkout, refunding and reconciling find the payment by the provider's reference:
-- without this index each of those scanned every payment ever taken.
CREATE INDEX payments_provider_ref ON payments (provider_ref) WHERE provider_ref IS NOT NULL;

-- A seat's tickets, valid or void: the foreign key's own check when seats are deleted (an
-- organizer removing a section, an event deleted) and the section-removal guard look them up.
CREATE INDEX tickets_seat ON tickets (seat_id);
-- An event's orders: reports, support lookups, deleting an event.
CREATE INDEX orders_event ON orders (event_id, created_at);
