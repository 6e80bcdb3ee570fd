//! Configuration every service shares, read from flags or `FAIRGATE_*` environment variables
//! with defaults that work on a developer machine. Each service flattens `CommonConfig` into its
//! own clap struct, so `--help` documents everything.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Debug, Args)]
pub struct CommonConfig {
    /// Postgres connection URL (the source of truth).
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/fairgate"
    )]
    pub database_url: String,

    /// Maximum Postgres connections in this process's pool.
    #[arg(long, env = "FAIRGATE_DB_MAX_CONNECTIONS", default_value_t = 20)]
    pub db_max_connections: u32,

    /// Postgres `plan_cache_mode` of this process's sessions. Every statement fairgate sends is
    /// a keyed lookup or write whose best plan does not depend on its parameters, so the
    /// default plans each prepared statement once instead of on every call (Postgres otherwise
    /// keeps re-planning statements with array parameters: ~15% of its CPU during a join burst).
    #[arg(long, env = "FAIRGATE_DB_PLAN_CACHE_MODE", default_value = "force_generic_plan",
          value_parser = ["auto", "force_generic_plan", "force_custom_plan"])]
    pub db_plan_cache_mode: String,

    /// Bind with SO_REUSEPORT, so several instances share one port and the kernel spreads
    /// connections over them (past one process's open-files limit, e.g. 200,000 websockets).
    #[arg(long, env = "FAIRGATE_REUSE_PORT", default_value_t = false)]
    pub reuse_port: bool,

    /// Apply pending migrations from `migrations/` at start.
    #[arg(long, env = "FAIRGATE_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,

    /// Redis connection URL (the live queue).
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Prefix of every Redis key and channel, so several deployments or test runs share a Redis.
    #[arg(long, env = "FAIRGATE_REDIS_PREFIX", default_value = "fg")]
    pub redis_prefix: String,

    /// Redis connections in this process's pool.
    #[arg(long, env = "FAIRGATE_REDIS_POOL_SIZE", default_value_t = 4)]
    pub redis_pool_size: usize,

    /// Timeout of one Redis command, in milliseconds (a command still unanswered fails).
    #[arg(
        long,
        env = "FAIRGATE_REDIS_COMMAND_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub redis_command_timeout_ms: u64,

    /// Log format: human (default) or json.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,

    /// Largest request body accepted, in bytes (larger → 413).
    #[arg(long, env = "FAIRGATE_BODY_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub body_limit_bytes: usize,

    /// Time limit of one HTTP request, in milliseconds (websockets are not limited by it).
    #[arg(long, env = "FAIRGATE_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,

    /// Most HTTP requests served at once by this process; more wait.
    #[arg(long, env = "FAIRGATE_MAX_CONCURRENT_REQUESTS", default_value_t = 4096)]
    pub max_concurrent_requests: usize,

    /// Issuer name put in and required of every token this deployment signs.
    #[arg(long, env = "FAIRGATE_ISSUER", default_value = "fairgate")]
    pub issuer: String,

    #[command(flatten)]
    pub web: crate::web::WebConfig,
}

impl CommonConfig {
    pub fn redis_command_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_command_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// The Ed25519 key that signs tickets, receipts and passes (buffer and queue).
#[derive(Clone, Debug, Args)]
pub struct SigningArgs {
    /// Ed25519 signing key: 64 hex digits (the 32-byte seed).
    #[arg(long, env = "FAIRGATE_SIGNING_KEY", hide_env_values = true)]
    pub signing_key: Option<String>,

    /// File holding the signing key as 64 hex digits (used when FAIRGATE_SIGNING_KEY is unset).
    #[arg(long, env = "FAIRGATE_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<std::path::PathBuf>,

    /// Retired signing keys (64 hex digits each, comma-separated): no longer used to sign, still
    /// published and trusted, so tickets and passes in flight survive a key rotation.
    #[arg(
        long,
        env = "FAIRGATE_PREVIOUS_SIGNING_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub previous_signing_keys: Vec<String>,
}

impl SigningArgs {
    pub fn signer(&self, issuer: &str) -> anyhow::Result<crate::token::Signer> {
        let key = crate::token::SigningKey::load(
            self.signing_key.as_deref(),
            self.signing_key_file.as_deref(),
        )?;
        let retired = self
            .previous_signing_keys
            .iter()
            .filter(|k| !k.trim().is_empty())
            .map(|k| crate::token::SigningKey::from_hex(k))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(crate::token::Signer::new(key, issuer).retiring(retired))
    }
}

/// The address a service listens on, with its own default port.
pub fn parse_bind(raw: &str) -> Result<SocketAddr, String> {
    raw.parse()
        .map_err(|e| format!("not a socket address ({raw}): {e}"))
}
