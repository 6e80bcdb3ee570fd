//! The hold sweeper returns the seats of expired holds to sale, in every event, and leaves live
//! holds alone.

use std::time::{Duration, Instant};

use shared::testing::TestEnv;
use shared::token::{Signer, SigningKey};

use super::{create_event, fg_hold, in_process, seat_ids};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_holds_come_back_in_every_event_and_live_ones_stay() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let app = in_process(&env, &signer, |config| config.hold_sweep_ms = 100).await;
    let http = reqwest::Client::new();
    let url = app.url();
    let (first, second) = (
        create_event(&http, &url).await,
        create_event(&http, &url).await,
    );
    let (first_seats, second_seats) = (seat_ids(&pg, first).await, seat_ids(&pg, second).await);
    let expired = [
        fg_hold(&pg, first, &first_seats[..2], uuid::Uuid::new_v4()).await,
        fg_hold(&pg, second, &second_seats[..1], uuid::Uuid::new_v4()).await,
    ];
    let live = fg_hold(&pg, second, &second_seats[2..4], uuid::Uuid::new_v4()).await;
    sqlx::query(
        "UPDATE seats SET held_until = now() - interval '1 second' WHERE hold_id = ANY($1)",
    )
    .bind(&expired[..])
    .execute(&pg)
    .await
    .expect("expire");

    let returned = |hold: uuid::Uuid| {
        let pg = pg.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM seats WHERE hold_id = $1")
                .bind(hold)
                .fetch_one(&pg)
                .await
                .expect("count")
                == 0
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(returned(expired[0]).await && returned(expired[1]).await) {
        assert!(Instant::now() < deadline, "expired holds were not swept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let statuses: Vec<(i64, String, bool)> = sqlx::query_as(
        "SELECT id, status, held_until IS NULL FROM seats
         WHERE id = ANY($1) ORDER BY id",
    )
    .bind(
        first_seats[..2]
            .iter()
            .chain(&second_seats[..4])
            .copied()
            .collect::<Vec<_>>(),
    )
    .fetch_all(&pg)
    .await
    .expect("seats");
    let expected: Vec<(i64, String, bool)> = [
        (first_seats[0], "available", true),
        (first_seats[1], "available", true),
        (second_seats[0], "available", true),
        (second_seats[1], "available", true),
        (second_seats[2], "held", false),
        (second_seats[3], "held", false),
    ]
    .into_iter()
    .map(|(id, status, none)| (id, status.to_owned(), none))
    .collect();
    assert_eq!(statuses, expected);
    assert!(!returned(live).await, "the live hold keeps its seats");

    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}
