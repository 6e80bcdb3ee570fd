//! Group commit of holds (`hold_writer.rs`, migration 0019): holds taken together keep their own
//! answers — each refusal is the one `fg_hold` gives alone and writes nothing — a batch naming a
//! pass or a seat twice is split so the later request sees the earlier one, and a pass's second
//! hold replaces its first.

use std::time::Duration;

use chrono::Utc;
use purchase::hold_writer::{HoldWriter, NewHold, Outcome};
use uuid::Uuid;

fn request(event: i64, jti: Uuid, seats: &[i64]) -> NewHold {
    NewHold {
        event,
        jti,
        seat_ids: seats.to_vec(),
        hold_id: Uuid::now_v7(),
        expires_at: Utc::now() + chrono::Duration::minutes(5),
    }
}

fn summary(outcome: &Outcome) -> Summary {
    let o = outcome.as_ref().expect("no database error");
    (
        o.code.clone(),
        o.seat_ids.clone().unwrap_or_default(),
        o.freed.clone().unwrap_or_default(),
        o.total_cents,
        o.detail.clone().unwrap_or_default(),
    )
}

type Summary = (String, Vec<i64>, Vec<i64>, Option<i64>, String);

/// Each answer is the expected one, in order.
fn assert_answers(outcomes: &[Outcome], expected: Vec<Summary>) {
    assert_eq!(outcomes.len(), expected.len());
    for (n, (outcome, expected)) in outcomes.iter().zip(expected).enumerate() {
        assert_eq!(summary(outcome), expected, "request {n}");
    }
}

