//! The sale's invariants, checked against Postgres after a run: nothing sold twice, nothing
//! charged twice, no one queued twice, every sale backed by a pass and a payment.

use std::collections::BTreeMap;

use sqlx::PgPool;

/// Each check's name and the SQL counting its violations (zero means it holds). `$1` is the event.
const CHECKS: &[(&str, &str)] = &[
    (
        "no_seat_sold_twice",
        "SELECT count(*) FROM (
           SELECT t.seat_id FROM tickets t JOIN orders o ON o.id = t.order_id
           WHERE o.event_id = $1 AND t.status = 'valid'
           GROUP BY t.seat_id HAVING count(*) > 1) AS doubled",
    ),
    (
        "sold_within_capacity",
        "SELECT GREATEST(0, (SELECT count(*) FROM tickets t JOIN orders o ON o.id = t.order_id
                              WHERE o.event_id = $1 AND t.status = 'valid')
                          - (SELECT count(*) FROM seats WHERE event_id = $1))",
    ),
    (
        "every_sold_seat_in_one_paid_order",
        "SELECT count(*) FROM seats s WHERE s.event_id = $1 AND s.status = 'sold' AND
           (SELECT count(*) FROM tickets t JOIN orders o ON o.id = t.order_id
            WHERE t.seat_id = s.id AND t.status = 'valid' AND o.status = 'paid') <> 1",
    ),
    (
        "every_ticket_on_a_sold_seat",
        "SELECT count(*) FROM tickets t JOIN orders o ON o.id = t.order_id
         JOIN seats s ON s.id = t.seat_id
         WHERE o.event_id = $1 AND t.status = 'valid' AND s.status <> 'sold'",
    ),
    (
        "no_fan_charged_twice",
        "SELECT count(*) FROM (
           SELECT p.identity FROM payments pay
           JOIN passes p ON p.jti::text = split_part(pay.idempotency_key, ':', 1)
           WHERE p.event_id = $1 AND pay.status = 'succeeded'
           GROUP BY p.identity HAVING count(*) > 1) AS doubled",
    ),
    (
        "every_order_paid",
        "SELECT count(*) FROM orders o WHERE o.event_id = $1 AND o.status = 'paid' AND NOT EXISTS (
           SELECT 1 FROM payments pay
           WHERE pay.provider_ref = o.payment_ref AND pay.status = 'succeeded')",
    ),
    (
        "every_order_backed_by_its_pass",
        "SELECT count(*) FROM orders o LEFT JOIN passes p ON p.jti = o.jti
         WHERE o.event_id = $1 AND (p.jti IS NULL OR p.identity <> o.identity
                                    OR p.event_id <> o.event_id)",
    ),
    (
        "no_identity_queued_twice",
        "SELECT count(*) FROM (SELECT identity FROM joins WHERE event_id = $1
                               GROUP BY identity HAVING count(*) > 1) AS doubled",
    ),
    (
        "live_positions_follow_the_draw",
        // Presale fans' positions are the draw's 1..N (recomputed from the seed); everyone who
        // came later holds a unique position, and together they are exactly N+1..N+L.
        "SELECT CASE WHEN count(j.position) = count(DISTINCT j.position)
                      AND (count(j.position) = 0
                           OR (min(j.position) = max(d.entrants) + 1
                               AND max(j.position) = max(d.entrants) + count(j.position)))
                      AND count(*) FILTER (WHERE j.phase = 'presale' AND j.position IS NOT NULL) = 0
                 THEN 0 ELSE 1 END::bigint
         FROM joins j JOIN draws d ON d.event_id = j.event_id
         WHERE j.event_id = $1 AND (j.phase = 'live' OR j.position IS NOT NULL)",
    ),
    (
        "one_pass_per_ticket",
        "SELECT count(*) FROM (SELECT ticket_id FROM passes WHERE event_id = $1
                               GROUP BY ticket_id HAVING count(*) > 1) AS doubled",
    ),
];

/// Runs every check; `true` means it holds.
pub async fn check(pg: &PgPool, event: i64) -> anyhow::Result<BTreeMap<String, bool>> {
    let mut results = BTreeMap::new();
    for (name, sql) in CHECKS {
        let violations: i64 = sqlx::query_scalar(sql).bind(event).fetch_one(pg).await?;
        results.insert((*name).to_owned(), violations == 0);
    }
    Ok(results)
}

/// Seats the event has, from Postgres.
pub async fn capacity(pg: &PgPool, event: i64) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM seats WHERE event_id = $1")
            .bind(event)
            .fetch_one(pg)
            .await?,
    )
}

/// Seats sold for the event, from Postgres.
pub async fn seats_sold(pg: &PgPool, event: i64) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM seats WHERE event_id = $1 AND status = 'sold'")
            .bind(event)
            .fetch_one(pg)
            .await?,
    )
}
