//! Group commit of orders (`order_writer.rs`, migration 0018): orders committed together keep
//! their own answers — a hold that lost its seat is refused while the rest of its batch commits,
//! and an order that trips a constraint fails alone — and nothing is sold twice.

use std::time::Duration;

use chrono::{SubsecRound, Utc};
use purchase::order_writer::{NewOrder, OrderWriter};
use shared::error::violated_constraint;
use uuid::Uuid;

fn order(event: i64, jti: Uuid, hold_id: Uuid, seat: i64, n: usize) -> NewOrder {
    NewOrder {
        event,
        jti,
        identity: format!("site:batch-{n}"),
        hold_id,
        seat_ids: vec![seat],
        codes: vec![format!("FG-BATCH-{}", Uuid::new_v4().simple())],
        total_cents: 2500,
        reference: format!("sb_ch_batch_{n}"),
        order_id: Uuid::now_v7(),
        created_at: Utc::now().trunc_subsecs(6),
        key: format!("key-{n}"),
        body: serde_json::json!({ "n": n }),
        payment_key: format!("{jti}:key-{n}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_committed_together_keep_their_own_answers() {
    let sale = crate::Sale::start(40).await;
    let (pg, event, seats) = (sale.pg.clone(), sale.event, sale.seats.clone());

    // Thirty orders of thirty passes; orders 5 and 17 lost their hold's seat (expired), and
    // order 29 uses the pass of order 28 (which buys first: one order per pass).
    let mut orders = Vec::new();
    for (n, seat) in seats.iter().take(30).enumerate() {
        let jti = if n == 29 {
            orders.iter().map(|o: &NewOrder| o.jti).nth(28).expect("28")
        } else {
            Uuid::new_v4()
        };
        let holder = if n == 29 { Uuid::new_v4() } else { jti };
        let hold_id = crate::fg_hold(&pg, event, &[*seat], holder).await;
        orders.push(order(event, jti, hold_id, *seat, n));
    }
    sqlx::query("UPDATE seats SET held_until = now() - interval '1 second' WHERE id = ANY($1)")
        .bind(vec![seats[5], seats[17]])
        .execute(&pg)
        .await
        .expect("expire two holds");

    // One writer. Orders 0..=26, then 27..=29: each time the first order's seat is locked
    // elsewhere, so its batch waits and the other orders queue behind it and are committed
    // together (28 and 29 in one batch that trips the one-order-per-pass constraint).
    let writer = OrderWriter::start(pg.clone(), 1);
    let mut outcomes = commit_queued(&pg, &writer, &orders[..27]).await;
    outcomes.extend(commit_queued(&pg, &writer, &orders[27..]).await);
    let transactions: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM orders WHERE id = ANY($1)")
            .bind(orders[..27].iter().map(|o| o.order_id).collect::<Vec<_>>())
            .fetch_one(&pg)
            .await
            .expect("transactions");
    assert_eq!(
        transactions, 2,
        "the first order alone, then the other 24 in one transaction"
    );

    for (n, outcome) in outcomes.iter().enumerate() {
        match n {
            5 | 17 => assert_eq!(
                outcome.as_ref().map(|(c, _)| c.as_str()).ok(),
                Some("hold_expired"),
                "order {n}"
            ),
            29 => {
                let e = outcome.as_ref().expect_err("a second order of one pass");
                assert_eq!(
                    violated_constraint(e),
                    Some("orders_one_per_pass"),
                    "order {n}"
                );
            }
            _ => assert_eq!(
                outcome.as_ref().map(|(c, _)| c.as_str()).ok(),
                Some("ordered"),
                "order {n}: {outcome:?}"
            ),
        }
    }
    let (orders_n, tickets, sold, twice): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders WHERE event_id = $1),
                (SELECT count(*) FROM tickets t JOIN orders o ON o.id = t.order_id
                 WHERE o.event_id = $1),
                (SELECT count(*) FROM seats WHERE event_id = $1 AND status = 'sold'),
                (SELECT count(*) FROM (SELECT seat_id FROM tickets GROUP BY seat_id
                                       HAVING count(*) > 1) d)",
    )
    .bind(event)
    .fetch_one(&pg)
    .await
    .expect("counts");
    assert_eq!((orders_n, tickets, sold, twice), (27, 27, 27, 0));
    let unsold: Vec<String> =
        sqlx::query_scalar("SELECT status FROM seats WHERE id = ANY($1) ORDER BY id")
            .bind(vec![seats[5], seats[17], seats[29]])
            .fetch_all(&pg)
            .await
            .expect("statuses");
    assert!(
        unsold.iter().all(|s| s != "sold"),
        "refused orders sold nothing: {unsold:?}"
    );
    sale.stop().await;
}

/// Commits `orders` through `writer` with the first one's seat locked for a moment, so the rest
/// queue up behind it; the outcomes in order.
async fn commit_queued(
    pg: &sqlx::PgPool,
    writer: &OrderWriter,
    orders: &[NewOrder],
) -> Vec<purchase::order_writer::Outcome> {
    let mut blocker = pg.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM seats WHERE id = $1 FOR UPDATE")
        .bind(orders[0].seat_ids[0])
        .execute(&mut *blocker)
        .await
        .expect("lock");
    let first = tokio::spawn({
        let (writer, first) = (writer.clone(), orders[0].clone());
        async move { writer.commit(first).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rest = futures::future::join_all(orders[1..].iter().cloned().map(|o| {
        let writer = writer.clone();
        async move { writer.commit(o).await }
    }));
    let release = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        blocker.rollback().await.expect("release");
    };
    let (rest, _) = tokio::join!(rest, release);
    let mut outcomes = vec![first.await.expect("first")];
    outcomes.extend(rest);
    outcomes
}
