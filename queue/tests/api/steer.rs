//! What steers the admission tick besides the controls, decided in Postgres: no more shoppers
//! than the places left can serve, and admissions that lapse unclaimed made up for.

use queue::admission::tick;
use queue::steer::{figures, size};
use shared::testing::TestEnv;

use super::{admitted, drawn_event, last_tick_ago, LONG};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_stops_short_of_far_more_shoppers_than_places_left() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    // 1,000 fans in line, a rate owing 600 and a cap of 1,000: but only 10 places.
    let event = drawn_event(&pg, 1_000, 600, 1_000).await;
    sqlx::query(
        "INSERT INTO seats (event_id, section, row_label, number, price_cents)
         SELECT $1, 'A', '1', g, 100 FROM generate_series(1, 10) g",
    )
    .bind(event.get())
    .execute(&pg)
    .await
    .expect("seats");
    let f = figures(&pg, event).await.expect("figures");
    assert_eq!((f.places_left(), f.waiting()), (10, 1_000));
    size(&pg, event, &f).await.expect("size");
    tick(&pg, event, LONG).await.expect("tick");
    last_tick_ago(&pg, event, 60.0).await;
    let t = tick(&pg, event, LONG).await.expect("tick").expect("ticked");
    // Nothing measured yet: one place a shopper, a quarter more: 13, not 600.
    assert_eq!(t.admitted.len(), 13);
    assert_eq!(t.places_left, Some(10));

    // Seven places sell to the first seven shoppers, who leave; three admissions lapse.
    sqlx::query("UPDATE seats SET status = 'sold' WHERE event_id = $1 AND number <= 7")
        .bind(event.get())
        .execute(&pg)
        .await
        .expect("sold");
    sqlx::query(
        "UPDATE admissions SET slot_until = now() - interval '1 second',
                claim_by = now() - interval '1 second'
         WHERE event_id = $1 AND position <= 10",
    )
    .bind(event.get())
    .execute(&pg)
    .await
    .expect("finished");
    let f = figures(&pg, event).await.expect("figures");
    // (7 + 20) / (10 + 20) places an admission, 3 left: ceil(3 / 0.9 × 1.25) = 5 at once,
    // 3 of them still active.
    assert_eq!(f.admit_limit(), Some(5));
    size(&pg, event, &f).await.expect("size");
    last_tick_ago(&pg, event, 60.0).await;
    let t = tick(&pg, event, LONG).await.expect("tick").expect("ticked");
    assert_eq!(t.admitted, [14, 15]);

    // Sold out: nobody more.
    sqlx::query("UPDATE seats SET status = 'sold' WHERE event_id = $1")
        .bind(event.get())
        .execute(&pg)
        .await
        .expect("sold");
    size(&pg, event, &figures(&pg, event).await.expect("figures"))
        .await
        .expect("size");
    last_tick_ago(&pg, event, 60.0).await;
    let t = tick(&pg, event, LONG).await.expect("tick").expect("ticked");
    assert!(t.admitted.is_empty());
    assert_eq!(admitted(&pg, event).await.len(), 15);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_admissions_are_made_up_for_so_shoppers_arrive_at_the_rate() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let event = drawn_event(&pg, 1_000, 60, 1_000).await;
    tick(&pg, event, LONG).await.expect("tick");
    // 40 admissions whose claim windows ended: 20 claimed, 20 never.
    last_tick_ago(&pg, event, 40.0).await;
    let t = tick(&pg, event, LONG).await.expect("tick").expect("ticked");
    assert_eq!(t.admitted.len(), 40);
    sqlx::query(
        "UPDATE admissions SET admitted_at = now() - interval '2 minutes',
                claim_by = now() - interval '1 minute', slot_until = now() - interval '1 minute',
                ticket_id = CASE WHEN position <= 20 THEN gen_random_uuid() END,
                claimed_at = CASE WHEN position <= 20 THEN now() - interval '90 seconds' END
         WHERE event_id = $1",
    )
    .bind(event.get())
    .execute(&pg)
    .await
    .expect("claims");
    let f = figures(&pg, event).await.expect("figures");
    assert_eq!((f.due_recent, f.lapsed_recent), (40, 20));
    assert_eq!(f.rate_factor(), 2.0);
    size(&pg, event, &f).await.expect("size");
    // Ten seconds at 60 a minute owe ten shoppers: twenty admissions, as half lapse.
    last_tick_ago(&pg, event, 10.0).await;
    let t = tick(&pg, event, LONG).await.expect("tick").expect("ticked");
    assert_eq!(t.admitted.len(), 20);
    env.cleanup().await;
}
