//! The buffer service's configuration: the shared settings plus its own.

use std::net::SocketAddr;

use clap::Parser;
use shared::config::{parse_bind, CommonConfig, SigningArgs};

/// fairgate buffer: fans join here; the draw orders the presale buffer at sale start.
#[derive(Clone, Debug, Parser)]
#[command(name = "buffer", version)]
pub struct Config {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "FAIRGATE_BUFFER_BIND", default_value = "127.0.0.1:8081", value_parser = parse_bind)]
    pub bind: SocketAddr,

    #[command(flatten)]
    pub signing: SigningArgs,

    /// Bearer token of the organizer API (sale windows); unset disables that API.
    #[arg(long, env = "FAIRGATE_ORGANIZER_TOKEN", hide_env_values = true)]
    pub organizer_token: Option<String>,

    /// How often the scheduler looks for draws to run and queues to restore, in milliseconds.
    #[arg(long, env = "FAIRGATE_DRAW_TICK_MS", default_value_t = 500)]
    pub draw_tick_ms: u64,

    /// Joins allowed per client IP per minute (0 disables the limit).
    #[arg(long, env = "FAIRGATE_JOIN_LIMIT_PER_IP", default_value_t = 600)]
    pub join_limit_per_ip: u32,

    /// Tasks writing joins to Postgres in batches (one transaction per batch each; two measured
    /// best on two cores: more make smaller batches, one leaves the CPU idle while it commits).
    #[arg(long, env = "FAIRGATE_JOIN_WRITERS", default_value_t = 2)]
    pub join_writers: usize,

    /// Joins allowed per fan identity per minute (asserted identities and resumed tickets).
    #[arg(long, env = "FAIRGATE_JOIN_LIMIT_PER_IDENTITY", default_value_t = 60)]
    pub join_limit_per_identity: u32,

    /// Secret shared with the organizer's site to sign identity assertions (HS256, at least 32
    /// characters); unset: only anonymous joins.
    #[arg(long, env = "FAIRGATE_IDENTITY_SECRET", hide_env_values = true)]
    pub identity_secret: Option<String>,

    /// Issuer (`iss`) identity assertions must carry, if set.
    #[arg(long, env = "FAIRGATE_IDENTITY_ISSUER")]
    pub identity_issuer: Option<String>,

    #[command(flatten)]
    pub common: CommonConfig,
}
