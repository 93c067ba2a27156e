//! The HTTP listener: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry;

/// Readiness, written by the worker loop and read by `/readyz`. Atomics
/// because the HTTP server reads it from other tasks without coordination;
/// a momentarily stale read only delays a probe by one period.
#[derive(Debug, Default)]
pub struct Health {
    /// The last SQS receive succeeded (false until the first one does).
    polling: AtomicBool,
    /// A fatal error or a shutdown stopped the worker; never cleared.
    halted: AtomicBool,
    /// The last ledger request failed: the worker calls nobody until a
    /// check succeeds.
    ledger_down: AtomicBool,
}

impl Health {
    pub fn set_polling(&self, ok: bool) {
        self.polling.store(ok, Ordering::Relaxed);
        telemetry::ready(self.is_ready());
    }

    /// Records whether the ledger answers. Returns true when this changed it.
    pub fn set_ledger_up(&self, up: bool) -> bool {
        let was_down = self.ledger_down.swap(!up, Ordering::Relaxed);
        telemetry::ledger_up(up);
        telemetry::ready(self.is_ready());
        was_down == up
    }

    pub fn ledger_up(&self) -> bool {
        !self.ledger_down.load(Ordering::Relaxed)
    }

    pub fn halt(&self) {
        self.halted.store(true, Ordering::Relaxed);
        telemetry::ready(false);
    }

    pub fn is_ready(&self) -> bool {
        self.polling.load(Ordering::Relaxed)
            && !self.halted.load(Ordering::Relaxed)
            && !self.ledger_down.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

/// Binds the listener now (so a bad address fails start-up) and returns the
/// bound address and the future that serves until `shutdown` fires.
pub async fn bind(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { health, metrics });
    let serve = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    };
    Ok((local, serve))
}

async fn metrics_text(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
