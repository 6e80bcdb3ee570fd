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

/// Prometheus metrics, with the backends' health read at scrape time: the Postgres pool's
/// connections (in use, idle, the most allowed) and whether Redis answers a ping.
async fn metrics(State(b): State<Arc<Backends>>) -> impl IntoResponse {
    let max = b.pg.options().get_max_connections();
    let idle = b.pg.num_idle() as u32;
    metrics::gauge!("fairgate_pg_pool_connections", "state" => "in_use")
        .set(f64::from(b.pg.size().saturating_sub(idle)));
    metrics::gauge!("fairgate_pg_pool_connections", "state" => "idle").set(f64::from(idle));
    metrics::gauge!("fairgate_pg_pool_max").set(f64::from(max));
    let ping: Result<String, _> = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        fred::interfaces::ClientLike::ping(b.redis.client(), None),
    )
    .await
    .unwrap_or_else(|_| {
        Err(fred::error::Error::new(
            fred::error::ErrorKind::Timeout,
            "ping",
        ))
    });
    metrics::gauge!("fairgate_redis_up").set(if ping.is_ok() { 1.0 } else { 0.0 });
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
        .layer(axum::middleware::from_fn_with_state(
            config.request_timeout(),
            time_limit,
        ))
        .layer(GlobalConcurrencyLimitLayer::new(
            config.max_concurrent_requests,
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(config.web.cors())
        .layer(axum::middleware::from_fn(close_if_body_unread))
        .layer(axum::middleware::from_fn(refuse_nul_in_query))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                // One access line per request at INFO, in its span (method, path, request id);
                // `RUST_LOG=tower_http=warn` silences them.
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO),
                ),
        )
        .layer(axum::middleware::from_fn(request_id))
}

/// The header carrying a request's id across services.
pub const REQUEST_ID: &str = "x-request-id";

/// Gives every request an id, logged with each of its lines and answered in `X-Request-Id`:
/// the caller's own (1–64 of `A-Z a-z 0-9 . _ -`), so one id follows a fan from the buffer
/// through the queue to the purchase, or a new one.
async fn request_id(mut request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::HeaderValue;
    let given = request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| valid_request_id(v.as_bytes()))
        .cloned();
    let id = given.unwrap_or_else(|| {
        HeaderValue::from_str(&uuid::Uuid::new_v4().simple().to_string())
            .expect("hex is a valid header value")
    });
    request.headers_mut().insert(REQUEST_ID, id.clone());
    let mut response = next.run(request).await;
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

fn valid_request_id(id: &[u8]) -> bool {
    (1..=64).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Refuses a query string carrying a NUL character (`%00`) on every route, including those that
/// read no query: 400 `bad_query`, as the routes that parse their query answer.
async fn refuse_nul_in_query(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.uri().query().is_some_and(|q| q.contains("%00")) {
        return ApiError::BadRequest(
            "bad_query",
            "the query must not contain the NUL character (%00)".into(),
        )
        .into_response();
    }
    next.run(request).await
}

/// Answers a request that outlives the request timeout with a JSON 503 (`request_timeout`,
/// `Retry-After: 1`). Work that must finish whatever the client sees (a checkout's charge and
/// order) runs in a task of its own and stores its answer under the request's key.
async fn time_limit(
    State(limit): State<std::time::Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("http_requests_timed_out_total").increment(1);
            ApiError::Unavailable(
                "request_timeout",
                format!(
                    "no answer within {} ms; the outcome is not known yet: retry (a checkout \
                     with the same Idempotency-Key gets its stored answer)",
                    limit.as_millis()
                ),
            )
            .into_response()
        }
    }
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
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %id,
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
