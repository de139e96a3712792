//! The webhook sink: upstream records as batched, signed JSON POSTs to `webhook_url`.
//!
//! Callers (shards, the bridge, the API) hold a [`WebhookSender`]. Its `try_send` takes a
//! record or refuses it at once ([`Refused`]): it reserves room in a bounded queue with a
//! few atomic operations and hands the record to an unbounded channel, so a slow or dead
//! backend costs a caller nothing but refusals. An `up` gets a [`Ticket`], a future that
//! resolves when its record was delivered or given up; it needs no tokio runtime, so a
//! glommio task can await it.
//!
//! The [`Webhook`] itself owns a thread (`webhook`) running a current-thread tokio runtime,
//! as the API does, that batches, posts, retries and settles each record once (its ticket,
//! the [`UpstreamMetrics`]).
//!
//! # Delivery
//! - A batch is the records queued when the thread is free (those that came while the
//!   previous batch was out, so batches grow with load), up to `webhook_batch_max`, waiting
//!   up to `webhook_batch_linger_ms` (default 0) after its first record for more. A batch
//!   stays within `webhook_batch_max_bytes` (by [`UpstreamEvent::weight`]; a larger record
//!   goes alone), as backends limit request bodies.
//! - The body is a JSON array of records (shape: [`crate::upstream`]), in the order the
//!   node accepted them, sent as `POST` with `Content-Type: application/json` and
//!   `X-Shardcast-Signature: sha256=<hex HMAC-SHA256 of the body, keyed by webhook_secret>`.
//! - One batch at a time over one kept-alive HTTP/1.1 connection, so the backend sees
//!   records in order; a retried batch is sent again whole before any later one.
//! - 2xx delivers the batch. 429, 5xx, a connect or I/O error, or no whole answer within
//!   `webhook_timeout_ms` is retried after a pause drawn uniformly from zero to
//!   `backoff_min · 2^retry` (capped at `backoff_max`): "full jitter", so nodes that lost
//!   the backend together do not come back in step. Once the next pause would end past
//!   `webhook_retry_max_ms` after its oldest record was accepted, the batch is dropped
//!   (`retries_exhausted`); a batch already past it when its turn comes (it queued behind
//!   a failing backend) is dropped without a try, so a dead backend empties the queue
//!   within about that time rather than that time per batch. Any other status (3xx, 4xx)
//!   drops it at once (`rejected`): the same body would get the same answer.
//! - At least once: a batch whose answer was lost (a timeout after the backend stored it)
//!   is sent again; backends drop repeats by `mid`.
//!
//! # Bounds
//! At most `webhook_queue_max` records and `webhook_queue_max_bytes` bytes (by
//! [`UpstreamEvent::weight`]) are held at once, queued or in the batch being sent; a record
//! arriving at an empty queue is always taken. A full queue refuses at once
//! (`dropped{reason="queue_full"}`): the `up` is answered `err unavailable` and the client
//! retries. A ticket resolves within `webhook_retry_max_ms` plus one `webhook_timeout_ms`
//! of its record being accepted (and the linger), whatever the backend does.
//!
//! # Stopping
//! Dropping the [`Webhook`] stops the thread at once; [`Webhook::stop`] first lets it
//! deliver what is queued for a grace period. Records still held then are dropped
//! (`shutdown`) and their tickets resolve [`Undelivered::Stopped`]; senders are refused
//! from then on.
//!
//! # TLS
//! An `https://` URL is posted to over TLS 1.2 or 1.3 (rustls with the ring provider, the
//! one crypto library the node already carries for JWTs), the server's certificate checked
//! against Mozilla's roots, compiled in (`webpki-roots`, so a node does not depend on the
//! host's CA files), plus those of `webhook_ca_file` for a private CA. A certificate that
//! does not check is a connect error like any other: retried, then the batch dropped
//! (`retries_exhausted`), with a warning naming the reason.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, StatusCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;

use super::{ticket, Delivery, Refused, Ticket, Undelivered, UpstreamEvent};
use crate::config::Config;
use crate::metrics::{LogLimiter, UpstreamDrop, UpstreamMetrics};

