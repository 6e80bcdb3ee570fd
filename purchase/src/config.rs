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

    /// How often the pass keys are fetched again, in seconds: a key the queue stops publishing
    /// is refused by every purchase instance within this time.
    #[arg(long, env = "FAIRGATE_JWKS_REFRESH_SECS", default_value_t = 60)]
    pub jwks_refresh_secs: u64,

    /// Bearer token of the organizer API; unset disables that API.
    #[arg(long, env = "FAIRGATE_ORGANIZER_TOKEN", hide_env_values = true)]
    pub organizer_token: Option<String>,

    /// Support API tokens as `name:token` pairs, comma-separated (16+ characters each); the
    /// name is recorded on refunds. The organizer token is accepted there too.
    #[arg(long, env = "FAIRGATE_SUPPORT_TOKENS", hide_env_values = true)]
    pub support_tokens: Option<String>,

    /// Secret (32+ characters) that derives each order's manage token, the same on every
    /// instance; unset: a random one per process (tokens stop working at restart).
    #[arg(long, env = "FAIRGATE_ORDER_SECRET", hide_env_values = true)]
    pub order_secret: Option<String>,

    /// How long a hold keeps seats, in seconds.
    #[arg(long, env = "FAIRGATE_HOLD_TTL_SECS", default_value_t = 300)]
    pub hold_ttl_secs: u64,

    /// How often expired holds are returned to sale, in milliseconds.
    #[arg(long, env = "FAIRGATE_HOLD_SWEEP_MS", default_value_t = 5000)]
    pub hold_sweep_ms: u64,

    /// Payment provider: `sandbox` (built in, test cards) or `stripe` (Stripe's API).
    #[arg(long, env = "FAIRGATE_PAYMENT_PROVIDER", default_value = "sandbox",
          value_parser = ["sandbox", "stripe"])]
    pub payment_provider: String,

    /// Stripe secret API key (`sk_…`), for the stripe provider.
    #[arg(long, env = "FAIRGATE_STRIPE_SECRET_KEY", hide_env_values = true)]
    pub stripe_secret_key: Option<String>,

    /// Stripe API base URL (a local fake in tests).
    #[arg(
        long,
        env = "FAIRGATE_STRIPE_BASE_URL",
        default_value = "https://api.stripe.com"
    )]
    pub stripe_base_url: String,

    /// Signing secret of the Stripe webhook endpoint (`whsec_…`); unset: webhooks refused.
    #[arg(long, env = "FAIRGATE_STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    pub stripe_webhook_secret: Option<String>,

    /// Currency of charges (ISO 4217, lower case for Stripe).
    #[arg(long, env = "FAIRGATE_CURRENCY", default_value = "eur")]
    pub currency: String,

    /// Latency the sandbox payment provider adds to each call, in milliseconds.
    #[arg(long, env = "FAIRGATE_SANDBOX_LATENCY_MS", default_value_t = 0)]
    pub sandbox_latency_ms: u64,

    /// Share of sandbox charges that fail as if the provider were down (0.0–1.0).
    #[arg(long, env = "FAIRGATE_SANDBOX_FAILURE_RATE", default_value_t = 0.0)]
    pub sandbox_failure_rate: f64,

    /// How often interrupted checkouts (charged or not, without an order) are reconciled, in ms.
    #[arg(long, env = "FAIRGATE_RECONCILE_MS", default_value_t = 10_000)]
    pub reconcile_ms: u64,

    /// A payment still unsettled this many seconds after it began is reconciled (longer than
    /// any live checkout can take).
    #[arg(long, env = "FAIRGATE_RECONCILE_GRACE_SECS", default_value_t = 120)]
    pub reconcile_grace_secs: u64,

    /// Live streams (`/live`, server-sent events) one instance serves at once; more get 429.
    #[arg(long, env = "FAIRGATE_LIVE_MAX_STREAMS", default_value_t = 10_000)]
    pub live_max_streams: usize,

    /// Seat-map reads one instance runs at once; more wait their turn. Keeps most of the
    /// Postgres pool for holds and checkouts when a crowd reads a large map.
    #[arg(long, env = "FAIRGATE_SEAT_MAP_READS", default_value_t = 4)]
    pub seat_map_reads: usize,

    /// Tasks committing the orders of charged checkouts; each commits every order waiting at
    /// once, in one transaction (group commit). One writer per step makes the largest batches;
    /// on two cores it beat two by 16% (bench-checkout, BENCHMARKS.md). More writers help only
    /// where Postgres has cores to spare.
    #[arg(long, env = "FAIRGATE_ORDER_WRITERS", default_value_t = 1)]
    pub order_writers: usize,

    /// Writer tasks taking holds of named seats: each takes the holds that arrived together
    /// at once, in one transaction (group commit). As many again take holds by quantity.
    #[arg(long, env = "FAIRGATE_HOLD_WRITERS", default_value_t = 1)]
    pub hold_writers: usize,

    /// Writer tasks starting checkouts (claiming the key and the hold, recording the pending
    /// payment): each starts every checkout waiting at once, in one transaction (group commit).
    #[arg(long, env = "FAIRGATE_CHECKOUT_WRITERS", default_value_t = 1)]
    pub checkout_writers: usize,

    /// How often this instance publishes its health per event to Redis, for autotune.
    #[arg(long, env = "FAIRGATE_HEALTH_REPORT_MS", default_value_t = 1000)]
    pub health_report_ms: u64,

    /// How often the outbox relay looks for new notices to push to fans, in milliseconds.
    #[arg(long, env = "FAIRGATE_OUTBOX_RELAY_MS", default_value_t = 250)]
    pub outbox_relay_ms: u64,

    /// Test fault: abort the process right after a successful charge, before the order.
    #[arg(
        long,
        env = "FAIRGATE_FAULT_CRASH_AFTER_CHARGE",
        hide = true,
        default_value_t = false
    )]
    pub fault_crash_after_charge: bool,

    #[command(flatten)]
    pub common: CommonConfig,
}
