//! The queue service's admission steps against a real Postgres and Redis, driven exactly as the
//! controller drives them: each tick admits what the rate owes since the last committed one,
//! however many instances tick at once; the cap and fans who left hold; lapsed admissions give
//! their slots back; the lease only says who does the work. And the position lookups: batched,
//! read back from Postgres where Redis lost them, "catching up" where they cannot be known.

use std::time::Duration;

use fred::prelude::*;
use queue::admission::{lead, tick, Lease};
use shared::config::CommonConfig;
use shared::ids::EventId;
use shared::redis::Redis;
use shared::testing::TestEnv;
use sqlx::PgPool;
use uuid::Uuid;

mod steer;

async fn redis(common: &CommonConfig) -> Redis {
    Redis::connect(common).await.expect("redis")
}

/// An event drawn with `places` places (a tail of `places`), admitting `rate` a minute under a
/// cap of `cap`; its last tick `ago` seconds before now.
async fn drawn_event(pg: &PgPool, places: i64, rate: i32, cap: i32) -> EventId {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO events (name, starts_at, presale_opens_at, sale_starts_at, sale_ends_at,
             rate_per_minute, max_active, pass_ttl_secs, claim_window_secs, seats_per_fan)
         VALUES ('Ticks', now() + interval '1 day', now() - interval '1 hour',
                 now() - interval '1 minute', now() + interval '1 hour', $1, $2, 600, 60, 2)
         RETURNING id",
    )
    .bind(rate)
    .bind(cap)
    .fetch_one(pg)
    .await
    .expect("event");
    sqlx::query(
        "INSERT INTO draws (event_id, seed, commitment, drawn_at, entrants, algorithm, tail)
         VALUES ($1, decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'), now(),
                 $2, 'fairgate-draw-v1', $2)",
    )
    .bind(id)
    .bind(places)
    .execute(pg)
    .await
    .expect("draw");
    sqlx::query("INSERT INTO admission_state (event_id) VALUES ($1)")
        .bind(id)
        .execute(pg)
        .await
        .expect("state");
    EventId::new(id).expect("id")
}

/// Moves the last committed tick `secs` seconds into the past, as if that much time had gone.
async fn last_tick_ago(pg: &PgPool, event: EventId, secs: f64) {
    sqlx::query(
        "UPDATE admission_state SET ticked_at = now() - make_interval(secs => $2)
         WHERE event_id = $1",
    )
    .bind(event.get())
    .bind(secs)
    .execute(pg)
    .await
    .expect("rewind");
}

async fn admitted(pg: &PgPool, event: EventId) -> Vec<i64> {
    sqlx::query_scalar("SELECT position FROM admissions WHERE event_id = $1 ORDER BY position")
        .bind(event.get())
        .fetch_all(pg)
        .await
        .expect("admissions")
}

