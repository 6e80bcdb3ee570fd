-- Fans may refund their own order until this many hours before the event starts; NULL: the
-- organizer offers no fan refunds (support and the organizer can always refund).
ALTER TABLE events
    ADD COLUMN fan_refund_cutoff_hours INTEGER
        CHECK (fan_refund_cutoff_hours BETWEEN 0 AND 8760);
