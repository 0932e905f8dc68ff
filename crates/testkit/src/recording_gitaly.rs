//! A real tonic server speaking Gitaly's protocol that records every request
//! and answers as told (success, a gRPC status, a delay). Tests and benchmarks
//! use it as a Gitaly node; it also records whether two calls for the same
//! repository ever overlapped, which is how exclusion is checked.

use gitaly_wire::auth;
use gitaly_wire::metadata::{CORRELATION_ID, GITALY_SERVERS};
use gitaly_wire::proto::gitaly as pb;
use gitaly_wire::proto::gitaly::object_pool_service_server::{
    ObjectPoolService, ObjectPoolServiceServer,
};
use gitaly_wire::proto::gitaly::ref_service_server::{RefService, RefServiceServer};
use gitaly_wire::proto::gitaly::repository_service_server::{
    RepositoryService, RepositoryServiceServer,
};
use gitaly_wire::proto::health::health_check_response::ServingStatus;
use gitaly_wire::proto::health::health_server::{Health, HealthServer};
use gitaly_wire::proto::health::{HealthCheckRequest, HealthCheckResponse};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};

/// How the server answers one method.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Wait this long before answering.
    pub delay: Duration,
    /// Answer with this status instead of success.
    pub status: Option<(Code, String)>,
    /// Apply `status` only this many times, then succeed (`None` = always).
    pub times: Option<usize>,
}

impl Behaviour {
    pub fn ok() -> Self {
        Behaviour::default()
    }
    pub fn fail(code: Code, message: &str) -> Self {
        Behaviour {
            status: Some((code, message.to_owned())),
            ..Default::default()
        }
    }
    pub fn delay(delay: Duration) -> Self {
        Behaviour {
            delay,
            ..Default::default()
        }
    }
    pub fn times(mut self, n: usize) -> Self {
        self.times = Some(n);
        self
    }
}

/// The decoded request of a recorded call.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordedRequest {
    ReplicateRepository(pb::ReplicateRepositoryRequest),
    RemoveRepository(pb::RemoveRepositoryRequest),
    RenameRepository(pb::RenameRepositoryRequest),
    GarbageCollect(pb::GarbageCollectRequest),
    RepackFull(pb::RepackFullRequest),
    RepackIncremental(pb::RepackIncrementalRequest),
    Cleanup(pb::CleanupRequest),
    WriteCommitGraph(pb::WriteCommitGraphRequest),
    MidxRepack(pb::MidxRepackRequest),
    OptimizeRepository(pb::OptimizeRepositoryRequest),
    PackRefs(pb::PackRefsRequest),
    GetObjectPool(pb::GetObjectPoolRequest),
    LinkRepositoryToObjectPool(pb::LinkRepositoryToObjectPoolRequest),
    RepositoryExists(pb::RepositoryExistsRequest),
    CreateRepository(pb::CreateRepositoryRequest),
    CalculateChecksum(pb::CalculateChecksumRequest),
}

/// One call as the server saw it.
#[derive(Debug, Clone)]
pub struct RecordedCall {
    pub method: &'static str,
    pub storage: String,
    pub relative_path: String,
    pub request: RecordedRequest,
    pub authorization: Option<String>,
    pub gitaly_servers: Option<String>,
    pub correlation_id: Option<String>,
    /// Whether the authorization header is a valid v2 token for the
    /// server's token (always false when the server has no token).
    pub auth_valid: bool,
    pub received_at: Instant,
    /// Wall-clock arrival, to compare with times other processes recorded.
    pub received_wall: SystemTime,
}

#[derive(Default)]
struct State {
    calls: Vec<RecordedCall>,
    behaviours: HashMap<String, Behaviour>,
    pools: HashMap<String, pb::ObjectPool>,
    /// Relative paths `RepositoryExists` answers false for.
    absent: std::collections::HashSet<String>,
    /// What `CalculateChecksum` answers per relative path (empty otherwise).
    checksums: HashMap<String, String>,
    in_flight: HashMap<(String, String), usize>,
}

struct Inner {
    token: Option<String>,
    state: Mutex<State>,
    max_overlap: AtomicUsize,
    call_count: AtomicUsize,
    recording: AtomicBool,
    serving: AtomicBool,
    call_arrived: Notify,
}

/// A recording Gitaly node. Clones share state.
#[derive(Clone)]
pub struct RecordingGitaly {
    inner: Arc<Inner>,
}

