//! The HTTP API for backends: push messages, presence, disconnect users, topic counts,
//! nodes, Prometheus metrics, health and readiness.
//!
//! It runs on its own thread, off the shards: a current-thread tokio runtime driving hyper
//! (HTTP/1.1 with keep-alive). A request never touches a shard's state directly; pushes go
//! through the same [`Publisher`] path as any other message (rendered once, handed to the
//! home shards' inboxes), so API traffic cannot block client delivery.
//!
//! Authentication: `Authorization: Bearer <api_key>` (the scheme in any case, RFC 9110
//! §11.1), compared in constant time. With no `api_key` configured, `--dev` accepts every
//! call and a production node refuses every call but the unauthenticated ones (`/healthz`,
//! `/readyz`, `/metrics`). Errors are `{"error":{"code","message"}}` with the matching status.
//!
//! # Limits
//! Every API connection holds a descriptor, and descriptors are what a full node runs out
//! of, so none may be held for free:
//! - at most `max_api_connections` at once; one more is answered 503 and closed at once
//!   (`api_connections_refused_total`). Their descriptors are reserved out of
//!   `RLIMIT_NOFILE` (see [`crate::config::Config::reserved_descriptors`]), so a node full
//!   of clients still answers `/healthz` and `/metrics`;
//! - a request's line and headers must arrive within `api_header_timeout_ms` (hyper's
//!   header-read timeout, which also ends a keep-alive connection idle that long); else the
//!   connection is closed without an answer (`api_timeouts_total{phase="header"}`);
//! - its body must arrive within `api_body_timeout_ms` (else 408,
//!   `api_timeouts_total{phase="body"}`) and be at most `max_api_body_bytes` (else 413);
//! - a failing accept (EMFILE) backs off from 10 ms to 1 s and logs at most one warning
//!   every 10 s (`api_accept_errors_total`).

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::auth::{bearer, valid_name};
use crate::cluster::BusError;
use crate::cluster::{Bus, StreamRead};
use crate::config::{Config, NodeIdentity, MAX_STREAM_SIZE};
use crate::history::{self, StreamKey};
use crate::metrics::{ApiTimeout, LogLimiter};
use crate::metrics::{NodeMetrics, UpstreamReading};
use crate::publish::{Publisher, Target};
use crate::router::Router;
use crate::session::Admission;
use crate::upstream::Sink;
use crate::ws::HttpRefusal;

type Body = Full<Bytes>;

/// First pause after a failed accept; doubled on each failure in a row up to
/// [`ACCEPT_BACKOFF_MAX`] (as mini-redis does), so EMFILE never spins the API thread.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// Longest pause after failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// At most one accept-failure warning per this interval.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The answer to a connection past `max_api_connections`, written without waiting.
fn too_many_connections() -> Vec<u8> {
    HttpRefusal {
        status: 503,
        code: "busy",
        message: "too many API connections (max_api_connections); retry",
    }
    .response()
}

