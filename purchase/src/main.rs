use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc: a hold and a checkout allocate per request (JSON, SQL arguments, hyper buffers),
/// and glibc's allocator was about a seventh of the service's CPU in bench-checkout (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = purchase::Config::parse();
    shared::telemetry::init_tracing(config.common.log_format);
    let shutdown = CancellationToken::new();
    shared::server::cancel_on_signal(shutdown.clone());
    purchase::start(config, shutdown).await?.wait().await
}
