//! Prometheus metrics over HTTP for the orchestrator and the agents: `GET /metrics` in
//! the OpenMetrics text format, encoded by `prometheus-client` from a registry each
//! server fills with its own metrics.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use prometheus_client::registry::Registry;

/// Work to do before each scrape (refreshing gauges that are read, not counted).
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

struct Scrape {
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
}

async fn metrics(State(s): State<Arc<Scrape>>) -> impl IntoResponse {
    if let Some(r) = &s.refresh {
        r().await;
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, [(CONTENT_TYPE, "text/plain")], e.to_string());
    }
    (axum::http::StatusCode::OK, [(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], out)
}

/// Serves `registry` at `/metrics` on `listener` until `shutdown` completes; `refresh`
/// runs before each scrape.
pub fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .with_state(Arc::new(Scrape { registry, refresh }));
    tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await })
}

/// Binds `addr` and serves `registry` there (see [`serve`]); returns the bound address.
pub async fn listen(
    addr: &str,
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen for metrics on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    serve(listener, registry, refresh, shutdown);
    tracing::info!("serving Prometheus metrics on http://{local}/metrics");
    Ok(local)
}