/// A running API server; stops when dropped.
pub struct ApiServer {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves the API on `listener` (already bound) from a thread of its own.
    pub(crate) fn start(
        listener: std::net::TcpListener,
        context: ApiContext,
    ) -> std::io::Result<ApiServer> {
        listener.set_nonblocking(true)?;
        let (shutdown, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || runtime.block_on(serve(listener, context, stopped)))?;
        Ok(ApiServer {
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    context: ApiContext,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "API listener unusable");
            return;
        }
    };
    let api = Arc::new(context);
    let config = &api.config;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.api_header_timeout_ms));
    let max_connections = config.max_api_connections as i64;
    let refusal = too_many_connections();
    let warnings = LogLimiter::new(ACCEPT_WARN_INTERVAL);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stopped => return,
        };
        let metrics = api.metrics.api();
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(error) => {
                metrics.accept_errors.inc();
                if let Some(suppressed) = warnings.allow(Instant::now()) {
                    tracing::warn!(%error, suppressed, "API accept failed; backing off");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut stopped => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        if metrics.connections.get() >= max_connections {
            metrics.connections_refused.inc();
            // Best effort, never waiting: read what the request sent so closing does not
            // reset the connection under the answer, answer, close.
            let mut request = [0u8; 2048];
            let _ = stream.try_read(&mut request);
            let _ = stream.try_write(&refusal);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let slot = ConnectionSlot::take(api.clone());
        let http = http.clone();
        tokio::spawn(async move {
            let api = slot.0.clone();
            let service = hyper::service::service_fn(move |request| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(request).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(error) = http.serve_connection(io, service).await {
                if error.is_timeout() {
                    slot.0.metrics.api().timed_out(ApiTimeout::Header);
                }
                tracing::debug!(%error, "API connection ended with an error");
            }
        });
    }
}

/// One of the `max_api_connections` slots, counted in `api_connections` while held.
struct ConnectionSlot(Arc<ApiContext>);

impl ConnectionSlot {
    fn take(api: Arc<ApiContext>) -> Self {
        api.metrics.api().connections.add(1);
        ConnectionSlot(api)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.metrics.api().connections.add(-1);
    }
}

/// What the API serves from: the handles it uses, given by the node.
pub(crate) struct ApiContext {
    pub(crate) config: Arc<Config>,
    pub(crate) identity: Arc<NodeIdentity>,
    pub(crate) publisher: Publisher,
    /// For topic subscriber counts on this node.
    pub(crate) router: Router,
    /// The cluster bus (presence, topic counts and the registry cluster-wide).
    pub(crate) bus: Option<Bus>,
    /// The draining flag (readiness, publish refusal).
    pub(crate) admission: Arc<Admission>,
    pub(crate) metrics: NodeMetrics,
    /// The upstream sink, when one is configured (for its metrics).
    pub(crate) upstream: Option<Sink>,
}

/// An API error: status, code and message.
struct Failure(StatusCode, &'static str, String);

impl Failure {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Failure(status, code, message.into())
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A `POST /v1/publish` body, as [`parse_publish_body`] reads it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest<'a> {
    // Cow, not &str: a name written with a JSON escape (`"\u00e9"`, as Python's json.dumps
    // sends any non-ASCII name) has no unescaped copy in the body to borrow. The copies
    // cost at most the body's size (`max_api_body_bytes`).
    #[serde(default, borrow)]
    users: Vec<Cow<'a, str>>,
    #[serde(default, borrow)]
    topics: Vec<Cow<'a, str>>,
    #[serde(default)]
    broadcast: bool,
    #[serde(borrow, default, deserialize_with = "crate::protocol::present")]
    data: Option<&'a RawValue>,
}

impl ApiContext {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        match self.route(request).await {
            Ok(response) => response,
            Err(Failure(status, code, message)) => {
                json_response(status, json!({"error": {"code": code, "message": message}}))
            }
        }
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<Body>, Failure> {
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (request.method(), segments.as_slice()) {
            (&Method::GET, ["healthz"]) => {
                Ok(json_response(StatusCode::OK, json!({"status": "ok"})))
            }
            (&Method::GET, ["readyz"]) => Ok(self.readiness()),
            (&Method::GET, ["metrics"]) => Ok(self.metrics()),
            (method, ["v1", ..]) => {
                self.authorize(&request)?;
                match (method, &segments[1..]) {
                    (&Method::POST, ["publish"]) => self.publish(request).await,
                    (&Method::DELETE, ["users", user, "connections"]) => self.disconnect(user),
                    (&Method::GET, ["users", user]) => self.presence(user).await,
                    (&Method::GET, ["users", user, "history"]) => {
                        let query = request.uri().query();
                        self.history(StreamKind::Mailbox, user, query).await
                    }
                    (&Method::GET, ["topics", topic]) => self.topic(topic).await,
                    (&Method::GET, ["topics", topic, "history"]) => {
                        let query = request.uri().query();
                        self.history(StreamKind::Topic, topic, query).await
                    }
                    (&Method::GET, ["nodes"]) => self.nodes().await,
                    _ => Err(not_found()),
                }
            }
            _ => Err(not_found()),
        }
    }

    fn authorize(&self, request: &Request<Incoming>) -> Result<(), Failure> {
        let Some(key) = self.config.api_key.as_deref().filter(|k| !k.is_empty()) else {
            return if self.config.dev {
                Ok(())
            } else {
                Err(Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "no api_key is configured on this node",
                ))
            };
        };
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .unwrap_or("");
        if bool::from(presented.as_bytes().ct_eq(key.as_bytes())) {
            Ok(())
        } else {
            Err(Failure::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key",
            ))
        }
    }

    fn draining(&self) -> bool {
        self.admission.draining()
    }

    fn readiness(&self) -> Response<Body> {
        if self.draining() {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "reason": "draining"}),
            )
        } else if self.bus.as_ref().is_some_and(|bus| !bus.is_up()) {
            // Never look healthy while cross-node delivery silently cannot happen.
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "reason": "redis"}),
            )
        } else {
            json_response(StatusCode::OK, json!({"ready": true}))
        }
    }

    async fn publish(&self, request: Request<Incoming>) -> Result<Response<Body>, Failure> {
        if self.draining() {
            return Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "node is draining; publish through another node",
            ));
        }
        let config = &self.config;
        let limit = config.max_api_body_bytes;
        let within = Duration::from_millis(config.api_body_timeout_ms);
        let collected =
            tokio::time::timeout(within, Limited::new(request.into_body(), limit).collect())
                .await
                .map_err(|_| {
                    self.metrics.api().timed_out(ApiTimeout::Body);
                    Failure::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        format!("body not received within {} ms", config.api_body_timeout_ms),
                    )
                })?;
        let body = collected
            .map_err(|_| {
                Failure::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("body over {limit} bytes"),
                )
            })?
            .to_bytes();
        // One publication (an object), or a batch (an array of them) answered with one
        // result each. A batch is checked whole before anything is published.
        let batch = body.trim_ascii_start().first() == Some(&b'[');
        let parsed = if batch {
            parse_publish_batch(&body)
        } else {
            parse_publish_body(&body).map(|publish| vec![publish])
        };
        let items = parsed.map_err(|e| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("invalid JSON body: {e}"),
            )
        })?;
        if items.is_empty() {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "an empty batch",
            ));
        }
        let checked = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                self.check(item)
                    .map_err(|Failure(status, code, message)| match batch {
                        true => Failure(status, code, format!("publication {i}: {message}")),
                        false => Failure(status, code, message),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !batch {
            let answer = self.publish_checked(&checked[0]).await?;
            return Ok(json_response(StatusCode::ACCEPTED, answer));
        }
        // Every publication goes out (in order) before any answer is awaited, so the shards
        // and Redis answer the whole batch in one go rather than one round trip each.
        let published = join_in_order(checked.iter().map(|item| self.publish_checked(item))).await;
        let answers: Vec<_> = published
            .into_iter()
            .map(|answer| match answer {
                Ok(answer) => answer,
                Err(Failure(_, code, message)) => {
                    json!({"error": {"code": code, "message": message}})
                }
            })
            .collect();
        Ok(json_response(StatusCode::ACCEPTED, json!(answers)))
    }

    /// A publication's target and data, checked: data present, a target, valid names.
    fn check<'a>(&self, publish: &'a PublishRequest<'a>) -> Result<Checked<'a>, Failure> {
        let data = publish.data.ok_or_else(|| {
            Failure::new(StatusCode::BAD_REQUEST, "bad_request", "data is required")
        })?;
        if publish.users.is_empty() && publish.topics.is_empty() && !publish.broadcast {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                "no_target",
                "name users, topics or broadcast",
            ));
        }
        let max = self.config.max_name_bytes;
        if let Some(bad) = publish
            .users
            .iter()
            .chain(&publish.topics)
            .find(|name| !valid_name(name, max))
        {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                "bad_name",
                format!("invalid user or topic name {bad:?}"),
            ));
        }
        Ok(Checked {
            users: publish.users.iter().map(AsRef::as_ref).collect(),
            topics: publish.topics.iter().map(AsRef::as_ref).collect(),
            broadcast: publish.broadcast,
            data,
        })
    }

    /// Publishes one checked publication; answers `{"mid", "offline"?}`, or 503 `busy` when
    /// a route could not be queued.
    async fn publish_checked(&self, item: &Checked<'_>) -> Result<serde_json::Value, Failure> {
        let users = &item.users;
        let published = self.publisher.publish(
            Target {
                users,
                topics: &item.topics,
                broadcast: item.broadcast,
            },
            item.data,
        );
        let mid = published.mid;
        if published.dropped > 0 {
            tracing::warn!(
                mid,
                dropped = published.dropped,
                "publish partly dropped: shard inboxes or the cluster bus full"
            );
            return Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!(
                    "message {mid}: {} route(s) could not be queued (shard inbox or cluster bus full); retry",
                    published.dropped
                ),
            ));
        }
        tracing::debug!(
            mid,
            users = users.len(),
            topics = item.topics.len(),
            broadcast = item.broadcast,
            "published"
        );
        // With mailboxes, a recipient with no device online gets the message from its
        // mailbox later. Clustered, Redis says who when it appends the message; a Redis that
        // does not answer in time leaves `offline` out (the message still waits in the bus).
        let offline = if self.config.mailbox && !users.is_empty() {
            self.publisher.offline(published, users).await
        } else {
            None
        };
        let mut answer = json!({"mid": mid.to_string()});
        if let Some(offline) = offline.filter(|offline| !offline.is_empty()) {
            answer["offline"] = json!(offline);
        }
        Ok(answer)
    }

    /// `GET /v1/users/{user}/history` and `GET /v1/topics/{topic}/history`: the stream's
    /// retained messages after `since` (default 0: all) of its current epoch, at most
    /// `limit` (default 100, at most [`MAX_STREAM_SIZE`]).
    async fn history(
        &self,
        kind: StreamKind,
        name: &str,
        query: Option<&str>,
    ) -> Result<Response<Body>, Failure> {
        let name: Arc<str> = Arc::from(self.name(name)?);
        let bad = |message: &str| Failure::new(StatusCode::BAD_REQUEST, "bad_request", message);
        let (mut since, mut limit) = (0u64, 100usize);
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*key {
                "since" => {
                    since = value
                        .parse()
                        .map_err(|_| bad("since must be a non-negative integer"))?;
                }
                "limit" => {
                    limit = value
                        .parse()
                        .ok()
                        .filter(|l| (1..=MAX_STREAM_SIZE).contains(l))
                        .ok_or_else(|| bad("limit must be 1 to 10000"))?;
                }
                _ => return Err(bad("unknown query parameter (since, limit)")),
            }
        }
        let (key, retention) = match kind {
            StreamKind::Mailbox if self.config.mailbox => (
                StreamKey::Mailbox(name.clone()),
                self.config.mailbox_retention(),
            ),
            StreamKind::Topic if self.config.history_rule_for(&name).is_some() => (
                StreamKey::Topic(name.clone()),
                self.config.history_rule_for(&name),
            ),
            StreamKind::Mailbox => {
                return Err(Failure::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "mailboxes are off on this node",
                ))
            }
            StreamKind::Topic => {
                return Err(Failure::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no [[history.topics]] rule covers this topic",
                ))
            }
        };
        let json = match (&self.bus, retention) {
            // Clustered, streams live in Redis; the read counts as a replay on the stream's
            // home shard, as it would alone.
            (Some(bus), Some(retention)) => {
                let read = StreamRead {
                    key,
                    since_seq: since,
                    since_ep: None,
                    limit,
                    ttl_secs: retention.ttl_secs,
                };
                let replay = bus.history(read).await.map_err(cluster_failure)?;
                let metrics = self.metrics.shard(self.router.mesh().home(&name));
                metrics.replays.inc();
                metrics.replayed.add(replay.messages.len() as u64);
                history::history_json(&replay)
            }
            _ => self
                .router
                .mesh()
                .read_history(key, since, limit, &self.metrics)
                .await
                .ok_or_else(busy)?,
        };
        let mut response = Response::new(Full::new(Bytes::from(json)));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(response)
    }

    fn metrics(&self) -> Response<Body> {
        let sinks: Vec<UpstreamReading<'_>> = self.upstream.iter().map(Sink::reading).collect();
        let text = crate::metrics::render_prometheus(
            &self.metrics,
            self.bus.as_ref().map(Bus::reading),
            &sinks,
        );
        let mut response = Response::new(Full::new(Bytes::from(text)));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        response
    }

    /// A name from the path: percent-decoded and checked like client-supplied names.
    fn name(&self, segment: &str) -> Result<String, Failure> {
        let name = percent_decode(segment)?;
        if valid_name(&name, self.config.max_name_bytes) {
            Ok(name)
        } else {
            Err(Failure::new(
                StatusCode::BAD_REQUEST,
                "bad_name",
                "invalid user or topic name",
            ))
        }
    }

    async fn presence(&self, user: &str) -> Result<Response<Body>, Failure> {
        let user = self.name(user)?;
        if let Some(bus) = &self.bus {
            let presence = bus.presence(&user).await.map_err(cluster_failure)?;
            return Ok(json_response(
                StatusCode::OK,
                json!({
                    "user": user,
                    "online": presence.connections > 0,
                    "connections": presence.connections,
                    "nodes": presence.nodes,
                }),
            ));
        }
        let connections = self
            .publisher
            .user_connections(&user)
            .await
            .ok_or_else(busy)?;
        let nodes: Vec<&str> = if connections > 0 {
            vec![&self.identity.id]
        } else {
            vec![]
        };
        Ok(json_response(
            StatusCode::OK,
            json!({"user": user, "online": connections > 0, "connections": connections, "nodes": nodes}),
        ))
    }

    async fn topic(&self, topic: &str) -> Result<Response<Body>, Failure> {
        let topic = self.name(topic)?;
        if let Some(bus) = &self.bus {
            let counts = bus.topic(&topic).await.map_err(cluster_failure)?;
            let subscribers: u64 = counts.iter().map(|(_, n)| n).sum();
            let nodes: Vec<serde_json::Value> = counts
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(node, n)| json!({"node": node, "subscribers": n}))
                .collect();
            return Ok(json_response(
                StatusCode::OK,
                json!({"topic": topic, "subscribers": subscribers, "nodes": nodes}),
            ));
        }
        let subscribers = self
            .router
            .mesh()
            .topic_subscribers(&topic, &self.metrics)
            .await
            .ok_or_else(busy)?;
        let nodes: Vec<serde_json::Value> = if subscribers > 0 {
            vec![json!({"node": &*self.identity.id, "subscribers": subscribers})]
        } else {
            vec![]
        };
        Ok(json_response(
            StatusCode::OK,
            json!({"topic": topic, "subscribers": subscribers, "nodes": nodes}),
        ))
    }

    fn disconnect(&self, user: &str) -> Result<Response<Body>, Failure> {
        let user = self.name(user)?;
        if !self.publisher.disconnect_user(&user) {
            return Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "closed on this node, but the kick for other nodes could not be queued; retry",
            ));
        }
        Ok(json_response(StatusCode::ACCEPTED, json!({"user": user})))
    }

    async fn nodes(&self) -> Result<Response<Body>, Failure> {
        if let Some(bus) = &self.bus {
            let nodes = bus.nodes().await.map_err(cluster_failure)?;
            return Ok(json_response(StatusCode::OK, json!(nodes)));
        }
        Ok(json_response(
            StatusCode::OK,
            json!([{
                "node": &*self.identity.id,
                "ws": self.identity.client_addr.to_string(),
                "api": self.identity.api_addr.to_string(),
                "shards": self.identity.shards,
                "connections": self.metrics.connections(),
            }]),
        ))
    }
}