/// The header carrying the body's signature: `sha256=` and the lower-case hex HMAC-SHA256
/// of the body, keyed by `webhook_secret`.
pub const SIGNATURE_HEADER: &str = "x-shardcast-signature";

/// First retry pause's ceiling: a backend restarting takes at least this long.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Largest retry pause's ceiling: a backend back up is noticed within this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The most of a response body read (and thrown away) to keep its connection; past it the
/// connection is closed. Backends answer with an empty or tiny body.
const RESPONSE_BODY_MAX: usize = 64 * 1024;

/// At most one delivery-failure warning per this interval; the metrics count every one.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Where the webhook is: an `http://` or `https://` URL taken apart once, at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    /// `https`: the connection is TLS, the server's certificate checked against
    /// [`WebhookConfig::tls`]'s roots and the host name.
    https: bool,
    /// Host name or address to connect to (IPv6 without brackets).
    host: String,
    port: u16,
    /// `host[:port]` as written: the `Host` header.
    authority: String,
    /// Path and query: the request target.
    target: String,
}

impl WebhookUrl {
    /// Reads an `http[s]://host[:port][/path][?query]` URL.
    pub fn parse(url: &str) -> Result<WebhookUrl, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|error| format!("`{url}` is not a URL: {error}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("`{url}` must start with http:// or https://")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{url}` names no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{url}`: credentials in the URL are not sent; the body's signature \
                 (webhook_secret) authenticates the node"
            ));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(format!("`{url}` names no host"));
        }
        Ok(WebhookUrl {
            https,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
            target: uri
                .path_and_query()
                .map_or("/", |target| target.as_str())
                .to_owned(),
        })
    }

    /// Whether it is an `https://` URL.
    pub fn is_https(&self) -> bool {
        self.https
    }
}

impl std::fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.target)
    }
}

/// [`tls_client_config`] trusting the CA certificates of the PEM file at `path` too
/// (`webhook_ca_file`).
pub fn tls_config_with_ca_file(path: &str) -> Result<Arc<ClientConfig>, String> {
    let pem = std::fs::read(path).map_err(|error| format!("`webhook_ca_file` {path}: {error}"))?;
    tls_client_config(Some(&pem)).map_err(|error| format!("`webhook_ca_file` {path}: {error}"))
}

/// The TLS settings of an `https://` webhook: TLS 1.2 or 1.3 (rustls, ring), the server's
/// certificate checked against Mozilla's roots (built in, from `webpki-roots`) and the
/// certificates in `extra_roots_pem` (`webhook_ca_file`: a private CA), offering HTTP/1.1.
pub fn tls_client_config(extra_roots_pem: Option<&[u8]>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(pem) = extra_roots_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|error| format!("not a PEM certificate: {error}"))?;
            roots
                .add(cert)
                .map_err(|error| format!("not a usable CA certificate: {error}"))?;
            added += 1;
        }
        if added == 0 {
            return Err("no PEM certificate in it".into());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Everything the sink needs, from [`WebhookConfig::from_config`] (or built by hand in
/// tests, which shorten the backoff).
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Where batches go (`webhook_url`).
    pub url: WebhookUrl,
    /// The TLS settings of an `https://` URL ([`tls_client_config`], with
    /// `webhook_ca_file`); `None`: Mozilla's roots alone.
    pub tls: Option<Arc<ClientConfig>>,
    /// HMAC key of the signature (`webhook_secret`).
    pub secret: Vec<u8>,
    /// Records held at most (`webhook_queue_max`).
    pub queue_max: usize,
    /// Bytes of records held at most (`webhook_queue_max_bytes`).
    pub queue_max_bytes: usize,
    /// Records per POST at most (`webhook_batch_max`).
    pub batch_max: usize,
    /// Bytes of records per POST at most, by [`UpstreamEvent::weight`]; a larger record
    /// goes alone (`webhook_batch_max_bytes`).
    pub batch_max_bytes: usize,
    /// How long a batch waits for more records after its first (`webhook_batch_linger_ms`).
    pub batch_linger: Duration,
    /// One request's limit, connecting included (`webhook_timeout_ms`).
    pub timeout: Duration,
    /// How long a record may wait for delivery from being accepted, retries included
    /// (`webhook_retry_max_ms`).
    pub retry_max: Duration,
    /// First retry pause's ceiling ([`BACKOFF_MIN`]).
    pub backoff_min: Duration,
    /// Largest retry pause's ceiling ([`BACKOFF_MAX`]).
    pub backoff_max: Duration,
}

impl WebhookConfig {
    /// The sink's settings, or `None` when no `webhook_url` is configured. Fails only on a
    /// config that [`Config::validate`] would have refused.
    pub fn from_config(config: &Config) -> Result<Option<WebhookConfig>, String> {
        let Some(url) = &config.webhook_url else {
            return Ok(None);
        };
        let url = WebhookUrl::parse(url)?;
        let tls = match &config.webhook_ca_file {
            Some(path) if url.is_https() => Some(tls_config_with_ca_file(path)?),
            _ => None,
        };
        Ok(Some(WebhookConfig {
            url,
            tls,
            secret: config
                .webhook_secret
                .as_deref()
                .ok_or("`webhook_secret` is required with `webhook_url`")?
                .as_bytes()
                .to_vec(),
            queue_max: config.webhook_queue_max,
            queue_max_bytes: config.webhook_queue_max_bytes,
            batch_max: config.webhook_batch_max,
            batch_max_bytes: config.webhook_batch_max_bytes,
            batch_linger: Duration::from_millis(config.webhook_batch_linger_ms),
            timeout: Duration::from_millis(config.webhook_timeout_ms),
            retry_max: Duration::from_millis(config.webhook_retry_max_ms),
            backoff_min: BACKOFF_MIN,
            backoff_max: BACKOFF_MAX,
        }))
    }
}

/// The signature header's value for `body`: `sha256=<hex HMAC-SHA256>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 2 * digest.len());
    out.push_str("sha256=");
    for byte in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(byte & 15)]));
    }
    out
}

