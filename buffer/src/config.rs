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

    /// How often the scheduler looks for draws to run and queues to restore, in milliseconds.
    #[arg(long, env = "FAIRGATE_DRAW_TICK_MS", default_value_t = 500)]
    pub draw_tick_ms: u64,

    /// Joins allowed per client IP per minute (0 disables the limit).
    #[arg(long, env = "FAIRGATE_JOIN_LIMIT_PER_IP", default_value_t = 600)]
    pub join_limit_per_ip: u32,

    #[command(flatten)]
    pub common: CommonConfig,
}
