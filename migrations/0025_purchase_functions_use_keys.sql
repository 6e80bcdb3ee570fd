-- The purchase path's functions find every row they touch by a key, so they plan without
-- sequential scans (`SET enable_seqscan = off` on each function; a statement with no index to
-- use still runs, as a scan) and without JIT compilation (`SET jit = off`).
--
-- Why: PL/pgSQL keeps one generic plan per statement for the life of a connection, made from
-- the statistics of the moment. Tables analysed while they were empty — before the first sale
-- on a database, or a sale's tables after the last one was deleted, exactly when a rush starts —
-- look free to scan, and the plan kept `Seq Scan on holds` / `on orders` / `on payments` for
-- lookups by id. Each batch then read every hold and order of the sale so far, more with every
-- purchase: with auto_explain (bench-checkout after `VACUUM (ANALYZE)` on emptied tables) the
-- checkout start's fresh-request check took 3–13 ms a batch, and hold + checkout fell from
-- ~1,000 to ~520 pairs/s, until a new ANALYZE. Autovacuum would replan some minutes into the
-- sale; a sale's first minutes are the ones that matter.
--
-- JIT: the same check's plan, costed over `generate_series` (1,000 rows assumed) times three
-- key lookups, passed `jit_above_cost`, and each batch compiled 27 functions first (28 ms for
-- a statement of well under a millisecond). Nothing on this path runs long enough to gain.
--
-- Any later `CREATE OR REPLACE` of these functions must repeat the setting (it replaces the
-- function's SET clauses too); the test `purchase_functions_plan_without_scans` checks it.

DO $$
DECLARE
    f REGPROCEDURE;
BEGIN
    FOR f IN
        SELECT p.oid::REGPROCEDURE FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = current_schema()
          AND p.proname IN ('fg_hold', 'fg_holds', 'fg_holds_general', 'fg_checkout_begin',
                            'fg_checkout_begins', 'fg_commit_order', 'fg_commit_orders')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET enable_seqscan = off', f);
        EXECUTE format('ALTER FUNCTION %s SET jit = off', f);
    END LOOP;
END
$$;
