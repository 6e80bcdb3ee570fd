//! The sandbox provider's books (`payments.rs`): charges asked for together are recorded in one
//! statement, and a key charges once however many times, and however concurrently, it is used.

use std::collections::HashMap;
use std::time::Duration;

use purchase::payments::{ChargeOutcome, PaymentProvider, Sandbox, TOKEN_DECLINED, TOKEN_OK};
use shared::testing::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sandbox_charges_a_key_once_also_when_it_is_asked_together() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let sandbox = Sandbox::new(pg.clone(), Duration::ZERO, 0.0);

    // 150 keys, each asked three times at once (the card differs: the first decides).
    let asked = futures::future::join_all((0..450).map(|n| {
        let sandbox = &sandbox;
        async move {
            let key = format!("key-{}", n % 150);
            let token = if n % 2 == 0 { TOKEN_OK } else { TOKEN_DECLINED };
            let outcome = sandbox.charge(&key, 1000 + n as i64 % 150, token).await;
            (key, outcome.expect("the sandbox answers"))
        }
    }))
    .await;
    let mut by_key: HashMap<String, ChargeOutcome> = HashMap::new();
    for (key, outcome) in asked {
        let first = by_key.entry(key.clone()).or_insert_with(|| outcome.clone());
        assert_eq!(*first, outcome, "every use of {key} gets the same answer");
    }
    let (rows, keys, amounts_wrong): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT idempotency_key),
                count(*) FILTER (WHERE amount_cents <> 1000 + substr(idempotency_key, 5)::int)
         FROM sandbox_charges",
    )
    .fetch_one(&pg)
    .await
    .expect("ledger");
    assert_eq!((rows, keys, amounts_wrong), (150, 150, 0));
    for (key, outcome) in &by_key {
        assert_eq!(
            sandbox.lookup(key).await.expect("lookup").as_ref(),
            Some(outcome),
            "{key} reads back as answered"
        );
    }

    pg.close().await;
    env.cleanup().await;
}