/// A cluster question the bus could not answer.
fn cluster_failure(error: BusError) -> Failure {
    let code = match error {
        BusError::Down => "redis_unavailable",
        BusError::Busy => "busy",
        BusError::Redis => "redis_error",
    };
    Failure::new(StatusCode::SERVICE_UNAVAILABLE, code, error.to_string())
}

/// A publication checked by [`ApiContext::check`], ready to publish.
struct Checked<'a> {
    users: Vec<&'a str>,
    topics: Vec<&'a str>,
    broadcast: bool,
    data: &'a RawValue,
}

/// Which kind of stream a history request reads.
enum StreamKind {
    Mailbox,
    Topic,
}

fn busy() -> Failure {
    Failure::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        "a shard's inbox is full; retry",
    )
}

fn not_found() -> Failure {
    Failure::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

fn percent_decode(segment: &str) -> Result<String, Failure> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| Failure::new(StatusCode::BAD_REQUEST, "bad_name", "user id is not UTF-8"))
}

/// Parses a `POST /v1/publish` body: the handler's first step, public so the fuzz targets
/// (`fuzz/`) can drive it with arbitrary bytes. Validation of names and targets follows in
/// the handler.
pub fn parse_publish_body(body: &[u8]) -> Result<PublishRequest<'_>, serde_json::Error> {
    if !crate::protocol::is_object(body) {
        return Err(serde::de::Error::custom("expected a JSON object"));
    }
    serde_json::from_slice(body)
}

