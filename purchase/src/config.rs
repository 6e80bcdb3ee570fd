//! The purchase service's configuration.

use std::net::SocketAddr;

use clap::Parser;
use shared::config::{parse_bind, CommonConfig};

/// fairgate purchase: events and seat maps, pass-gated holds, idempotent checkout.
#[derive(Clone, Debug, Parser)]
#[command(name = "purchase", version)]
pub struct Config {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "FAIRGATE_PURCHASE_BIND", default_value = "127.0.0.1:8083", value_parser = parse_bind)]
    pub bind: SocketAddr,

    /// Where the queue service publishes the public keys that sign passes.
    #[arg(
        long,
        env = "FAIRGATE_JWKS_URL",
        default_value = "http://127.0.0.1:8082/.well-known/jwks.json"
    )]
    pub jwks_url: String,

    /// Bearer token of the organizer API; unset disables that API.
    #[arg(long, env = "FAIRGATE_ORGANIZER_TOKEN", hide_env_values = true)]
    pub organizer_token: Option<String>,

    /// How long a hold keeps seats, in seconds.
    #[arg(long, env = "FAIRGATE_HOLD_TTL_SECS", default_value_t = 300)]
    pub hold_ttl_secs: u64,

    /// How often expired holds are returned to sale, in milliseconds.
    #[arg(long, env = "FAIRGATE_HOLD_SWEEP_MS", default_value_t = 5000)]
    pub hold_sweep_ms: u64,

    /// Latency the sandbox payment provider adds to each call, in milliseconds.
    #[arg(long, env = "FAIRGATE_SANDBOX_LATENCY_MS", default_value_t = 0)]
    pub sandbox_latency_ms: u64,

    /// Share of sandbox charges that fail as if the provider were down (0.0–1.0).
    #[arg(long, env = "FAIRGATE_SANDBOX_FAILURE_RATE", default_value_t = 0.0)]
    pub sandbox_failure_rate: f64,

    #[command(flatten)]
    pub common: CommonConfig,
}
