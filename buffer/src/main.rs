use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc: the join path allocates per request, and glibc's allocator was a seventh of its CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = buffer::Config::parse();
    shared::telemetry::init_tracing(config.common.log_format);
    let shutdown = CancellationToken::new();
    shared::server::cancel_on_signal(shutdown.clone());
    buffer::start(config, shutdown).await?.wait().await
}