/// A record on its way, with what it counts against the bounds and whom to tell.
struct Queued {
    event: UpstreamEvent,
    weight: usize,
    ack: Option<oneshot::Sender<Delivery>>,
    /// When the sender took it: its retry time counts from here.
    accepted: Instant,
}

/// The bounds, shared by every sender and the thread: records and bytes held now.
struct Queue {
    max_records: usize,
    max_bytes: usize,
    records: AtomicUsize,
    bytes: AtomicUsize,
    metrics: Arc<UpstreamMetrics>,
}

impl Queue {
    /// Takes room for a record of `weight` bytes, or says there is none.
    fn reserve(&self, weight: usize) -> bool {
        let room = |held: usize| (held < self.max_records).then_some(held + 1);
        if self
            .records
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, room)
            .is_err()
        {
            return false;
        }
        let fits = |held: usize| {
            (held == 0 || held.saturating_add(weight) <= self.max_bytes).then_some(held + weight)
        };
        if self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, fits)
            .is_err()
        {
            self.records.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        self.metrics.queue_depth.add(1);
        self.metrics.queue_bytes.add(weight as i64);
        true
    }

    /// Gives back the room of a settled record.
    fn release(&self, weight: usize) {
        self.records.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(weight, Ordering::Relaxed);
        self.metrics.queue_depth.add(-1);
        self.metrics.queue_bytes.add(-(weight as i64));
    }

    /// Counts how a batch ended, frees its room and tells its tickets.
    fn settle(&self, batch: &mut Vec<Queued>, delivery: Delivery) {
        let records = batch.len() as u64;
        match delivery {
            Ok(()) => self.metrics.delivered.add(records),
            Err(undelivered) => self.metrics.dropped(undelivered.reason(), records),
        }
        for queued in batch.drain(..) {
            self.release(queued.weight);
            if let Some(ack) = queued.ack {
                let _ = ack.send(delivery);
            }
        }
    }
}

/// A handle to the sink for any thread: cheap to clone, never blocks.
#[derive(Clone)]
pub struct WebhookSender {
    queue: Arc<Queue>,
    records: mpsc::UnboundedSender<Queued>,
}

impl std::fmt::Debug for WebhookSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSender")
            .field("held", &self.queue.records.load(Ordering::Relaxed))
            .finish()
    }
}

