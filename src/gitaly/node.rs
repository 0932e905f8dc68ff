//! One lazily connected gRPC channel per configured storage node, shared by
//! every job, and the per-call request decoration (auth, correlation id,
//! deadline).

use crate::config::{Config, Node, NodeAddress, Secret};
use crate::gitaly::auth;
use crate::gitaly::error::CallError;
use crate::gitaly::health::Health;
use crate::gitaly::metadata::CORRELATION_ID;
use crate::gitaly::tls::TrustRoots;
use crate::proto::gitaly::object_pool_service_client::ObjectPoolServiceClient;
use crate::proto::gitaly::ref_service_client::RefServiceClient;
use crate::proto::gitaly::repository_service_client::RepositoryServiceClient;
use crate::proto::health::HealthCheckRequest;
use crate::proto::health::health_check_response::ServingStatus;
use crate::proto::health::health_client::HealthClient;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Why a node's channel could not be set up (before any network traffic).
#[derive(Debug, thiserror::Error)]
#[error("storage {storage:?} at {address}: {reason}")]
pub struct ChannelError {
    pub storage: String,
    pub address: String,
    pub reason: String,
}

/// Per-call settings that come from the job.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    pub correlation_id: Option<String>,
    /// When the job's time is up; `None` means no timeout (Praefect's default).
    pub deadline: Option<Instant>,
    /// The job timeout the deadline came from, for error messages.
    pub timeout: Option<Duration>,
}

impl CallContext {
    pub fn new(correlation_id: Option<String>, timeout: Option<Duration>) -> Self {
        CallContext {
            correlation_id,
            deadline: timeout.map(|t| Instant::now() + t),
            timeout,
        }
    }
}

/// A storage node: its identity, its token and a shared channel.
pub struct NodeClient {
    pub virtual_storage: String,
    pub storage: String,
    /// The address as configured (`tcp://…`, `unix:…`), sent to targets in
    /// `gitaly-servers` so they can dial this node themselves.
    pub address: String,
    token: Secret,
    channel: Channel,
    /// The authorization value for the current second: a v2 token carries
    /// only whole seconds, so one HMAC per second serves every call.
    bearer: std::sync::Mutex<(u64, Option<MetadataValue<tonic::metadata::Ascii>>)>,
    /// The latest health check's verdict (see `health::watch_health`).
    health: watch::Sender<Health>,
}

impl std::fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeClient")
            .field("virtual_storage", &self.virtual_storage)
            .field("storage", &self.storage)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The endpoint of `address`; `roots` gives the certificate authorities of
