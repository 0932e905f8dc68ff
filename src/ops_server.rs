//! The operations endpoint: `/metrics` (Prometheus text), `/health/live` and
//! `/health/ready`, on `prometheus_listen_addr`.

use crate::dependencies::DependencyState;
use crate::error_chain::display_error_chain;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Whether the service is ready to work: its streams and consumers are set
/// up (cleared on shutdown) and NATS and Postgres both answer.
#[derive(Clone, Default)]
pub struct Readiness {
    set_up: Arc<AtomicBool>,
    dependencies: DependencyState,
}

impl Readiness {
    pub fn new(dependencies: DependencyState) -> Self {
        Readiness {
            set_up: Arc::default(),
            dependencies,
        }
    }
    /// Whether setup is done (and shutdown has not begun).
    pub fn set(&self, ready: bool) {
        self.set_up.store(ready, Ordering::SeqCst);
    }
    /// What the readiness also depends on.
    pub fn dependencies(&self) -> &DependencyState {
        &self.dependencies
    }
    pub fn get(&self) -> bool {
        self.set_up.load(Ordering::SeqCst) && self.dependencies.all_up()
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Binds the listener; serving starts with [`serve`]. Split so a bind error is
/// reported before anything else starts.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Takes over a listener bound elsewhere (to port 0, say).
pub fn adopt(listener: std::net::TcpListener) -> std::io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = display_error_chain(&e), "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                let readiness = readiness.clone();
                async move {
                    let text = "text/plain; charset=utf-8";
                    Ok::<_, Infallible>(match req.uri().path() {
                        "/metrics" => respond(
                            StatusCode::OK,
                            "text/plain; version=0.0.4; charset=utf-8",
                            handle.render(),
                        ),
                        "/health/live" => respond(StatusCode::OK, text, "ok\n".into()),
                        "/health/ready" if readiness.get() => {
                            respond(StatusCode::OK, text, "ready\n".into())
                        }
                        "/health/ready" => {
                            respond(StatusCode::SERVICE_UNAVAILABLE, text, "not ready\n".into())
                        }
                        _ => respond(StatusCode::NOT_FOUND, text, "not found\n".into()),
                    })
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Drains the recorder's histogram samples into their buckets every few
/// seconds until `shutdown`. Without it, samples pile up in memory whether or
/// not anything scrapes (the exporter serves no HTTP of its own here).
pub async fn upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}
