use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = purchase::Config::parse();
    shared::telemetry::init_tracing(config.common.log_format);
    let shutdown = CancellationToken::new();
    shared::server::cancel_on_signal(shutdown.clone());
    purchase::start(config, shutdown).await?.wait().await
}
