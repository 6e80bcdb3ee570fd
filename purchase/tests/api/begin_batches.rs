//! Group commit of checkout starts (`begin_writer.rs`, migration 0020): fresh checkouts started
//! together are claimed in one transaction, and every other start gets the precise answer
//! `fg_checkout_begin` gives alone — a replay, a reused or running key, someone else's hold, a
//! used pass, a hold being paid for or expired — with nothing left behind by the batch.

use std::time::Duration;

use purchase::begin_writer::{BeginWriter, NewStart, Outcome};
use uuid::Uuid;

fn start(event: i64, jti: Uuid, key: &str, hold_id: Uuid) -> NewStart {
    NewStart {
        event,
        jti,
        key: key.into(),
        hash: vec![1, 2, 3],
        hold_id,
        payment_key: format!("{jti}:{key}"),
        provider: "sandbox",
        identity: format!("site:{jti}"),
        ticket: Uuid::now_v7(),
    }
}

fn code(outcome: &Outcome) -> &str {
    &outcome.as_ref().expect("no database error").code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkouts_started_together_keep_their_own_answers() {
    let sale = crate::Sale::start(20).await;
    let (pg, event, s) = (sale.pg.clone(), sale.event, sale.seats.clone());
    let passes: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    let mut holds = Vec::new();
    for (n, pass) in passes.iter().enumerate() {
        holds.push(crate::fg_hold(&pg, event, &[s[2 * n], s[2 * n + 1]], *pass).await);
    }
    let set = |sql: &'static str, hold: Uuid| {
        let pg = pg.clone();
        async move {
            sqlx::query(sql)
                .bind(hold)
                .execute(&pg)
                .await
                .expect("prepare");
        }
    };
    let request = |jti: Uuid, key: &str, hash: &[u8], state: &str| {
        sqlx::query(
            "INSERT INTO checkout_requests (jti, idempotency_key, request_hash, state,
                                            status_code, response)
             VALUES ($1, $2, $3, $4, CASE WHEN $4 = 'done' THEN 402 END,
                     CASE WHEN $4 = 'done' THEN '{\"error\": \"card_declined\"}'::jsonb END)",
        )
        .bind(jti)
        .bind(key.to_owned())
        .bind(hash.to_vec())
        .bind(state.to_owned())
        .execute(&pg)
    };
    request(passes[1], "k", &[1, 2, 3], "done")
        .await
        .expect("a finished key");
    request(passes[2], "k", &[9, 9, 9], "done")
        .await
        .expect("a key of another body");
    request(passes[3], "k", &[1, 2, 3], "running")
        .await
        .expect("a running key");
    set(
        "UPDATE holds SET status = 'purchased' WHERE id = $1",
        holds[5],
    )
    .await;
    sqlx::query(
        "INSERT INTO orders (id, event_id, jti, identity, hold_id, total_cents, payment_ref)
         VALUES ($1, $2, $3, 'site:used', $4, 5000, 'sb_ch_used')",
    )
    .bind(Uuid::now_v7())
    .bind(event)
    .bind(passes[5])
    .bind(holds[5])
    .execute(&pg)
    .await
    .expect("pass 5 has bought");
    set("UPDATE holds SET status = 'paying' WHERE id = $1", holds[6]).await;
    set(
        "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = $1",
        holds[7],
    )
    .await;

    // Keep the writer busy with a start whose key another transaction is claiming, so the
    // rest queue up for one batch.
    let mut blocker = pg.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO checkout_requests (jti, idempotency_key, request_hash, state)
         VALUES ($1, 'k', '\\x010203', 'running')",
    )
    .bind(passes[9])
    .execute(&mut *blocker)
    .await
    .expect("claim pass 9's key");
    let writer = BeginWriter::start(pg.clone(), 1);
    let first = tokio::spawn({
        let (writer, first) = (writer.clone(), start(event, passes[9], "k", holds[9]));
        async move { writer.submit(first).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let starts = vec![
        start(event, passes[0], "k", holds[0]), // 0: claimed
        start(event, passes[1], "k", holds[1]), // 1: replay
        start(event, passes[2], "k", holds[2]), // 2: key_reused
        start(event, passes[3], "k", holds[3]), // 3: key_running
        start(event, passes[4], "k", holds[0]), // 4: someone else's hold
        start(event, passes[5], "k", holds[5]), // 5: pass_used
        start(event, passes[6], "k", holds[6]), // 6: hold_paying
        start(event, passes[7], "k", holds[7]), // 7: hold_expired
        start(event, passes[8], "k", holds[8]), // 8: claimed
    ];
    let pending = crate::submit_all(&writer, starts.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    blocker.rollback().await.expect("give pass 9's key back");
    let first = first.await.expect("first");
    assert_eq!(code(&first), "claimed", "{first:?}");
    let outcomes = pending.await.expect("starts");

    let expected = [
        "claimed",
        "replay",
        "key_reused",
        "key_running",
        "hold_not_found",
        "pass_used",
        "hold_paying",
        "hold_expired",
        "claimed",
    ];
    for (n, (outcome, expected)) in outcomes.iter().zip(expected).enumerate() {
        assert_eq!(code(outcome), expected, "start {n}: {outcome:?}");
    }
    for n in [0, 8] {
        let o = outcomes[n].as_ref().expect("claimed");
        assert_eq!(o.seat_ids.as_deref(), Some(&[s[2 * n], s[2 * n + 1]][..]));
        assert_eq!(o.total_cents, Some(5000));
    }
    let replay = outcomes[1].as_ref().expect("replay");
    assert_eq!(replay.status_code, Some(402));
    assert_eq!(
        replay.response,
        Some(serde_json::json!({ "error": "card_declined" }))
    );

    // Starts 0 and 8 were claimed in one transaction; the others changed nothing.
    let (transactions, paying, payments, running): (i64, Vec<Uuid>, Vec<String>, Vec<Uuid>) =
        sqlx::query_as(
            "SELECT (SELECT count(DISTINCT xmin::text) FROM checkout_requests
                     WHERE jti = ANY($1)),
                    (SELECT array_agg(id ORDER BY id) FROM holds WHERE status = 'paying'),
                    (SELECT array_agg(idempotency_key ORDER BY idempotency_key) FROM payments
                     WHERE status = 'pending' AND amount_cents = 5000),
                    (SELECT array_agg(jti ORDER BY jti) FROM checkout_requests
                     WHERE state = 'running')",
        )
        .bind(vec![passes[0], passes[8]])
        .fetch_one(&pg)
        .await
        .expect("state");
    assert_eq!(transactions, 1, "one batch");
    let mut want_paying = vec![holds[0], holds[6], holds[8], holds[9]];
    want_paying.sort();
    assert_eq!(paying, want_paying);
    let mut want_payments: Vec<String> = [0, 8, 9]
        .iter()
        .map(|n| format!("{}:k", passes[*n]))
        .collect();
    want_payments.sort();
    assert_eq!(payments, want_payments);
    let mut want_running = vec![passes[0], passes[3], passes[8], passes[9]];
    want_running.sort();
    assert_eq!(running, want_running);

    sale.stop().await;
}
