-- Holds of general-admission places by quantity in batches. They went through `fg_hold` one
-- call and one commit each (bench-checkout --general: 0.6 ms of database time a hold against
-- ~0.15 ms per hold of named seats taken in batches). The purchase service now hands the
-- holds by quantity waiting at one moment to one call of the function below, which takes them
-- in order with `fg_hold`'s own statements, in one transaction: each gets exactly the answer it
-- would have had alone, since a later hold sees the earlier ones (their places are held, so the
-- search passes them; a pass's second hold replaces its first). A constraint violation aborts
-- the call and the service takes each hold of the batch alone.
CREATE FUNCTION fg_holds_general(p_event BIGINT[], p_jti UUID[], p_ticket_type TEXT[],
                                 p_quantity INTEGER[], p_hold UUID[], p_expires TIMESTAMPTZ[])
RETURNS TABLE (req INTEGER, code TEXT, seat_ids BIGINT[], freed BIGINT[], total_cents BIGINT,
               detail TEXT)
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. cardinality(p_event) LOOP
        RETURN QUERY
        SELECT i, h.code, h.seat_ids, h.freed, h.total_cents, h.detail
        FROM fg_hold(p_event[i], p_jti[i], '{}', p_ticket_type[i], p_quantity[i], p_hold[i],
                     p_expires[i]) AS h;
    END LOOP;
END;
$$;