const LONG: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ticks_admit_what_the_rate_owes_however_many_instances_tick_at_once() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let event = drawn_event(&pg, 1_000, 60, 1_000).await;

    let first = tick(&pg, event, LONG).await.expect("tick").expect("ticked");
    assert!(first.admitted.is_empty(), "the first tick starts the clock");

    // Two seconds at 60 a minute owe two admissions. Twenty instances tick at once (a stalled
    // old leader waking up beside the new one, many times over): two admissions in all.
    last_tick_ago(&pg, event, 2.0).await;
    let ticks = futures::future::join_all((0..20).map(|_| tick(&pg, event, LONG))).await;
    let total: usize = ticks
        .into_iter()
        .map(|t| t.expect("tick").map_or(0, |t| t.admitted.len()))
        .sum();
    assert_eq!(total, 2, "together they admitted what one would");
    assert_eq!(admitted(&pg, event).await, [1, 2]);

    // A long silence (no leader for a minute) does not become a burst beyond the longest gap.
    last_tick_ago(&pg, event, 60.0).await;
    let after = tick(&pg, event, Duration::from_secs(3))
        .await
        .expect("tick")
        .expect("ticked");
    assert_eq!(after.admitted, [3, 4, 5], "three seconds' worth at most");
    assert_eq!(after.head, 5);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_holds_places_given_up_are_passed_over_and_lapsed_slots_come_back() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let event = drawn_event(&pg, 30, 6_000, 6).await;
    tick(&pg, event, LONG).await.expect("tick");
    // The fan at place 5 left.
    sqlx::query(
        "INSERT INTO joins (ticket_id, event_id, identity, phase, left_at, left_position)
         VALUES ($1, $2, $3, 'presale', now(), 5)",
    )
    .bind(Uuid::now_v7())
    .bind(event.get())
    .bind(format!("fan-who-left-{}", event.get()))
    .execute(&pg)
    .await
    .expect("leaver");

    last_tick_ago(&pg, event, 10.0).await; // 1,000 owed
    let capped = tick(&pg, event, LONG).await.expect("tick").expect("ticked");
    assert_eq!(
        capped.admitted,
        [1, 2, 3, 4, 6, 7],
        "5 passed over; the cap of 6 reached"
    );
    assert_eq!((capped.head, capped.active), (7, 6));
    last_tick_ago(&pg, event, 10.0).await;
    let full = tick(&pg, event, LONG).await.expect("tick").expect("ticked");
    assert!(full.admitted.is_empty(), "no room under the cap");

    // Two admissions lapse unclaimed and one shopper buys: three slots come back.
    sqlx::query(
        "UPDATE admissions SET claim_by = now() - interval '1 second',
                               slot_until = now() - interval '1 second'
         WHERE event_id = $1 AND position IN (1, 2)",
    )
    .bind(event.get())
    .execute(&pg)
    .await
    .expect("lapse");
    sqlx::query(
        "UPDATE admissions SET slot_until = now(), finished_at = now()
         WHERE event_id = $1 AND position = 3",
    )
    .bind(event.get())
    .execute(&pg)
    .await
    .expect("bought");
    last_tick_ago(&pg, event, 10.0).await;
    let after = tick(&pg, event, LONG).await.expect("tick").expect("ticked");
    assert_eq!(after.admitted, [8, 9, 10]);
    assert_eq!(after.active, 6);

    // Paused or sold out: nobody more, and the owed admissions are not saved for later.
    sqlx::query("UPDATE events SET paused = true, max_active = 100 WHERE id = $1")
        .bind(event.get())
        .execute(&pg)
        .await
        .expect("pause");
    last_tick_ago(&pg, event, 10.0).await;
    let paused = tick(&pg, event, LONG).await.expect("tick").expect("ticked");
    assert!(paused.admitted.is_empty());
    sqlx::query("UPDATE events SET paused = false, sold_out_at = now() WHERE id = $1")
        .bind(event.get())
        .execute(&pg)
        .await
        .expect("sold out");
    last_tick_ago(&pg, event, 10.0).await;
    let sold = tick(&pg, event, LONG).await.expect("tick").expect("ticked");
    assert!(sold.admitted.is_empty());

    // Reopened: the line runs to its tail and stops there.
    sqlx::query("UPDATE events SET sold_out_at = NULL WHERE id = $1")
        .bind(event.get())
        .execute(&pg)
        .await
        .expect("reopen");
    last_tick_ago(&pg, event, 10.0).await;
    let rest = tick(&pg, event, LONG).await.expect("tick").expect("ticked");
    assert_eq!(rest.admitted, (11..=30).collect::<Vec<i64>>());
    assert_eq!(rest.head, 30);
    let positions = admitted(&pg, event).await;
    assert_eq!(
        positions.len(),
        29,
        "every place but the one given up, once"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_held_up_by_another_skips_and_the_lease_needs_a_whole_mirror() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let redis = redis(&env.common_config()).await;
    let event = drawn_event(&pg, 10, 600, 10).await;
    tick(&pg, event, LONG).await.expect("tick");

    // Another instance is inside its tick (holds the row): this one skips instead of waiting.
    let mut other = pg.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM admission_state WHERE event_id = $1 FOR UPDATE")
        .bind(event.get())
        .execute(&mut *other)
        .await
        .expect("lock");
    assert_eq!(tick(&pg, event, LONG).await.expect("tick"), None);
    other.rollback().await.expect("rollback");

    // The lease: one leader at a time, and no work while the Redis mirror is not whole.
    assert_eq!(
        lead(&redis, event, "a", 10_000).await.expect("lead"),
        Lease::MirrorNotWhole
    );
    assert_eq!(
        lead(&redis, event, "b", 10_000).await.expect("lead"),
        Lease::Follower
    );
    let _: () = redis
        .client()
        .set(redis.keys(event).drawn(), 1, None, None, false)
        .await
        .expect("set");
    assert_eq!(
        lead(&redis, event, "a", 10_000).await.expect("lead"),
        Lease::Leading
    );
    redis.quit().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_position_lookups_takes_a_few_redis_calls_not_one_each() {
    let env = TestEnv::new().await;
    let redis = redis(&env.common_config()).await;
    let event = EventId::new(9).expect("id");
    let tickets: Vec<shared::ids::TicketId> =
        (0..1_000).map(|_| shared::ids::TicketId::mint()).collect();
    let members: Vec<(f64, String)> = tickets
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 0)
        .map(|(i, t)| ((i + 1) as f64, t.to_string()))
        .collect();
    let _: i64 = redis
        .client()
        .zadd(redis.keys(event).queue(), None, None, false, false, members)
        .await
        .expect("zadd");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let pg = env.pool().await;
    let (positions, task) =
        queue::positions::Positions::new(redis.clone(), pg.clone(), shutdown.clone());
    tokio::spawn(task);

    // A thousand waiters learn their place at once, as at the draw.
    let found = futures::future::join_all(tickets.iter().map(|t| positions.of(event, *t))).await;
    for (i, position) in found.into_iter().enumerate() {
        let expected = (i % 10 != 0).then_some((i + 1) as i64);
        assert_eq!(
            position.expect("lookup").map(|p| p.get()),
            expected,
            "waiter {i}"
        );
    }
    let batches = positions.batches();
    assert!(
        (1..=50).contains(&batches),
        "{batches} Redis calls for 1,000 lookups"
    );
    // One alone still works.
    assert_eq!(
        positions
            .of(event, tickets[1])
            .await
            .expect("lookup")
            .map(|p| p.get()),
        Some(2)
    );
    shutdown.cancel();
    env.cleanup().await;
}
