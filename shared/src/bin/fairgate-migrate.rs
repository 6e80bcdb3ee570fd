//! `fairgate-migrate`: applies the migrations in `migrations/` to `DATABASE_URL` and exits.
//! (Every service also applies them at start unless `FAIRGATE_MIGRATE=false`.)

use clap::Parser;

/// Apply fairgate's database migrations.
#[derive(Parser)]
#[command(name = "fairgate-migrate", version)]
struct Args {
    /// Postgres connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/fairgate"
    )]
    database_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fairgate_shared::telemetry::init_tracing(fairgate_shared::config::LogFormat::Human);
    let pool = fairgate_shared::db::connect_url(&args.database_url, 1).await?;
    fairgate_shared::db::migrate(&pool).await?;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await?;
    tracing::info!(applied, "migrations are up to date");
    pool.close().await;
    Ok(())
}
