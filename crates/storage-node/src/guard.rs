//! The layer in front of every service: checks Gitaly's v2 token and injects
//! the configured faults, by gRPC path, before a handler sees the call.
//! `grpc.health.v1.Health` passes untouched, as in Gitaly.

use crate::faults::Faults;
use gitaly_replicator::Secret;
use gitaly_wire::auth::{self, AuthError};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// What every non-health call must pass.
#[derive(Debug)]
pub struct Guard {
    /// Gitaly's rule: an empty token turns authentication off.
    pub token: Secret,
    pub faults: Faults,
}

impl Guard {
    async fn check(&self, path: &str, authorization: Option<&str>) -> Result<(), Status> {
        if path.starts_with(HEALTH_PREFIX) {
            return Ok(());
        }
        if !self.token.is_empty() {
            auth::verify(authorization, self.token.expose(), SystemTime::now()).map_err(
                |e| match e {
                    AuthError::WrongVersion => Status::permission_denied(e.to_string()),
                    _ => Status::unauthenticated(e.to_string()),
                },
            )?;
        }
        self.faults.apply(path).await
    }
}

/// Installs a [`Guard`] in front of the routes.
#[derive(Debug, Clone)]
pub struct GuardLayer {
    guard: Arc<Guard>,
}

impl GuardLayer {
    pub fn new(guard: Guard) -> Self {
        GuardLayer {
            guard: Arc::new(guard),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded {
            inner,
            guard: self.guard.clone(),
        }
    }
}

/// The routes behind the guard.
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: S,
    guard: Arc<Guard>,
}

impl<S> Service<http::Request<Body>> for Guarded<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone is not ready; keep the ready one for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = self.guard.clone();
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            let authorization = request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match guard.check(&path, authorization.as_deref()).await {
                Ok(()) => inner.call(request).await,
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}