impl WebhookSender {
    /// The sink's metrics.
    pub fn metrics(&self) -> &Arc<UpstreamMetrics> {
        &self.queue.metrics
    }

    /// Queues a record whose delivery the caller awaits (an `up`), or refuses it at once.
    pub fn try_send(&self, event: UpstreamEvent) -> Result<Ticket, Refused> {
        let (ack, ticket) = ticket();
        self.enqueue(event, Some(ack))?;
        Ok(ticket)
    }

    /// Queues a record nobody waits for (a connection event), or refuses it at once.
    pub fn try_send_unacked(&self, event: UpstreamEvent) -> Result<(), Refused> {
        self.enqueue(event, None)
    }

    fn enqueue(
        &self,
        event: UpstreamEvent,
        ack: Option<oneshot::Sender<Delivery>>,
    ) -> Result<(), Refused> {
        let metrics = &self.queue.metrics;
        let weight = event.weight();
        if !self.queue.reserve(weight) {
            metrics.dropped(UpstreamDrop::QueueFull, 1);
            return Err(Refused::Full);
        }
        let queued = Queued {
            event,
            weight,
            ack,
            accepted: Instant::now(),
        };
        match self.records.send(queued) {
            Ok(()) => {
                metrics.appended.inc();
                Ok(())
            }
            Err(_) => {
                self.queue.release(weight);
                metrics.dropped(UpstreamDrop::Shutdown, 1);
                Err(Refused::Stopped)
            }
        }
    }
}

/// The running sink: its thread, and the sender it hands out. Dropping it stops the thread
/// at once (see [`Webhook::stop`] to flush first).
pub struct Webhook {
    sender: WebhookSender,
    stop: Option<oneshot::Sender<Instant>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("sender", &self.sender)
            .finish()
    }
}

