//! The purchase path's functions and the outbox reads plan without sequential scans and
//! without JIT (migrations 0025, 0026), whatever later migrations do to them: a `CREATE OR
//! REPLACE FUNCTION` drops the settings unless it repeats them.

use shared::testing::TestEnv;

/// Every function a hold or a checkout runs, and the outbox reads.
const KEYED: [&str; 10] = [
    "fg_hold",
    "fg_lock_passes",
    "fg_holds",
    "fg_holds_general",
    "fg_checkout_begin",
    "fg_checkout_begins",
    "fg_commit_order",
    "fg_commit_orders",
    "fg_outbox_after",
    "fg_outbox_of_fan",
];

#[tokio::test]
async fn purchase_functions_plan_without_scans() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let found: Vec<(String, Option<Vec<String>>)> = sqlx::query_as(
        "SELECT p.proname::TEXT, p.proconfig FROM pg_proc p
         JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = current_schema() AND p.proname = ANY($1)
         ORDER BY 1",
    )
    .bind(&KEYED[..])
    .fetch_all(&pg)
    .await
    .expect("functions");
    assert_eq!(
        found.len(),
        KEYED.len(),
        "every function exists once: {found:?}"
    );
    for (name, config) in found {
        let config = config.unwrap_or_default();
        for setting in ["enable_seqscan=off", "jit=off"] {
            assert!(
                config.iter().any(|c| c == setting),
                "{name} lost `{setting}` (has {config:?})"
            );
        }
    }
    pg.close().await;
    env.cleanup().await;
}
