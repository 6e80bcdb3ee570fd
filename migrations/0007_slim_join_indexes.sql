-- Joins are the hottest insert of a sale. A presale join never stores a position (the draw's
-- order is recomputed from its seed), so the position index need not hold those rows, and the
-- index of unpositioned joins served no query: each presale join now updates two indexes
-- (ticket id, identity) instead of four. Positions stay unique per event.
ALTER TABLE joins DROP CONSTRAINT joins_unique_position;
CREATE UNIQUE INDEX joins_unique_position ON joins (event_id, position) WHERE position IS NOT NULL;
DROP INDEX joins_unpositioned;
