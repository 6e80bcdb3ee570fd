//! HTTP scaffolding every service uses: the operational routes (`/healthz`, `/readyz`,
//! `/metrics`), the shared layers (tracing, metrics, timeout, body and concurrency limits, panic
//! → JSON 500, JSON 404/405, `Connection: close` when a request's body is left unread), and
//! serving until one shutdown signal fires.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::config::CommonConfig;
use crate::redis::Redis;
use crate::telemetry;
use crate::ApiError;

/// What readiness depends on.
#[derive(Clone)]
pub struct Backends {
    pub service: &'static str,
    pub pg: PgPool,
    pub redis: Redis,
}

impl Backends {
    /// Connects to Postgres (applying migrations unless disabled) and Redis.
    pub async fn connect(service: &'static str, config: &CommonConfig) -> anyhow::Result<Self> {
        let pg = crate::db::connect(config).await?;
        if config.migrate {
            crate::db::migrate(&pg).await?;
        }
        let redis = Redis::connect(config).await?;
        Ok(Backends { service, pg, redis })
    }
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn ops_router(backends: Backends) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/assets/fairgate.css", get(stylesheet))
        .route("/assets/charts.js", get(charts))
        .with_state(Arc::new(backends))
}

async fn healthz(State(b): State<Arc<Backends>>) -> impl IntoResponse {
    axum::Json(json!({ "status": "ok", "service": b.service }))
}

async fn readyz(State(b): State<Arc<Backends>>) -> Response {
    let pg = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&b.pg)
        .await
        .map(|_| ())
        .map_err(|e| format!("postgres unreachable: {e}"));
    let redis = b.redis.check_ready().await;
    let body = json!({
        "service": b.service,
        "postgres": pg.as_ref().err().map_or("ok", String::as_str),
        "redis": redis.as_ref().err().map_or("ok", String::as_str),
    });
    if pg.is_ok() && redis.is_ok() {
        (StatusCode::OK, axum::Json(body)).into_response()
    } else {
        tracing::warn!(%body, "not ready");
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    }
}

/// The style every page shares, served by each service so no page needs another origin for it.
async fn stylesheet() -> impl IntoResponse {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("../assets/fairgate.css"),
    )
}

/// The small SVG chart helpers the dashboards share.
async fn charts() -> impl IntoResponse {
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/javascript; charset=utf-8",
            ),
            (axum::http::header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("../assets/charts.js"),
    )
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        telemetry::metrics_handle().render(),
    )
}

/// Wraps a service's routes with the ops routes and the shared layers.
pub fn finish(app: Router, backends: Backends, config: &CommonConfig) -> Router {
    // Make sure the recorder exists before the first request is counted.
    let _ = telemetry::metrics_handle();
    app.merge(ops_router(backends))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(telemetry::track_http))
        .layer(DefaultBodyLimit::max(config.body_limit_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            config.request_timeout(),
        ))
        .layer(GlobalConcurrencyLimitLayer::new(
            config.max_concurrent_requests,
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(config.web.cors())
        .layer(axum::middleware::from_fn(close_if_body_unread))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
}

/// Says `Connection: close` on the answer to a request whose body was not read to its end (a
/// refusal before the body: no pass, no token, rate-limited, too large). The server does not
/// keep such a connection (the rest of the body would be read as the next request), and a
/// client told nothing would send its next request — perhaps a checkout — on a connection
/// being closed under it, with no way to know whether it arrived.
async fn close_if_body_unread(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::header;
    let headers = request.headers();
    let declared = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|length| length > 0);
    if !declared {
        return next.run(request).await;
    }
    let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (parts, body) = request.into_parts();
    let body = axum::body::Body::new(ReadToEnd {
        inner: body,
        read: read.clone(),
    });
    let mut response = next
        .run(axum::extract::Request::from_parts(parts, body))
        .await;
    if !read.load(std::sync::atomic::Ordering::Acquire) {
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// A request body that records when it has been read to its end.
struct ReadToEnd {
    inner: axum::body::Body,
    read: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for ReadToEnd {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.read.store(true, std::sync::atomic::Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The request span: method and path only. Query strings are left out because the waiting
/// room's websocket URL carries the fan's ticket, and secrets never go to the logs.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
    )
}

async fn not_found() -> ApiError {
    ApiError::NotFound("not_found", "no such endpoint".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed(
        "method_not_allowed",
        "this endpoint does not accept that method".into(),
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("handler panicked").into_response()
}

/// Serves `app` on `listener` until `shutdown` fires, then drains in-flight requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received");
        token.cancel();
    });
}

/// A started service: its address, the token that stops it, and its tasks.
/// Listens on `addr`; with `reuse_port`, other processes may listen on the same port too.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(4096)
}

pub struct RunningApp {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl RunningApp {
    /// Spawns the HTTP server on `listener`; add background tasks with [`RunningApp::spawn`].
    pub fn start(listener: TcpListener, app: Router, shutdown: CancellationToken) -> Self {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut tasks = tokio::task::JoinSet::new();
        let token = shutdown.clone();
        tasks.spawn(async move {
            serve(listener, app, token).await?;
            Ok(())
        });
        RunningApp {
            addr,
            shutdown,
            tasks,
        }
    }

    pub fn spawn<F>(&mut self, task: F)
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Runs until shutdown; the first task to fail stops the others.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut result = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            let outcome = joined.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(e) = outcome {
                tracing::error!(error = %e, "task failed; shutting down");
                self.shutdown.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }

    /// Signals shutdown and waits for every task to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}