/// Parses a batch `POST /v1/publish` body: a JSON array of publications, each read as
/// [`parse_publish_body`] reads one body.
pub fn parse_publish_batch(body: &[u8]) -> Result<Vec<PublishRequest<'_>>, serde_json::Error> {
    let items: Vec<&RawValue> = serde_json::from_slice(body)?;
    items
        .into_iter()
        .map(|item| parse_publish_body(item.get().as_bytes()))
        .collect()
}

/// Runs `futures` together and returns their outputs in order. The first poll starts every
/// one of them, in order; after that they are polled from the first unfinished one up to the
/// next one still waiting, so a batch of n costs O(n) polls however its answers arrive.
async fn join_in_order<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let mut started = false;
    let mut done = 0;
    std::future::poll_fn(|cx| {
        let each = futures.iter_mut().zip(outputs.iter_mut()).enumerate();
        for (i, (future, output)) in each.skip(done) {
            if output.is_none() {
                if let Poll::Ready(value) = future.as_mut().poll(cx) {
                    *output = Some(value);
                }
            }
            if output.is_some() && i == done {
                done += 1;
            } else if started {
                break;
            }
        }
        started = true;
        if done == futures.len() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_names_deserialize() {
        let body = br#"{"users":["\u0061lice","bob"],"topics":["caf\u00e9"],"data":1}"#;
        let publish: PublishRequest = serde_json::from_slice(body).expect("valid");
        assert_eq!(publish.users, ["alice", "bob"]);
        assert_eq!(publish.topics, ["café"]);
    }

    #[test]
    fn the_refusal_is_well_formed() {
        let refusal = too_many_connections();
        let text = std::str::from_utf8(&refusal).expect("utf8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        serde_json::from_str::<serde_json::Value>(body).expect("json body");
    }

    #[test]
    fn a_batch_starts_everything_before_waiting_and_answers_in_order() {
        let started = std::cell::RefCell::new(Vec::new());
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..4)
            .map(|_| tokio::sync::oneshot::channel::<u32>())
            .unzip();
        let futures = receivers.into_iter().enumerate().map(|(i, answer)| {
            let started = &started;
            async move {
                started.borrow_mut().push(i);
                answer.await.expect("answered")
            }
        });
        let mut joined = Box::pin(join_in_order(futures));
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(joined.as_mut().poll(&mut cx).is_pending());
        assert_eq!(*started.borrow(), [0, 1, 2, 3], "all started, in order");
        // Answers arriving out of order still come back in order.
        for (i, sender) in senders.into_iter().enumerate().rev() {
            sender.send(i as u32 * 10).expect("receiver alive");
        }
        match joined.as_mut().poll(&mut cx) {
            Poll::Ready(outputs) => assert_eq!(outputs, [0, 10, 20, 30]),
            Poll::Pending => panic!("every answer is in"),
        }
    }
}