/// a `tls://` address, and is called only for one.
fn endpoint_for(
    address: &NodeAddress,
    roots: impl FnOnce() -> Result<TrustRoots, String>,
) -> Result<Endpoint, String> {
    let uri = match address {
        NodeAddress::Tcp { host, port } | NodeAddress::Tls { host, port } => {
            let scheme = if matches!(address, NodeAddress::Tls { .. }) {
                "https"
            } else {
                "http"
            };
            // Without a port the dial fails in the connector below; the URI
            // only needs to parse.
            let port = port.unwrap_or(0);
            if host.contains(':') && !host.starts_with('[') {
                format!("{scheme}://[{host}]:{port}")
            } else {
                format!("{scheme}://{host}:{port}")
            }
        }
        // The URI is unused for unix sockets; the connector below dials the path.
        NodeAddress::Unix { .. } => "http://unix.socket".to_owned(),
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| e.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if matches!(address, NodeAddress::Tls { .. }) {
        // The host name of the URI is the one checked against the
        // certificate (an IP address against its IP address names).
        let tls = ClientTlsConfig::new()
            .trust_anchors(roots()?.anchors())
            .timeout(CONNECT_TIMEOUT);
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    Ok(endpoint)
}

impl NodeClient {
    /// Builds the node's channel without connecting; the first call dials.
    /// A `tls://` node's certificate is verified against the system's
    /// certificate authorities and those of this process's `SSL_CERT_FILE`
    /// and `SSL_CERT_DIR` ([`TrustRoots::from_env`]).
    pub fn new(virtual_storage: &str, node: &Node) -> Result<NodeClient, ChannelError> {
        Self::build(virtual_storage, node, || {
            TrustRoots::from_env().map_err(|e| e.to_string())
        })
    }

    /// Like [`NodeClient::new`], trusting `roots` for a `tls://` node.
    pub fn with_trust_roots(
        virtual_storage: &str,
        node: &Node,
        roots: &TrustRoots,
    ) -> Result<NodeClient, ChannelError> {
        Self::build(virtual_storage, node, || Ok(roots.clone()))
    }

    fn build(
        virtual_storage: &str,
        node: &Node,
        roots: impl FnOnce() -> Result<TrustRoots, String>,
    ) -> Result<NodeClient, ChannelError> {
        let err = |reason: String| ChannelError {
            storage: node.storage.clone(),
            address: node.address.to_string(),
            reason,
        };
        let endpoint = endpoint_for(&node.address, roots).map_err(err)?;
        let channel = match &node.address {
            NodeAddress::Unix { path } => {
                let path: PathBuf = path.clone();
                endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
            }
            address if address.lacks_port() => {
                let why = format!(
                    "{address} has no port: nothing is dialed (Praefect's dial fails too); \
                     write {address}:PORT"
                );
                endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                    let why = why.clone();
                    async move {
                        Err::<TokioIo<tokio::net::TcpStream>, _>(std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            why,
                        ))
                    }
                }))
            }
            _ => endpoint.connect_lazy(),
        };
        Ok(NodeClient {
            virtual_storage: virtual_storage.to_owned(),
            storage: node.storage.clone(),
            address: node.address.to_string(),
            token: node.token.clone(),
            channel,
            bearer: std::sync::Mutex::new((0, None)),
            health: watch::Sender::new(Health::Unknown),
        })
    }

    /// The latest health verdict; `Unknown` until a watcher has checked.
    pub fn health(&self) -> Health {
        *self.health.borrow()
    }

    /// Follows the health verdicts.
    pub fn subscribe_health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    /// Records a verdict; whether it changed.
    pub fn set_health(&self, health: Health) -> bool {
        self.health.send_replace(health) != health
    }

    /// The node's auth token, for the `gitaly-servers` metadata of a
    /// replication that reads from this node.
    pub fn token(&self) -> &Secret {
        &self.token
    }

    pub fn repository_service(&self) -> RepositoryServiceClient<Channel> {
        RepositoryServiceClient::new(self.channel.clone())
    }

    pub fn object_pool_service(&self) -> ObjectPoolServiceClient<Channel> {
        ObjectPoolServiceClient::new(self.channel.clone())
    }

    pub fn ref_service(&self) -> RefServiceClient<Channel> {
        RefServiceClient::new(self.channel.clone())
    }

    /// Wraps a message with a fresh v2 token, the correlation id and the
    /// remaining job time as the gRPC deadline.
    pub fn request<T>(&self, message: T, ctx: &CallContext) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let md = request.metadata_mut();
        if let Some(v) = self.authorization() {
            md.insert("authorization", v);
        }
        if let Some(id) = &ctx.correlation_id
            && let Ok(v) = MetadataValue::try_from(id.as_str())
        {
            md.insert(CORRELATION_ID, v);
        }
        if let Some(deadline) = ctx.deadline {
            request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        request
    }

    /// `None` without a token: Praefect runs such a node unauthenticated.
    fn authorization(&self) -> Option<MetadataValue<tonic::metadata::Ascii>> {
        if self.token.is_empty() {
            return None;
        }
        let now = std::time::SystemTime::now();
        let second = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut cached = self.bearer.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != second || cached.1.is_none() {
            let token = auth::v2_token(self.token.expose(), now);
            cached.1 = MetadataValue::try_from(format!("Bearer {token}")).ok();
            cached.0 = second;
        }
        cached.1.clone()
    }

    /// Awaits one call, bounded by the job's deadline, and classifies failure.
    pub async fn call<T, F>(
        &self,
        method: &'static str,
        ctx: &CallContext,
        call: F,
    ) -> Result<T, CallError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let result = match ctx.deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, call).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(CallError::timed_out(
                        method,
                        &self.storage,
                        ctx.timeout.unwrap_or_default(),
                    ));
                }
            },
            None => call.await,
        };
        result.map(tonic::Response::into_inner).map_err(|status| {
            // tonic enforces the same deadline (grpc-timeout) and may report
            // it first, as a bare CANCELLED: name it as the job timeout.
            match ctx.deadline {
                Some(deadline) if Instant::now() >= deadline => {
                    CallError::timed_out(method, &self.storage, ctx.timeout.unwrap_or_default())
                }
                _ => CallError::from_status(method, &self.storage, &status),
            }
        })
    }

    /// `CalculateChecksum` of the repository at `relative_path` on this
    /// node: Gitaly's XOR of its refs' digests.
    pub async fn checksum(
        &self,
        relative_path: &str,
        ctx: &CallContext,
    ) -> Result<String, CallError> {
        let mut client = self.repository_service();
        let request = self.request(
            crate::proto::gitaly::CalculateChecksumRequest {
                repository: Some(crate::proto::gitaly::Repository {
                    storage_name: self.storage.clone(),
                    relative_path: relative_path.to_owned(),
                    ..Default::default()
                }),
            },
            ctx,
        );
        self.call("CalculateChecksum", ctx, client.calculate_checksum(request))
            .await
            .map(|r| r.checksum)
    }

    /// `grpc.health.v1.Health/Check` for the whole server: Ok when SERVING.
    pub async fn check_health(&self, timeout: Duration) -> Result<(), CallError> {
        let ctx = CallContext::new(None, Some(timeout));
        let mut client = HealthClient::new(self.channel.clone());
        let request = self.request(
            HealthCheckRequest {
                service: String::new(),
            },
            &ctx,
        );
        let response = self
            .call("grpc.health.v1.Health/Check", &ctx, client.check(request))
            .await?;
        if response.status == ServingStatus::Serving as i32 {
            Ok(())
        } else {
            Err(CallError::from_status(
                "grpc.health.v1.Health/Check",
                &self.storage,
                &tonic::Status::unavailable(format!("health status {}", response.status)),
            ))
        }
    }
}

/// Every configured node, by (virtual storage, storage).
#[derive(Debug, Default, Clone)]
pub struct NodeSet {
    nodes: HashMap<(String, String), Arc<NodeClient>>,
}

impl NodeSet {
    pub fn from_config(config: &Config) -> Result<NodeSet, ChannelError> {
        let mut nodes = HashMap::new();
        for (vs, node) in config.targets() {
            let client = NodeClient::new(&vs.name, node)?;
            nodes.insert((vs.name.clone(), node.storage.clone()), Arc::new(client));
        }
        Ok(NodeSet { nodes })
    }

    pub fn get(&self, virtual_storage: &str, storage: &str) -> Option<&Arc<NodeClient>> {
        // Allocation per lookup is negligible next to a gRPC call.
        self.nodes
            .get(&(virtual_storage.to_owned(), storage.to_owned()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<NodeClient>> {
        self.nodes.values()
    }
}
