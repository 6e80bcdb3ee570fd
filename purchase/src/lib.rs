//! The purchase service: organizers create events with seat maps; pass holders see seats, hold
//! up to their limit for a few minutes and check out; payments go through a provider trait.
//!
//! Invariants: no seat sold twice (row locks in id order, and the `tickets_one_valid_per_seat`
//! index as the last line); a pass buys once (`orders_one_per_pass`, in the transaction that
//! commits the seats); a checkout retried with the same `Idempotency-Key` never charges twice;
//! no row lock is held across the call to the payment provider.

pub mod begin_writer;
pub mod catalog;
pub mod checkout;
pub mod config;
pub mod health;
pub mod hold_writer;
pub mod live;
pub mod order_writer;
pub mod orders;
pub mod organizer;
pub mod pages;
pub mod passgate;
pub mod payments;
pub mod reconcile;
pub mod refunds;
pub mod reports;
pub mod rounds;
pub mod seats;
pub mod stripe;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use shared::auth::RoleToken;
use shared::redis::Redis;
use shared::server::{Backends, RunningApp};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The service's shared state: cloned per request (axum's `State`), so one pointer to
/// [`State`]. Cloned field by field it was ~4% of the service's CPU in bench-checkout (`perf`:
/// a dozen reference counts, a token map and the live hub's cancellation token per request).
#[derive(Clone)]
pub struct AppState(Arc<State>);

impl std::ops::Deref for AppState {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

pub struct State {
    pub config: Arc<Config>,
    pub pg: PgPool,
    pub redis: Redis,
    pub passes: passgate::PassKeys,
    pub payments: Arc<dyn payments::PaymentProvider>,
    pub organizer: RoleToken,
    pub support: shared::auth::NamedTokens,
    pub live: live::LiveHub,
    pub orders: orders::OrderKeys,
    /// Commits the orders of charged checkouts in batches (group commit).
    pub order_writer: order_writer::OrderWriter,
    /// Takes holds of named seats in batches (group commit).
    pub hold_writer: hold_writer::HoldWriter,
    /// Takes holds of general-admission places by quantity in batches (group commit).
    pub general_hold_writer: hold_writer::GeneralHoldWriter,
    /// Starts checkouts in batches (group commit).
    pub begin_writer: begin_writer::BeginWriter,
    /// Seat-map reads running at once (a 100,000-seat map is a long read: a crowd of them must
    /// not take every pooled connection from holds and checkouts).
    pub seat_map_reads: Arc<tokio::sync::Semaphore>,
    /// Latency and errors of pass holders' requests per event, published for autotune.
    pub health: health::HealthBook,
}

pub fn app(state: AppState) -> Router {
    let backends = Backends {
        service: "purchase",
        pg: state.pg.clone(),
        redis: state.redis.clone(),
    };
    let common = state.config.common.clone();
    let routes = Router::new()
        .merge(catalog::router())
        .merge(organizer::router())
        .merge(seats::router())
        .merge(checkout::router())
        .merge(refunds::router())
        .merge(reports::router())
        .merge(live::router())
        .merge(orders::router())
        .merge(stripe::router())
        .merge(pages::router())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            health::track,
        ))
        .with_state(state);
    shared::server::finish(routes, backends, &common)
}

/// The configured payment provider.
async fn provider_of(config: &Config) -> anyhow::Result<Arc<dyn payments::PaymentProvider>> {
    Ok(match config.payment_provider.as_str() {
        "stripe" => Arc::new(stripe::Stripe::new(
            &config.stripe_base_url,
            config.stripe_secret_key.as_deref().unwrap_or_default(),
            &config.currency,
        )?),
        _ => Arc::new(payments::Sandbox::new(
            // The sandbox stands in for an outside provider: its own records need not wait for
            // our WAL flush (a Postgres crash could lose the last few; a process crash cannot).
            shared::db::connect_url_with(
                &config.common.database_url,
                config.common.db_max_connections.div_ceil(4).max(2),
                &[("synchronous_commit", "off")],
            )
            .await?,
            Duration::from_millis(config.sandbox_latency_ms),
            config.sandbox_failure_rate,
        )),
    })
}

pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<RunningApp> {
    Ok(start_with(config, shutdown, None).await?.0)
}

/// [`start`] with a payment provider of the caller's (tests: one whose answers and timing they
/// control) instead of the configured one; also returns the state, so a test can run the
/// reconciler and the hold sweeper itself.
pub async fn start_with(
    config: Config,
    shutdown: CancellationToken,
    provider: Option<Arc<dyn payments::PaymentProvider>>,
) -> anyhow::Result<(RunningApp, AppState)> {
    let Backends { pg, redis, .. } = Backends::connect("purchase", &config.common).await?;
    if config.reconcile_grace_secs.saturating_mul(1_000) <= config.common.request_timeout_ms {
        tracing::warn!(
            "FAIRGATE_RECONCILE_GRACE_SECS is not longer than FAIRGATE_REQUEST_TIMEOUT_MS: a \
             checkout still running could be judged by reconciliation"
        );
    }
    let payments = match provider {
        Some(provider) => provider,
        None => provider_of(&config).await?,
    };
    let passes = passgate::PassKeys::new(config.jwks_url.clone(), config.common.issuer.clone())?;
    if let Err(e) = passes.refresh().await {
        tracing::warn!(error = %e, "pass keys not fetched yet; will retry on first pass");
    }
    let (live, seat_changes) = live::LiveHub::new(config.live_max_streams, shutdown.clone());
    let state = AppState(Arc::new(State {
        organizer: RoleToken::new("organizer", config.organizer_token.as_deref()),
        support: shared::auth::NamedTokens::parse("support", config.support_tokens.as_deref())?,
        payments,
        orders: orders::OrderKeys::new(config.order_secret.as_deref())?,
        live,
        health: health::HealthBook::default(),
        seat_map_reads: Arc::new(tokio::sync::Semaphore::new(config.seat_map_reads.max(1))),
        order_writer: order_writer::OrderWriter::start(pg.clone(), config.order_writers),
        hold_writer: hold_writer::HoldWriter::start(pg.clone(), config.hold_writers),
        general_hold_writer: hold_writer::GeneralHoldWriter::start(pg.clone(), config.hold_writers),
        begin_writer: begin_writer::BeginWriter::start(pg.clone(), config.checkout_writers),
        config: Arc::new(config),
        pg,
        redis,
        passes,
    }));
    let listener = shared::server::bind(state.config.bind, state.config.common.reuse_port)?;
    let mut running = RunningApp::start(listener, app(state.clone()), shutdown.clone());
    tracing::info!(addr = %running.addr, "purchase service listening");
    running.spawn(reconcile::run(state.clone(), shutdown.clone()));
    running.spawn(live::run_seat_subscriber(
        state.clone(),
        state.config.common.clone(),
        shutdown.clone(),
    ));
    running.spawn(live::run_seat_publisher(
        state.clone(),
        seat_changes,
        shutdown.clone(),
    ));
    running.spawn(live::run_outbox_relay(
        state.clone(),
        std::time::Duration::from_millis(state.config.outbox_relay_ms.max(10)),
        shutdown.clone(),
    ));
    running.spawn(passgate::run_refresher(
        state.passes.clone(),
        Duration::from_secs(state.config.jwks_refresh_secs.max(1)),
        shutdown.clone(),
    ));
    running.spawn(health::run_reporter(
        state.clone(),
        Duration::from_millis(state.config.health_report_ms.max(100)),
        shutdown.clone(),
    ));
    running.spawn(seats::run_hold_sweeper(state.clone(), shutdown));
    Ok((running, state))
}