impl Webhook {
    /// Starts the sink's thread; it counts into `metrics`.
    pub fn start(config: WebhookConfig, metrics: Arc<UpstreamMetrics>) -> io::Result<Webhook> {
        let queue = Arc::new(Queue {
            max_records: config.queue_max.max(1),
            max_bytes: config.queue_max_bytes,
            records: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            metrics,
        });
        let (records_in, records) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread_queue = queue.clone();
        let thread = std::thread::Builder::new()
            .name("webhook".into())
            .spawn(move || {
                runtime.block_on(run(config, thread_queue, records, Stop::new(stopped)));
                // Only a DNS lookup can still be running (on the blocking pool): leave it.
                runtime.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok(Webhook {
            sender: WebhookSender {
                queue,
                records: records_in,
            },
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// A handle for callers.
    pub fn sender(&self) -> WebhookSender {
        self.sender.clone()
    }

    /// The sink's metrics.
    pub fn metrics(&self) -> &Arc<UpstreamMetrics> {
        &self.sender.queue.metrics
    }

    /// Stops the sink after delivering what is held, for at most `grace` (retries
    /// included); what is still held then is dropped. Returns when the thread has ended.
    pub fn stop(mut self, grace: Duration) {
        self.halt(grace);
    }

    fn halt(&mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Instant::now() + grace);
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the webhook thread panicked");
            }
        }
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.halt(Duration::ZERO);
    }
}

/// The stop request as the thread sees it: not yet, or a deadline to finish by.
struct Stop {
    request: Option<oneshot::Receiver<Instant>>,
    deadline: Option<Instant>,
}

impl Stop {
    fn new(request: oneshot::Receiver<Instant>) -> Self {
        Stop {
            request: Some(request),
            deadline: None,
        }
    }

    /// Whether a stop was asked for (a dropped owner counts as asking, with no grace).
    fn asked(&mut self) -> bool {
        if self.deadline.is_none() {
            if let Some(request) = &mut self.request {
                match request.try_recv() {
                    Ok(deadline) => self.deadline = Some(deadline),
                    Err(oneshot::error::TryRecvError::Closed) => {
                        self.deadline = Some(Instant::now())
                    }
                    Err(oneshot::error::TryRecvError::Empty) => return false,
                }
                self.request = None;
            }
        }
        self.deadline.is_some()
    }

    /// Resolves when a stop is asked for.
    async fn requested(&mut self) {
        if self.asked() {
            return;
        }
        if let Some(request) = &mut self.request {
            let deadline = request.await.unwrap_or_else(|_| Instant::now());
            self.deadline = Some(deadline);
            self.request = None;
        }
    }

    /// Resolves when a stop was asked for and its grace is over.
    async fn expired(&mut self) {
        self.requested().await;
        if let Some(deadline) = self.deadline {
            tokio::time::sleep_until(deadline.into()).await;
        }
    }

    /// Whether the grace is over now.
    fn is_expired(&mut self) -> bool {
        self.asked()
            && self
                .deadline
                .is_some_and(|deadline| deadline <= Instant::now())
    }
}

/// Where the thread takes records from: the channel, and the one record that did not fit
/// the last batch's bytes, which starts the next.
struct Intake {
    records: mpsc::UnboundedReceiver<Queued>,
    held_over: Option<Queued>,
}

impl Intake {
    /// The next record if one is ready.
    fn try_next(&mut self) -> Result<Queued, mpsc::error::TryRecvError> {
        match self.held_over.take() {
            Some(queued) => Ok(queued),
            None => self.records.try_recv(),
        }
    }

    /// The next record, waiting for one; `None` once every sender is gone.
    async fn next(&mut self) -> Option<Queued> {
        match self.held_over.take() {
            Some(queued) => Some(queued),
            None => self.records.recv().await,
        }
    }

    /// Refuses new records and moves the ones that came in before into `batch`.
    fn close_into(&mut self, batch: &mut Vec<Queued>) {
        self.records.close();
        while let Ok(queued) = self.try_next() {
            batch.push(queued);
        }
    }
}

/// The thread's work: batch, post, settle, until stopped; then drop what is left.
async fn run(
    config: WebhookConfig,
    queue: Arc<Queue>,
    records: mpsc::UnboundedReceiver<Queued>,
    mut stop: Stop,
) {
    let mut poster = Poster::new(&config, queue.metrics.clone());
    let mut intake = Intake {
        records,
        held_over: None,
    };
    let mut batch = Vec::with_capacity(config.batch_max.max(1));
    while !stop.is_expired() {
        // A batch's first record: wait for one, or while stopping take only what is queued.
        let first = if stop.asked() {
            match intake.try_next() {
                Ok(queued) => queued,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                queued = intake.next() => match queued {
                    Some(queued) => queued,
                    None => {
                        stop.requested().await;
                        continue;
                    }
                },
                () = stop.requested() => continue,
            }
        };
        batch.push(first);
        gather(&mut intake, &mut batch, &config, &mut stop).await;
        let body = batch_body(&batch);
        let oldest = batch
            .iter()
            .map(|queued| queued.accepted)
            .min()
            .expect("a batch has its first record");
        queue.metrics.in_flight.add(1);
        let delivery = tokio::select! {
            delivery = poster.deliver(body, oldest + config.retry_max) => delivery,
            () = stop.expired() => Err(Undelivered::Stopped),
        };
        queue.metrics.in_flight.add(-1);
        queue.settle(&mut batch, delivery);
    }
    intake.close_into(&mut batch);
    queue.settle(&mut batch, Err(Undelivered::Stopped));
}

/// Adds to `batch` what is queued, and what arrives within the linger, up to the batch's
/// records and bytes; a record that would take it past its bytes starts the next batch.
async fn gather(
    intake: &mut Intake,
    batch: &mut Vec<Queued>,
    config: &WebhookConfig,
    stop: &mut Stop,
) {
    let linger_end = tokio::time::Instant::now() + config.batch_linger;
    let mut bytes: usize = batch.iter().map(|queued| queued.weight).sum();
    // Takes a record in, or holds it over; whether the batch may grow further.
    let mut take = |batch: &mut Vec<Queued>, intake: &mut Intake, queued: Queued| {
        if bytes + queued.weight > config.batch_max_bytes {
            intake.held_over = Some(queued);
            return false;
        }
        bytes += queued.weight;
        batch.push(queued);
        true
    };
    while batch.len() < config.batch_max {
        match intake.try_next() {
            Ok(queued) => {
                if take(batch, intake, queued) {
                    continue;
                }
                return;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => return,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        if stop.asked() || tokio::time::Instant::now() >= linger_end {
            return;
        }
        tokio::select! {
            queued = intake.next() => match queued {
                Some(queued) => {
                    if !take(batch, intake, queued) {
                        return;
                    }
                }
                None => return,
            },
            () = tokio::time::sleep_until(linger_end) => return,
            () = stop.requested() => return,
        }
    }
}

/// The JSON array of a batch's records.
fn batch_body(batch: &[Queued]) -> Bytes {
    let size = batch.iter().map(|queued| queued.weight + 1).sum::<usize>() + 2;
    let mut body = Vec::with_capacity(size);
    body.push(b'[');
    for (index, queued) in batch.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        queued.event.write_json(&mut body);
    }
    body.push(b']');
    Bytes::from(body)
}

/// Why one request got no answer.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("TLS: {0}")]
    Tls(io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("no answer within the timeout")]
    Timeout,
}

/// A kept-alive connection to the webhook: the request side, and the task driving the
/// socket, ended with it (a backend that never answers must not keep a socket per try).
struct Connection {
    requests: SendRequest<Full<Bytes>>,
    driver: tokio::task::AbortHandle,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Sends batches: one connection, retries, timeouts.
struct Poster {
    url: WebhookUrl,
    /// For an `https://` URL.
    tls: Option<TlsConnector>,
    secret: Vec<u8>,
    timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    connection: Option<Connection>,
    metrics: Arc<UpstreamMetrics>,
    warnings: LogLimiter,
}

impl Poster {
    fn new(config: &WebhookConfig, metrics: Arc<UpstreamMetrics>) -> Self {
        let tls = config.url.is_https().then(|| {
            let tls = config.tls.clone().unwrap_or_else(|| {
                tls_client_config(None).expect("the built-in roots make a TLS config")
            });
            TlsConnector::from(tls)
        });
        Poster {
            url: config.url.clone(),
            tls,
            secret: config.secret.clone(),
            timeout: config.timeout,
            backoff_min: config.backoff_min,
            backoff_max: config.backoff_max,
            connection: None,
            metrics,
            warnings: LogLimiter::new(WARN_INTERVAL),
        }
    }

    /// Posts `body` until it is delivered, rejected, or `give_up_at` (its oldest record's
    /// retry time) comes; not at all if that has passed.
    async fn deliver(&mut self, body: Bytes, give_up_at: Instant) -> Delivery {
        if Instant::now() >= give_up_at {
            return Err(Undelivered::RetriesExhausted);
        }
        let signature = HeaderValue::try_from(signature(&self.secret, &body))
            .expect("sha256= and hex digits are a valid header value");
        let mut retries = 0u32;
        loop {
            let failure = match self.attempt(body.clone(), &signature).await {
                Ok(status) if status.is_success() => return Ok(()),
                Ok(status)
                    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() =>
                {
                    format!("answered {status}")
                }
                Ok(status) => {
                    self.warn(&format!("answered {status}; batch dropped"));
                    return Err(Undelivered::Rejected(status.as_u16()));
                }
                Err(error) => error.to_string(),
            };
            let ceiling = self
                .backoff_min
                .saturating_mul(1 << retries.min(20))
                .min(self.backoff_max);
            let pause = ceiling.mul_f64(fastrand::f64());
            if Instant::now() + pause >= give_up_at {
                self.warn(&format!("{failure}; retry time over, batch dropped"));
                return Err(Undelivered::RetriesExhausted);
            }
            self.warn(&format!("{failure}; retrying"));
            tokio::time::sleep(pause).await;
            self.metrics.retries.inc();
            retries += 1;
        }
    }

    fn warn(&self, what: &str) {
        if let Some(suppressed) = self.warnings.allow(Instant::now()) {
            tracing::warn!(url = %self.url, suppressed, "webhook {what}");
        }
    }

    /// One request within the timeout, connecting first if needed; the status it got.
    async fn attempt(
        &mut self,
        body: Bytes,
        signature: &HeaderValue,
    ) -> Result<StatusCode, AttemptError> {
        self.metrics.requests.inc();
        let started = Instant::now();
        let answered = tokio::time::timeout(self.timeout, self.exchange(body, signature)).await;
        match answered {
            Ok(Ok(status)) => {
                self.metrics
                    .latency
                    .record(started.elapsed().as_nanos() as u64);
                Ok(status)
            }
            Ok(Err(error)) => {
                self.connection = None;
                Err(error)
            }
            Err(_) => {
                self.connection = None;
                Err(AttemptError::Timeout)
            }
        }
    }

    async fn exchange(
        &mut self,
        body: Bytes,
        signature: &HeaderValue,
    ) -> Result<StatusCode, AttemptError> {
        let mut connection = match self.connection.take() {
            Some(connection) if !connection.requests.is_closed() => connection,
            _ => self.connect().await?,
        };
        connection.requests.ready().await?;
        let request = Request::post(self.url.target.as_str())
            .header(HOST, self.url.authority.as_str())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("shardcast/", env!("CARGO_PKG_VERSION")))
            .header(SIGNATURE_HEADER, signature)
            .body(Full::new(body))
            .expect("the target and headers were checked at start");
        let response = connection.requests.send_request(request).await?;
        let status = response.status();
        let drained = Limited::new(response.into_body(), RESPONSE_BODY_MAX)
            .collect()
            .await
            .is_ok();
        if drained {
            self.connection = Some(connection);
        }
        Ok(status)
    }

    async fn connect(&self) -> Result<Connection, AttemptError> {
        let stream = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(AttemptError::Connect)?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => Self::handshake(stream).await,
            Some(tls) => {
                let name = ServerName::try_from(self.url.host.clone())
                    .map_err(|error| AttemptError::Connect(io::Error::other(error)))?;
                let stream = tls.connect(name, stream).await.map_err(AttemptError::Tls)?;
                Self::handshake(stream).await
            }
        }
    }

    /// HTTP/1.1 over a connected stream (TCP or TLS).
    async fn handshake<S>(stream: S) -> Result<Connection, AttemptError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (requests, driver) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            if let Err(error) = driver.await {
                tracing::debug!(%error, "webhook connection ended with an error");
            }
        });
        Ok(Connection {
            requests,
            driver: driver.abort_handle(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart_or_refused_with_a_reason() {
        let url = WebhookUrl::parse("http://hooks.local:8090/in?x=1").unwrap();
        assert_eq!(
            (
                url.host.as_str(),
                url.port,
                url.authority.as_str(),
                url.target.as_str()
            ),
            ("hooks.local", 8090, "hooks.local:8090", "/in?x=1")
        );
        assert_eq!(url.to_string(), "http://hooks.local:8090/in?x=1");
        let bare = WebhookUrl::parse("http://[::1]").unwrap();
        assert_eq!((bare.host.as_str(), bare.port), ("::1", 80));
        assert_eq!(bare.target, "/");
        let tls = WebhookUrl::parse("https://hooks.example/in").unwrap();
        assert_eq!((tls.is_https(), tls.port), (true, 443));
        assert_eq!(tls.to_string(), "https://hooks.example/in");
        for (bad, why) in [
            (
                "ftp://hooks.local/in",
                "must start with http:// or https://",
            ),
            ("/in", "must start with http://"),
            ("http://user:pw@hooks.local/", "credentials"),
            ("not a url", "is not a URL"),
        ] {
            let error = WebhookUrl::parse(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn signature_is_the_hex_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn queue_bounds_records_and_bytes() {
        let queue = Queue {
            max_records: 3,
            max_bytes: 100,
            records: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            metrics: Arc::default(),
        };
        assert!(queue.reserve(500), "an empty queue takes any record");
        assert!(!queue.reserve(1), "over the bytes");
        queue.release(500);
        assert!(queue.reserve(40) && queue.reserve(40));
        assert!(!queue.reserve(40), "over the bytes");
        assert!(queue.reserve(20));
        assert!(!queue.reserve(0), "over the records");
        assert_eq!(queue.metrics.queue_depth.get(), 3);
        assert_eq!(queue.metrics.queue_bytes.get(), 100);
    }
}
