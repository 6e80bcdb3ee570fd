//! The buffer service: fans join an event's line here. During presale their joins are buffered
//! (durably, in Postgres) and at `sale_starts_at` one draw shuffles them into queue positions
//! 1..N with a published, verifiable seed; after the draw, joins go to the back in arrival order.
//!
//! Invariants: one place per identity per event (a Postgres constraint); the draw happens exactly
//! once (an advisory lock plus the `draws` row); every place is given by Postgres (the draw's
//! seed and entrants, `draws.tail` for live arrivals) in the transaction that records it, and the
//! Redis queue is only a mirror of those places, counted against Postgres every tick and rebuilt
//! by an idempotent merge that never removes or lowers anything (`mirror`).

pub mod config;
pub mod draw;
pub mod identity;
pub mod ingest;
pub mod join;
pub mod mirror;
pub mod pages;
pub mod window;

use std::sync::Arc;

use axum::Router;
use shared::auth::RoleToken;
use shared::redis::Redis;
use shared::server::{Backends, RunningApp};
use shared::token::{Signer, Verifier};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The service's shared state: cloned per request, so one pointer to [`State`].
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
    pub signer: Signer,
    pub verifier: Verifier,
    pub limits: join::JoinLimits,
    pub draws: draw::DrawCache,
    pub organizer: RoleToken,
    pub identities: Option<identity::IdentityVerifier>,
    pub writer: ingest::JoinWriter,
    pub events: shared::event::EventCache,
}

/// All routes of the service, with the shared layers.
pub fn app(state: AppState) -> Router {
    let backends = Backends {
        service: "buffer",
        pg: state.pg.clone(),
        redis: state.redis.clone(),
    };
    let common = state.config.common.clone();
    let routes = Router::new()
        .merge(join::router())
        .merge(draw::router())
        .merge(window::router())
        .merge(pages::router())
        .with_state(state);
    shared::server::finish(routes, backends, &common)
}

/// Connects to Postgres (migrating it) and Redis and builds the service's state; its join
/// writers stop with `shutdown`.
pub async fn connect(config: Config, shutdown: CancellationToken) -> anyhow::Result<AppState> {
    let Backends { pg, redis, .. } = Backends::connect("buffer", &config.common).await?;
    let signer = config.signing.signer(&config.common.issuer)?;
    let identities = match &config.identity_secret {
        Some(secret) => Some(identity::IdentityVerifier::new(
            secret,
            config.identity_issuer.as_deref(),
        )?),
        None => None,
    };
    Ok(AppState(Arc::new(State {
        identities,
        writer: ingest::JoinWriter::start(
            pg.clone(),
            signer.clone(),
            mirror::Appender::start(redis.clone(), shutdown.clone()),
            config.join_writers,
            shutdown,
        ),
        events: shared::event::EventCache::default(),
        verifier: signer.verifier(),
        signer,
        limits: join::JoinLimits::new(&config),
        draws: draw::DrawCache::default(),
        organizer: RoleToken::new("organizer", config.organizer_token.as_deref()),
        config: Arc::new(config),
        pg,
        redis,
    })))
}

/// Connects, binds the listener and starts the server and the draw scheduler. Port 0 in
/// `config.bind` picks a free port (tests).
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<RunningApp> {
    let state = connect(config, shutdown.clone()).await?;
    let listener = shared::server::bind(state.config.bind, state.config.common.reuse_port)?;
    let mut running = RunningApp::start(listener, app(state.clone()), shutdown.clone());
    tracing::info!(addr = %running.addr, "buffer service listening");
    running.spawn(draw::run_scheduler(state.clone(), shutdown.clone()));
    running.spawn(join::prune_limits(state, shutdown));
    Ok(running)
}