/// How many transactions wrote these holds' rows.
async fn transactions(pg: &sqlx::PgPool, holds: Vec<Uuid>) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM holds WHERE id = ANY($1)")
        .bind(holds)
        .fetch_one(pg)
        .await
        .expect("transactions")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_taken_together_keep_their_own_answers() {
    let sale = crate::Sale::start(40).await;
    let (pg, event, s) = (sale.pg.clone(), sale.event, sale.seats.clone());
    let other_event = crate::create_event_with(&sale.http, &sale.app.url(), 1, 2).await;
    let elsewhere: i64 = sqlx::query_scalar("SELECT min(id) FROM seats WHERE event_id = $1")
        .bind(other_event)
        .fetch_one(&pg)
        .await
        .expect("seat of another event");
    let general: i64 = sqlx::query_scalar(
        "INSERT INTO seats (event_id, section, row_label, number, price_cents, admission)
         VALUES ($1, 'Floor', 'GA', 1, 1000, 'general') RETURNING id",
    )
    .bind(event)
    .fetch_one(&pg)
    .await
    .expect("a general-admission place");

    // A pass that has bought (seat 30), a pass with an active hold (seat 31), a seat someone
    // holds (32), a seat another transaction has locked (33), and a pass whose first hold (35)
    // is kept waiting so that everything after it queues up for one batch.
    let used = Uuid::new_v4();
    let used_hold = crate::fg_hold(&pg, event, &[s[30]], used).await;
    let (ordered,): (String,) = sqlx::query_as(
        "SELECT code FROM fg_commit_order($1, $2, 'site:used', $3, $4, 2500, 'sb_ch_used',
                                          $5, now(), $6, 'k', '{}'::jsonb, 'pk')",
    )
    .bind(event)
    .bind(used)
    .bind(used_hold)
    .bind(vec![s[30]])
    .bind(Uuid::now_v7())
    .bind(vec![format!("FG-USED-{}", Uuid::new_v4().simple())])
    .fetch_one(&pg)
    .await
    .expect("order");
    assert_eq!(ordered, "ordered");
    let active = Uuid::new_v4();
    crate::fg_hold(&pg, event, &[s[31]], active).await;
    crate::fg_hold(&pg, event, &[s[32]], Uuid::new_v4()).await;
    let waiting = Uuid::new_v4();
    let waiting_hold = crate::fg_hold(&pg, event, &[s[35]], waiting).await;

    let mut seat_locker = pg.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM seats WHERE id = $1 FOR UPDATE")
        .bind(s[33])
        .execute(&mut *seat_locker)
        .await
        .expect("lock a seat");
    let blocker = lock_hold(&pg, waiting_hold).await;

    let writer = HoldWriter::start(pg.clone(), 1);
    let first = tokio::spawn({
        let (writer, first) = (writer.clone(), request(event, waiting, &[s[36]]));
        async move { writer.submit(first).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let twice = Uuid::new_v4();
    let requests = vec![
        request(event, Uuid::new_v4(), &[s[0], s[1]]), // 0: held
        request(event, used, &[s[2]]),                 // 1: pass_used
        request(event, active, &[s[3]]),               // 2: replaces its hold (fg_hold)
        request(event, Uuid::new_v4(), &[s[4], s[32]]), // 3: 32 is held
        request(event, Uuid::new_v4(), &[s[5], s[33]]), // 4: 33 is locked
        request(event, Uuid::new_v4(), &[s[6], 999_999_999]), // 5: no such seat
        request(event, Uuid::new_v4(), &[s[7], elsewhere]), // 6: another event's seat
        request(event, Uuid::new_v4(), &[s[8], s[9]]), // 7: held
        request(event, twice, &[s[10]]),               // 8: held
        request(event, twice, &[s[11]]),               // 9: after 8, replaces it
        request(event, Uuid::new_v4(), &[s[0]]),       // 10: after 0, which took it
        request(event, Uuid::new_v4(), &[s[12], general]), // 11: a general place
    ];
    let ids: Vec<Uuid> = requests.iter().map(|r| r.hold_id).collect();
    let pending = crate::submit_all(&writer, requests.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    blocker.rollback().await.expect("release the locks");
    let first = first.await.expect("first");
    assert_eq!(summary(&first).0, "held", "{first:?}");
    let outcomes = pending.await.expect("holds");
    seat_locker.rollback().await.expect("release the seat");

    let list = |ids: &[i64]| {
        ids.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let held = |seats: &[i64], freed: &[i64], total: i64| {
        (
            "held".to_owned(),
            seats.to_vec(),
            freed.to_vec(),
            Some(total),
            String::new(),
        )
    };
    let refused = |code: &str, detail: String| (code.to_owned(), vec![], vec![], None, detail);
    let expected = vec![
        held(&[s[0], s[1]], &[], 5000),
        refused("pass_used", String::new()),
        held(&[s[3]], &[s[31]], 2500),
        refused("seat_unavailable", list(&[s[32]])),
        refused("seat_unavailable", list(&[s[33]])),
        refused("seat_not_found", "999999999".into()),
        refused("seat_not_found", list(&[elsewhere])),
        held(&[s[8], s[9]], &[], 5000),
        held(&[s[10]], &[], 2500),
        held(&[s[11]], &[s[10]], 2500),
        refused("seat_unavailable", list(&[s[0]])),
        refused("general_by_quantity", String::new()),
    ];
    assert_answers(&outcomes, expected);

    // Requests 0 and 7 were taken in one transaction (8 too, but 9 has since released it);
    // nothing of a refusal was written.
    assert_eq!(
        transactions(&pg, vec![ids[0], ids[7]]).await,
        1,
        "one batch"
    );
    let written: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM holds WHERE id = ANY($1) ORDER BY id")
            .bind(&ids)
            .fetch_all(&pg)
            .await
            .expect("holds");
    let mut taken = vec![ids[0], ids[2], ids[7], ids[8], ids[9]];
    taken.sort();
    assert_eq!(written, taken);
    let statuses: Vec<(i64, String, Option<Uuid>)> =
        sqlx::query_as("SELECT id, status, hold_id FROM seats WHERE id = ANY($1) ORDER BY id")
            .bind(vec![
                s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[10], s[11], s[12], s[31], general,
            ])
            .fetch_all(&pg)
            .await
            .expect("seats");
    let status = |seat: i64| {
        statuses
            .iter()
            .find(|(id, ..)| *id == seat)
            .map(|(_, status, hold)| (status.as_str(), *hold))
            .expect("seat")
    };
    assert_eq!(status(s[0]), ("held", Some(ids[0])));
    assert_eq!(status(s[1]), ("held", Some(ids[0])));
    assert_eq!(status(s[3]), ("held", Some(ids[2])));
    assert_eq!(status(s[11]), ("held", Some(ids[9])));
    for seat in [s[2], s[4], s[5], s[6], s[7], s[10], s[12], s[31], general] {
        assert_eq!(status(seat), ("available", None), "seat {seat}");
    }
    let replaced: Vec<String> =
        sqlx::query_scalar("SELECT status FROM holds WHERE jti = ANY($1) ORDER BY id")
            .bind(vec![active, twice])
            .fetch_all(&pg)
            .await
            .expect("replaced holds");
    assert_eq!(replaced, ["released", "active", "released", "active"]);

    sale.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crowd_of_holds_in_batches_never_gives_a_seat_twice() {
    let sale = crate::Sale::start(20).await;
    let (pg, event, seats) = (sale.pg.clone(), sale.event, sale.seats.clone());

    // 600 holds of two adjacent seats out of 20, from 300 passes (each asks twice), through
    // two writers at once.
    let writer = HoldWriter::start(pg.clone(), 2);
    let passes: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
    let requests: Vec<NewHold> = (0..600)
        .map(|n| {
            let first = (n * 7) % (seats.len() - 1);
            request(event, passes[n % 300], &[seats[first], seats[first + 1]])
        })
        .collect();
    let outcomes = crate::submit_all(&writer, requests.clone())
        .await
        .expect("holds");
    let mut held = 0;
    for (r, outcome) in requests.iter().zip(&outcomes) {
        let code = summary(outcome).0;
        assert!(
            ["held", "seat_unavailable"].contains(&code.as_str()),
            "{code} for {r:?}"
        );
        held += usize::from(code == "held");
    }
    assert!(held > 0, "the first holds of free seats were taken");

    // Every held seat belongs to an active hold that names it, no active hold has lost a seat,
    // and no pass has two active holds.
    let (orphans, broken, doubled, holds): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT
           (SELECT count(*) FROM seats s WHERE s.event_id = $1 AND s.status = 'held'
              AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.id = s.hold_id
                                AND h.status = 'active' AND s.id = ANY(h.seat_ids))),
           (SELECT count(*) FROM holds h, unnest(h.seat_ids) AS seat
              WHERE h.event_id = $1 AND h.status = 'active'
                AND NOT EXISTS (SELECT 1 FROM seats s WHERE s.id = seat
                                  AND s.hold_id = h.id AND s.status = 'held')),
           (SELECT count(*) FROM (SELECT jti FROM holds WHERE event_id = $1
                                  AND status = 'active' GROUP BY jti HAVING count(*) > 1) d),
           (SELECT count(*) FROM holds WHERE event_id = $1)",
    )
    .bind(event)
    .fetch_one(&pg)
    .await
    .expect("invariants");
    assert_eq!((orphans, broken, doubled), (0, 0, 0));
    assert_eq!(
        holds as usize, held,
        "a hold row for every hold answered held"
    );

    sale.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_by_quantity_taken_together_keep_their_own_answers() {
    use purchase::hold_writer::{GeneralHoldWriter, NewGeneralHold};
    let sale = crate::Sale::start(2).await;
    let (pg, event, seated) = (sale.pg.clone(), sale.event, sale.seats.clone());
    let g = floor_places(&pg, event, 8).await;
    let request = |jti: Uuid, ticket_type: &str, quantity: i32| NewGeneralHold {
        event,
        jti,
        ticket_type: ticket_type.into(),
        quantity,
        hold_id: Uuid::now_v7(),
        expires_at: Utc::now() + chrono::Duration::minutes(5),
    };

    // A pass whose seated hold is kept locked, so that its hold by quantity waits and every
    // request after it queues up for one batch.
    let waiting = Uuid::new_v4();
    let waiting_hold = crate::fg_hold(&pg, event, &[seated[0]], waiting).await;
    let blocker = lock_hold(&pg, waiting_hold).await;
    let writer = GeneralHoldWriter::start(pg.clone(), 1);
    let first = tokio::spawn({
        let (writer, first) = (writer.clone(), request(waiting, "Floor", 1));
        async move { writer.submit(first).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (a, b, d) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let requests = vec![
        request(a, "Floor", 2),              // 0: held
        request(b, "Floor", 2),              // 1: held
        request(a, "Floor", 3),              // 2: after 0, replaces it
        request(Uuid::new_v4(), "Nope", 1),  // 3: no such ticket type
        request(d, "Floor", 2),              // 4: held
        request(Uuid::new_v4(), "Floor", 3), // 5: one place left
    ];
    let ids: Vec<Uuid> = requests.iter().map(|r| r.hold_id).collect();
    let pending = crate::submit_all(&writer, requests);
    tokio::time::sleep(Duration::from_millis(200)).await;
    blocker.rollback().await.expect("release the lock");
    let first = first.await.expect("first");
    assert_eq!(
        summary(&first),
        (
            "held".into(),
            vec![g[0]],
            vec![seated[0]],
            Some(1000),
            String::new()
        )
    );
    let outcomes = pending.await.expect("holds");
    let held = |seats: &[i64], freed: &[i64]| {
        (
            "held".to_owned(),
            seats.to_vec(),
            freed.to_vec(),
            Some(1000 * seats.len() as i64),
            String::new(),
        )
    };
    let expected = vec![
        held(&[g[1], g[2]], &[]),
        held(&[g[3], g[4]], &[]),
        held(&[g[1], g[2], g[7]], &[g[1], g[2]]),
        (
            "ticket_type_not_found".into(),
            vec![],
            vec![],
            None,
            "0".into(),
        ),
        held(&[g[5], g[6]], &[]),
        ("not_enough_places".into(), vec![], vec![], None, "1".into()),
    ];
    assert_answers(&outcomes, expected);

    // 1 and 4 were taken in one transaction; every place is in the hold that got it, and each
    // pass has one active hold.
    assert_eq!(
        transactions(&pg, vec![ids[1], ids[4]]).await,
        1,
        "one batch"
    );
    let places: Vec<(i64, Option<Uuid>)> =
        sqlx::query_as("SELECT id, hold_id FROM seats WHERE event_id = $1 ORDER BY id")
            .bind(event)
            .fetch_all(&pg)
            .await
            .expect("places");
    let holder = |seat: i64| {
        places
            .iter()
            .find(|(id, _)| *id == seat)
            .map(|(_, hold)| *hold)
            .expect("seat")
    };
    assert_eq!(holder(seated[0]), None, "replaced by the hold by quantity");
    for (seats, hold) in [
        (&[g[1], g[2], g[7]][..], ids[2]),
        (&[g[3], g[4]], ids[1]),
        (&[g[5], g[6]], ids[4]),
    ] {
        for seat in seats {
            assert_eq!(holder(*seat), Some(hold), "place {seat}");
        }
    }
    let active: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT jti, count(*) FROM holds WHERE event_id = $1 AND status = 'active'
         GROUP BY jti ORDER BY jti",
    )
    .bind(event)
    .fetch_all(&pg)
    .await
    .expect("active holds");
    assert_eq!(active.len(), 4, "{active:?}");
    assert!(active.iter().all(|(_, n)| *n == 1), "{active:?}");

    sale.stop().await;
}

/// A hold by quantity takes available places first (0027) and, when they are too few, also
/// places whose hold expired but has not been swept yet; it never takes a live hold's places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_by_quantity_take_expired_places_when_available_ones_run_out() {
    let sale = crate::Sale::start(1).await;
    let (pg, event) = (sale.pg.clone(), sale.event);
    let g = floor_places(&pg, event, 5).await;
    let mut tx = pg.begin().await.expect("begin");
    let first = hold_by_quantity(&mut tx, event, 2).await.expect("first");
    let live = hold_by_quantity(&mut tx, event, 2).await.expect("live");
    assert_eq!(first, ("held".into(), Some(vec![g[0], g[1]]), None));
    assert_eq!(live, ("held".into(), Some(vec![g[2], g[3]]), None));
    // The first hold expires; in this transaction the sweeper cannot return its places first.
    sqlx::query("UPDATE seats SET held_until = now() - interval '1 second' WHERE id = ANY($1)")
        .bind(&g[..2])
        .execute(&mut *tx)
        .await
        .expect("expire");
    let third = hold_by_quantity(&mut tx, event, 3).await.expect("third");
    assert_eq!(
        third,
        ("held".into(), Some(vec![g[0], g[1], g[4]]), None),
        "one available place and the two expired ones"
    );
    let fourth = hold_by_quantity(&mut tx, event, 1).await.expect("fourth");
    assert_eq!(fourth, ("not_enough_places".into(), None, Some("0".into())));
    tx.commit().await.expect("commit");
    let holders: Vec<Option<Uuid>> =
        sqlx::query_scalar("SELECT hold_id FROM seats WHERE id = ANY($1) ORDER BY id")
            .bind(&g[2..4])
            .fetch_all(&pg)
            .await
            .expect("live places");
    assert!(
        holders.iter().all(|h| h.is_some()) && holders[0] == holders[1],
        "the live hold keeps its places: {holders:?}"
    );
    sale.stop().await;
}

/// `fg_hold` by quantity on the ticket type "Floor", for a new pass, in `tx`.
async fn hold_by_quantity(
    tx: &mut sqlx::PgConnection,
    event: i64,
    quantity: i32,
) -> Result<(String, Option<Vec<i64>>, Option<String>), sqlx::Error> {
    sqlx::query_as(
        "SELECT code, seat_ids, detail
         FROM fg_hold($1, $2, '{}', 'Floor', $3, $4, now() + interval '5 minutes')",
    )
    .bind(event)
    .bind(Uuid::new_v4())
    .bind(quantity)
    .bind(Uuid::now_v7())
    .fetch_one(tx)
    .await
}

/// `count` general-admission places of the ticket type "Floor" at 10.00 in `event`, by id.
async fn floor_places(pg: &sqlx::PgPool, event: i64, count: i32) -> Vec<i64> {
    sqlx::query_scalar(
        "INSERT INTO seats (event_id, section, row_label, number, price_cents, admission)
         SELECT $1, 'Floor', 'GA', n, 1000, 'general' FROM generate_series(1, $2) n
         RETURNING id",
    )
    .bind(event)
    .bind(count)
    .fetch_all(pg)
    .await
    .expect("general-admission places")
}

/// A transaction holding `hold`'s row lock, so that a writer taking a hold for its pass waits
/// (and the requests after it queue up for one batch) until it is rolled back.
async fn lock_hold(pg: &sqlx::PgPool, hold: Uuid) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut blocker = pg.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM holds WHERE id = $1 FOR UPDATE")
        .bind(hold)
        .execute(&mut *blocker)
        .await
        .expect("lock a hold");
    blocker
}