impl Default for RecordingGitaly {
    fn default() -> Self {
        Self::new(None)
    }
}

/// The running server; stops when dropped.
pub struct RunningGitaly {
    pub addr: SocketAddr,
    pub gitaly: RecordingGitaly,
    shutdown: Option<oneshot::Sender<()>>,
}

impl RunningGitaly {
    /// `tcp://127.0.0.1:<port>`, as a node address in the config.
    pub fn address(&self) -> String {
        format!("tcp://{}", self.addr)
    }
}

impl Drop for RunningGitaly {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

struct InFlight {
    inner: Arc<Inner>,
    key: (String, String),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut st = lock(&self.inner.state);
        if let Some(n) = st.in_flight.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                st.in_flight.remove(&self.key);
            }
        }
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread must not hide the recorded calls from the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn header(req: &tonic::metadata::MetadataMap, key: &str) -> Option<String> {
    req.get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl RecordingGitaly {
    /// A node that checks v2 tokens against `token` when given (answering
    /// `Unauthenticated` on a bad one), and accepts anything otherwise.
    pub fn new(token: Option<&str>) -> Self {
        RecordingGitaly {
            inner: Arc::new(Inner {
                token: token.map(str::to_owned),
                state: Mutex::new(State::default()),
                max_overlap: AtomicUsize::new(0),
                call_count: AtomicUsize::new(0),
                recording: AtomicBool::new(true),
                serving: AtomicBool::new(true),
                call_arrived: Notify::new(),
            }),
        }
    }

    /// Serves on 127.0.0.1 with an ephemeral port.
    pub async fn serve(self) -> std::io::Result<RunningGitaly> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .add_service(RepositoryServiceServer::new(self.clone()))
            .add_service(ObjectPoolServiceServer::new(self.clone()))
            .add_service(RefServiceServer::new(self.clone()))
            .add_service(HealthServer::new(self.clone()));
        tokio::spawn(async move {
            let incoming = TcpListenerStream::new(listener);
            let _ = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(RunningGitaly {
            addr,
            gitaly: self,
            shutdown: Some(tx),
        })
    }

    /// Sets how `method` (e.g. "ReplicateRepository") answers; "*" sets the default.
    pub fn respond(&self, method: &str, behaviour: Behaviour) {
        lock(&self.inner.state)
            .behaviours
            .insert(method.to_owned(), behaviour);
    }

    /// Makes `RepositoryExists` answer false for `relative_path` (true for
    /// every other path).
    pub fn set_absent(&self, relative_path: &str) {
        lock(&self.inner.state)
            .absent
            .insert(relative_path.to_owned());
    }

    /// Makes `GetObjectPool` report `pool` for the repository at `relative_path`.
    pub fn set_object_pool(&self, relative_path: &str, pool: pb::ObjectPool) {
        lock(&self.inner.state)
            .pools
            .insert(relative_path.to_owned(), pool);
    }

    /// Makes `CalculateChecksum` answer `checksum` for `relative_path`.
    pub fn set_checksum(&self, relative_path: &str, checksum: &str) {
        lock(&self.inner.state)
            .checksums
            .insert(relative_path.to_owned(), checksum.to_owned());
    }

    /// Makes the health check report SERVING or NOT_SERVING.
    pub fn set_serving(&self, serving: bool) {
        self.inner.serving.store(serving, Ordering::SeqCst);
    }

    pub fn calls(&self) -> Vec<RecordedCall> {
        lock(&self.inner.state).calls.clone()
    }

    pub fn calls_to(&self, method: &str) -> Vec<RecordedCall> {
        lock(&self.inner.state)
            .calls
            .iter()
            .filter(|c| c.method == method)
            .cloned()
            .collect()
    }

    pub fn clear_calls(&self) {
        lock(&self.inner.state).calls.clear();
    }

    /// Stops (or resumes) keeping each call and tracking overlaps; calls are
    /// still counted. For benchmarks that make millions of calls.
    pub fn set_recording(&self, on: bool) {
        self.inner.recording.store(on, Ordering::SeqCst);
    }

    /// Calls received so far, recorded or not.
    pub fn call_count(&self) -> usize {
        self.inner.call_count.load(Ordering::SeqCst)
    }

    /// The most calls that were ever in progress at once for one repository.
    pub fn max_overlap(&self) -> usize {
        self.inner.max_overlap.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` calls were recorded, or `timeout` passes.
    pub async fn wait_for_calls(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.inner.call_arrived.notified();
            if self.call_count() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.call_count() >= n;
            }
        }
    }

    async fn handle<Req, Resp>(
        &self,
        method: &'static str,
        request: Request<Req>,
        repository: impl Fn(&Req) -> Option<&pb::Repository>,
        record: impl Fn(Req) -> RecordedRequest,
        respond: impl FnOnce(&State, &Req) -> Resp,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
    {
        let md = request.metadata();
        let auth_result = match &self.inner.token {
            Some(token) => auth::verify(
                md.get("authorization").and_then(|v| v.to_str().ok()),
                token,
                SystemTime::now(),
            ),
            None => Err(auth::AuthError::Missing),
        };
        // Without recording (benchmarks), only count: no copies, no overlap map.
        let recording = self.inner.recording.load(Ordering::Relaxed);
        let (authorization, gitaly_servers, correlation_id) = if recording {
            (
                header(md, "authorization"),
                header(md, GITALY_SERVERS),
                header(md, CORRELATION_ID),
            )
        } else {
            (None, None, None)
        };
        let msg = request.into_inner();
        let (storage, relative_path) = match repository(&msg) {
            Some(r) if recording => (r.storage_name.clone(), r.relative_path.clone()),
            _ => Default::default(),
        };
        let key = recording.then(|| (storage.clone(), relative_path.clone()));
        let (behaviour, response) = {
            let mut st = lock(&self.inner.state);
            self.inner.call_count.fetch_add(1, Ordering::SeqCst);
            let call = recording.then(|| RecordedCall {
                method,
                storage,
                relative_path,
                request: record(msg.clone()),
                authorization,
                gitaly_servers,
                correlation_id,
                auth_valid: auth_result.is_ok(),
                received_at: Instant::now(),
                received_wall: SystemTime::now(),
            });
            st.calls.extend(call);
            if let Some(key) = &key {
                let n = st.in_flight.entry(key.clone()).or_insert(0);
                *n += 1;
                self.inner.max_overlap.fetch_max(*n, Ordering::SeqCst);
            }
            let behaviour = match st.behaviours.get_mut(method) {
                Some(b) => Some(b),
                None => st.behaviours.get_mut("*"),
            }
            .map(|b| {
                let current = b.clone();
                if let Some(n) = b.times.as_mut() {
                    if *n > 0 {
                        *n -= 1;
                    } else {
                        return Behaviour {
                            delay: b.delay,
                            ..Default::default()
                        };
                    }
                }
                current
            })
            .unwrap_or_default();
            let response = respond(&st, &msg);
            (behaviour, response)
        };
        let _in_flight = key.map(|key| InFlight {
            inner: self.inner.clone(),
            key,
        });
        self.inner.call_arrived.notify_waiters();
        if self.inner.token.is_some()
            && let Err(e) = auth_result
        {
            return Err(match e {
                auth::AuthError::WrongVersion => Status::permission_denied(e.to_string()),
                _ => Status::unauthenticated(e.to_string()),
            });
        }
        if !behaviour.delay.is_zero() {
            tokio::time::sleep(behaviour.delay).await;
        }
        match behaviour.status {
            Some((code, message)) => Err(Status::new(code, message)),
            None => Ok(Response::new(response)),
        }
    }
}

/// Implements one unary method by recording it; the response is the default.
/// `#[async_trait]` does not look inside macro calls, so this writes the
/// boxed-future signature it would have produced.
macro_rules! recorded {
    ($fn:ident, $method:literal, $req:ident, $resp:ident, $variant:ident) => {
        fn $fn<'life0, 'async_trait>(
            &'life0 self,
            request: Request<pb::$req>,
        ) -> Pin<
            Box<
                dyn std::future::Future<Output = Result<Response<pb::$resp>, Status>>
                    + Send
                    + 'async_trait,
            >,
        >
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(self.handle(
                $method,
                request,
                |r| r.repository.as_ref(),
                RecordedRequest::$variant,
                |_, _| pb::$resp::default(),
            ))
        }
    };
}

type SnapshotStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GetSnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RepositoryService for RecordingGitaly {
    recorded!(
        replicate_repository,
        "ReplicateRepository",
        ReplicateRepositoryRequest,
        ReplicateRepositoryResponse,
        ReplicateRepository
    );
    recorded!(
        remove_repository,
        "RemoveRepository",
        RemoveRepositoryRequest,
        RemoveRepositoryResponse,
        RemoveRepository
    );
    recorded!(
        rename_repository,
        "RenameRepository",
        RenameRepositoryRequest,
        RenameRepositoryResponse,
        RenameRepository
    );
    recorded!(
        garbage_collect,
        "GarbageCollect",
        GarbageCollectRequest,
        GarbageCollectResponse,
        GarbageCollect
    );
    recorded!(
        repack_full,
        "RepackFull",
        RepackFullRequest,
        RepackFullResponse,
        RepackFull
    );
    recorded!(
        repack_incremental,
        "RepackIncremental",
        RepackIncrementalRequest,
        RepackIncrementalResponse,
        RepackIncremental
    );
    recorded!(cleanup, "Cleanup", CleanupRequest, CleanupResponse, Cleanup);
    recorded!(
        write_commit_graph,
        "WriteCommitGraph",
        WriteCommitGraphRequest,
        WriteCommitGraphResponse,
        WriteCommitGraph
    );
    recorded!(
        midx_repack,
        "MidxRepack",
        MidxRepackRequest,
        MidxRepackResponse,
        MidxRepack
    );
    recorded!(
        optimize_repository,
        "OptimizeRepository",
        OptimizeRepositoryRequest,
        OptimizeRepositoryResponse,
        OptimizeRepository
    );
    recorded!(
        create_repository,
        "CreateRepository",
        CreateRepositoryRequest,
        CreateRepositoryResponse,
        CreateRepository
    );
    async fn calculate_checksum(
        &self,
        request: Request<pb::CalculateChecksumRequest>,
    ) -> Result<Response<pb::CalculateChecksumResponse>, Status> {
        self.handle(
            "CalculateChecksum",
            request,
            |r| r.repository.as_ref(),
            RecordedRequest::CalculateChecksum,
            |st, req| pb::CalculateChecksumResponse {
                checksum: req
                    .repository
                    .as_ref()
                    .and_then(|r| st.checksums.get(&r.relative_path).cloned())
                    .unwrap_or_default(),
            },
        )
        .await
    }

    async fn repository_exists(
        &self,
        request: Request<pb::RepositoryExistsRequest>,
    ) -> Result<Response<pb::RepositoryExistsResponse>, Status> {
        self.handle(
            "RepositoryExists",
            request,
            |r| r.repository.as_ref(),
            RecordedRequest::RepositoryExists,
            |st, r| pb::RepositoryExistsResponse {
                exists: r
                    .repository
                    .as_ref()
                    .is_none_or(|repo| !st.absent.contains(&repo.relative_path)),
            },
        )
        .await
    }

    type GetSnapshotStream = SnapshotStream;

    async fn get_snapshot(
        &self,
        _request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<Self::GetSnapshotStream>, Status> {
        Err(Status::unimplemented("the recording server holds no data"))
    }
}

#[tonic::async_trait]
impl ObjectPoolService for RecordingGitaly {
    recorded!(
        link_repository_to_object_pool,
        "LinkRepositoryToObjectPool",
        LinkRepositoryToObjectPoolRequest,
        LinkRepositoryToObjectPoolResponse,
        LinkRepositoryToObjectPool
    );

    async fn get_object_pool(
        &self,
        request: Request<pb::GetObjectPoolRequest>,
    ) -> Result<Response<pb::GetObjectPoolResponse>, Status> {
        self.handle(
            "GetObjectPool",
            request,
            |r| r.repository.as_ref(),
            RecordedRequest::GetObjectPool,
            |st, req| pb::GetObjectPoolResponse {
                object_pool: req
                    .repository
                    .as_ref()
                    .and_then(|r| st.pools.get(&r.relative_path).cloned()),
            },
        )
        .await
    }
}

#[tonic::async_trait]
impl RefService for RecordingGitaly {
    recorded!(
        pack_refs,
        "PackRefs",
        PackRefsRequest,
        PackRefsResponse,
        PackRefs
    );
}

type HealthStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for RecordingGitaly {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let status = if self.inner.serving.load(Ordering::SeqCst) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }

    type WatchStream = HealthStream;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("use Check"))
    }
}
