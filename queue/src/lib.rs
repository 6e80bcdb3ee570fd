//! The queue service: the waiting room. Fans hold a websocket that shows their place and ETA;
//! one admission controller per event (leader-elected in Redis) moves the serving head at the
//! configured rate without exceeding the cap on active shoppers; an admitted fan gets a signed
//! pass on the websocket or by claiming it over HTTP.
//!
//! Invariants: per update, no Redis call per waiter (each instance learns the queue state from one
//! subscription and computes every waiter's numbers locally); every admission and pass is decided
//! and recorded in Postgres (`admissions`, `passes`: one admission per place, one pass per
//! ticket), whichever instance leads, and Redis only mirrors the outcome; the head never moves
//! back.

pub mod admission;
pub mod autotune;
pub mod config;
pub mod hub;
pub mod leave;
pub mod operator;
pub mod pass;
pub mod positions;
pub mod steer;
pub mod ws;

use std::sync::Arc;

use axum::Router;
use shared::redis::Redis;
use shared::server::{Backends, RunningApp};
use shared::token::{Signer, Verifier};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use config::Config;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub pg: PgPool,
    pub redis: Redis,
    pub signer: Signer,
    pub verifier: Verifier,
    pub hub: hub::Hub,
    pub shutdown: CancellationToken,
    pub operators: shared::auth::NamedTokens,
    /// The organizer may set autotune too.
    pub organizer: shared::auth::RoleToken,
    pub positions: positions::Positions,
}

pub fn app(state: AppState) -> Router {
    let backends = Backends {
        service: "queue",
        pg: state.pg.clone(),
        redis: state.redis.clone(),
    };
    let common = state.config.common.clone();
    let routes = Router::new()
        .merge(ws::router())
        .merge(pass::router())
        .merge(operator::router())
        .merge(leave::router())
        .with_state(state);
    shared::server::finish(routes, backends, &common)
}

pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<RunningApp> {
    let Backends { pg, redis, .. } = Backends::connect("queue", &config.common).await?;
    let signer = config.signing.signer(&config.common.issuer)?;
    let hub = hub::Hub::new(redis.clone(), pg.clone());
    let (positions, position_lookups) =
        positions::Positions::new(redis.clone(), pg.clone(), shutdown.clone());
    let state = AppState {
        positions,
        operators: shared::auth::NamedTokens::parse("operator", config.operator_tokens.as_deref())?,
        organizer: shared::auth::RoleToken::new("organizer", config.organizer_token.as_deref()),
        verifier: signer.verifier(),
        signer,
        hub: hub.clone(),
        config: Arc::new(config),
        pg,
        redis,
        shutdown: shutdown.clone(),
    };
    let listener = shared::server::bind(state.config.bind, state.config.common.reuse_port)?;
    let mut running = RunningApp::start(listener, app(state.clone()), shutdown.clone());
    tracing::info!(addr = %running.addr, "queue service listening");
    running.spawn(
        hub.clone()
            .run_subscriber(state.config.common.clone(), shutdown.clone()),
    );
    running.spawn(position_lookups);
    running.spawn(hub.clone().run_socket_renewal(
        std::time::Duration::from_millis(state.config.socket_renew_ms),
        shutdown.clone(),
    ));
    running.spawn(hub.run_refresher(state.config.refresh_ms, shutdown.clone()));
    running.spawn(admission::run(state, shutdown));
    Ok(running)
}
