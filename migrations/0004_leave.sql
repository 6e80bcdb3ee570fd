-- Fans who leave the line. Before the draw they leave the entrant set (left_before_draw, decided
-- under the draw lock); after it the draw's entrants never change, and the queue skips their
-- position instead.
ALTER TABLE joins
    ADD COLUMN left_at TIMESTAMPTZ,
    ADD COLUMN left_before_draw BOOLEAN NOT NULL DEFAULT FALSE;
