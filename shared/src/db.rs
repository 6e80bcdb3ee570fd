//! Postgres pool set-up and migrations. Every statement has a timeout on the server side so a
//! stuck lock cannot hold a request for ever, and the pool has an acquire timeout so an
//! overloaded database turns into a quick 503 rather than a pile-up.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::config::CommonConfig;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

pub async fn connect(config: &CommonConfig) -> anyhow::Result<PgPool> {
    connect_url_with(
        &config.database_url,
        config.db_max_connections,
        &[("plan_cache_mode", &config.db_plan_cache_mode)],
    )
    .await
}

pub async fn connect_url(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    connect_url_with(url, max_connections, &[]).await
}

/// A pool whose sessions also set `settings` (e.g. `synchronous_commit`).
pub async fn connect_url_with(
    url: &str,
    max_connections: u32,
    settings: &[(&str, &str)],
) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse::<PgConnectOptions>()?
        .options([("statement_timeout", "15000"), ("lock_timeout", "5000")])
        .options(settings.iter().copied())
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Applies pending migrations; concurrent callers serialise on sqlx's advisory lock.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Advisory-lock class of "the draw of event N" (the second key is the event id).
const DRAW_LOCK_CLASS: i32 = 0x6667_0001;

/// Takes event `event`'s draw lock until the transaction ends: exclusively for the draw itself,
/// shared for everything that must land wholly before or wholly after it (joins, leaves,
/// window changes). A join committed before the draw is in it; one after is a live arrival.
pub async fn lock_draw(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    event: crate::ids::EventId,
    exclusive: bool,
) -> Result<(), sqlx::Error> {
    let sql = if exclusive {
        "SELECT pg_advisory_xact_lock($1, $2)"
    } else {
        "SELECT pg_advisory_xact_lock_shared($1, $2)"
    };
    // Event ids are identity values far below 2^31; wrap rather than fail beyond that.
    sqlx::query(sql)
        .bind(DRAW_LOCK_CLASS)
        .bind(event.get() as i32)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
