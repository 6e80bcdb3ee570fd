//! The purchase path's functions plan without sequential scans and without JIT (migration
//! 0025), whatever later migrations do to them: a `CREATE OR REPLACE FUNCTION` drops the
//! settings unless it repeats them.

use shared::testing::TestEnv;

/// Every function a hold or a checkout runs.
const PURCHASE_PATH: [&str; 7] = [
    "fg_hold",
    "fg_holds",
    "fg_holds_general",
    "fg_checkout_begin",
    "fg_checkout_begins",
    "fg_commit_order",
    "fg_commit_orders",
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
    .bind(&PURCHASE_PATH[..])
    .fetch_all(&pg)
    .await
    .expect("functions");
    assert_eq!(
        found.len(),
        PURCHASE_PATH.len(),
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
