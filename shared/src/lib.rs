//! Code every fairgate service shares: typed configuration, the JSON error contract, telemetry,
//! Postgres and Redis set-up, domain newtypes, the Ed25519 pass and ticket tokens, the verifiable
//! draw algorithm and the HTTP scaffolding (ops routes, layers, graceful shutdown).
//!
//! Nothing here knows about one service's features; a piece lands here once two services need it.

pub mod auth;
pub mod batch;
pub mod config;
pub mod db;
pub mod draw;
pub mod error;
pub mod event;
pub mod extract;
pub mod health;
pub mod ids;
pub mod ratelimit;
pub mod receipt;
pub mod redis;
pub mod server;
pub mod stats;
pub mod telemetry;
pub mod token;
pub mod web;

#[cfg(feature = "testing")]
pub mod testing;

pub use error::ApiError;
