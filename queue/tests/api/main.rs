//! The queue service's admission steps against a real Redis, driven exactly as the controller
//! drives them: a lease holder admits; a paused old leader whose lease passed to another
//! instance admits nobody; a replayed tick admits nobody twice; the cap and fans who left hold.

use fred::prelude::*;
use queue::admission::{admit, lead, Admission};
use shared::config::CommonConfig;
use shared::ids::EventId;
use shared::redis::Redis;
use shared::testing::TestEnv;

async fn redis(common: &CommonConfig) -> Redis {
    Redis::connect(common).await.expect("redis")
}

#[tokio::test]
async fn only_the_lease_holder_admits_and_a_replayed_tick_admits_nobody_twice() {
    let env = TestEnv::new().await;
    let redis = redis(&env.common_config()).await;
    let event = EventId::new(7).expect("id");
    let keys = redis.keys(event);
    let client = redis.client();
    let _: () = client
        .set(keys.drawn(), 1, None, None, false)
        .await
        .expect("set");
    let _: () = client
        .set(keys.tail(), 20, None, None, false)
        .await
        .expect("set");
    let minute = 60_000;

    assert!(lead(&redis, event, "a", 10_000).await.expect("lead"));
    assert!(
        !lead(&redis, event, "b", 10_000).await.expect("lead"),
        "one leader at a time"
    );
    let first = admit(&redis, event, "a", 3, 100, "a:1", minute)
        .await
        .expect("admit");
    assert_eq!(
        first,
        Admission::Admitted {
            admitted: 3,
            head: 3,
            tail: 20,
            active: 3
        }
    );
    // fred replays commands in flight after a reconnect: the same tick must not admit again.
    let replay = admit(&redis, event, "a", 3, 100, "a:1", minute)
        .await
        .expect("admit");
    assert_eq!(
        replay,
        Admission::Admitted {
            admitted: 0,
            head: 3,
            tail: 20,
            active: 3
        }
    );

    // "a" stalls past its lease; "b" takes over. When "a" wakes up it admits nobody.
    let _: () = client
        .pexpire(keys.leader(), 1, None)
        .await
        .expect("expire");
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(lead(&redis, event, "b", 10_000).await.expect("lead"));
    let stale = admit(&redis, event, "a", 5, 100, "a:2", minute)
        .await
        .expect("admit");
    assert_eq!(stale, Admission::NotLeader);
    let head: i64 = client.get(keys.head()).await.expect("head");
    assert_eq!(head, 3, "the paused old leader admitted nobody");

    // The new leader admits under the cap, skipping a fan who left.
    let _: i64 = client.sadd(keys.left(), 5).await.expect("sadd");
    let capped = admit(&redis, event, "b", 10, 6, "b:1", minute)
        .await
        .expect("admit");
    assert_eq!(
        capped,
        Admission::Admitted {
            admitted: 3,
            head: 7,
            tail: 20,
            active: 6
        },
        "positions 4, 6 and 7 admitted; 5 left; the cap of 6 reached"
    );
    let slots: Vec<String> = client
        .zrange(keys.slots(), 0, -1, None, false, None, false)
        .await
        .expect("slots");
    let mut slots = slots;
    slots.sort();
    assert_eq!(slots, ["p:1", "p:2", "p:3", "p:4", "p:6", "p:7"]);

    // Admissions unclaimed past the claim window lapse and free their slots.
    let _: () = client
        .set(keys.tail(), 30, None, None, false)
        .await
        .expect("set");
    let _: i64 = client.del(keys.slots()).await.expect("del");
    let lapsing = admit(&redis, event, "b", 2, 2, "b:2", 1)
        .await
        .expect("admit");
    assert_eq!(
        lapsing,
        Admission::Admitted {
            admitted: 2,
            head: 9,
            tail: 30,
            active: 2
        }
    );
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let after = admit(&redis, event, "b", 2, 2, "b:3", minute)
        .await
        .expect("admit");
    assert_eq!(
        after,
        Admission::Admitted {
            admitted: 2,
            head: 11,
            tail: 30,
            active: 2
        },
        "the lapsed slots went back to the line"
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
    let (positions, task) = queue::positions::Positions::new(redis.clone(), shutdown.clone());
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
