//! Messages for other nodes on their way to Redis: each one taken from the lane becomes a
//! command in the writer's next pipeline, and Redis's answer decides what becomes of it.
//!
//! # Every message accounted for
//! A message the bridge takes from the lane is finished exactly one way: routed (Redis
//! answered for it), or dropped and counted in `shardcast_bus_drops_total` with a reason
//! (its `mid` logged at most once a second). Until then it stays counted against
//! `bridge_queue_max_bytes`. What could otherwise vanish is retried instead, in order,
//! for at most `bridge_hold_ms` since the message entered the node:
//! - a pipeline in flight when the session dies (Redis stalled, connection lost) goes back
//!   to the front of the queue for the next session;
//! - a message routed under an epoch Redis no longer has waits for the rebuilt session (and
//!   for the cluster to settle, see [`crate::cluster::redis_layout`]) and is routed again;
//! - a message published to a node whose subscription was gone (it was reconnecting) is
//!   retried until that node's new instance has re-published its devices.
//!
//! A retry can reach a node that got the first copy; receivers drop what they have seen
//! ([`crate::cluster::dedupe`]). A direct message whose recipient has no live device anywhere is
//! counted `no_route`.
//!
//! # Streamed messages (protocol v1.1)
//! A mailbox message is one [`Scripts::route_to_mailboxes`] call and a publication to a
//! topic with history one [`Scripts::publish_to_history`] call, in the same pipeline as
//! everything else. Both publish to this node too (the mailbox script is called without
//! an own instance to skip; a topic channel reaches every subscribed node), so this node's
//! devices get the numbered frame in Redis's order (see [`crate::cluster::wire`]). Retries
//! never append twice: an unheard publish is retried with [`Scripts::route`] and the
//! positions Redis answered ([`layout::positions_trailer`]); a lost epoch appended nothing
//! and retries the whole call; a call whose reply was lost is repeated and the script
//! answers the positions it gave (the streams' latest `mid`). A mailbox recipient with no
//! live device is not a drop: its message waits in its mailbox (`mailbox_offline`). The
//! appends are counted on the stream's home shard's `stream_appends` of this node, the
//! node that made the message.
//!

use super::routes;
use super::*;
use crate::metrics::UpstreamMetrics;
use crate::upstream::Undelivered;

/// Messages sent in one pipeline at most; the rest wait for the next round trip.
const MAX_BATCH: usize = 4096;

/// How long a message that met a reconnecting node waits before it is routed again.
const UNHEARD_RETRY: Duration = Duration::from_millis(100);

/// What to do with one pipelined command's answer.
pub(super) enum Answer {
    /// Nothing (count errors only).
    Ignore,
    /// The next message of [`Bridge::in_flight`]: finish it, retry it or drop it, as the
    /// answer says.
    Message,
    /// [`layout::DEVICE_ONLINE`]'s: close the device members the cluster device limit
    /// evicted, announce the `online` it decided.
    DeviceAdded,
    /// Presence events a script decided: announce them.
    Presence,
    /// The mailbox position a new device of `user` is welcomed at.
    Welcome { user: Arc<str>, conn: ConnId },
    /// A stream read for a resume: where the answer goes.
    Read(tokio::sync::oneshot::Sender<Result<Replay, BusError>>),
    /// A `ZRANGE` of a user's devices: fill the route cache.
    Fill(Arc<str>),
    /// One of the publishes of a message routed by the cache; the last one settles the
    /// next message of [`Bridge::in_flight`].
    CachedPublish {
        /// It is the message's last publish.
        last: bool,
    },
}

/// How one message goes into the pipeline.
enum Plan {
    /// One command (a script call or a publish), answered by one [`Answer::Message`].
    Command(redis::Cmd),
    /// Publishes to the instances the route cache names, one [`Answer::CachedPublish`]
    /// each.
    Cached(Vec<redis::Cmd>),
    /// The route cache says no other node holds any of its users: finished at once.
    Nowhere,
}

/// One pipeline being built.
pub(super) struct Batch {
    pipe: redis::Pipeline,
    answers: Vec<Answer>,
    bytes: u64,
    messages: u64,
    /// The upstream sink's metrics, when the batch carries upstream records (it times
    /// their round trip).
    upstream: Option<Arc<UpstreamMetrics>>,
}

/// How a batch's answers ended.
#[derive(Default)]
struct BatchOutcome {
    /// Messages to route again, in their order.
    retry: Vec<Pending>,
    /// Redis has lost the epoch or the scripts: the session must be rebuilt.
    broken: Option<SessionError>,
}

impl Batch {
    pub(super) fn new() -> Self {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        Batch {
            pipe,
            answers: Vec::new(),
            bytes: 0,
            messages: 0,
            upstream: None,
        }
    }

    pub(super) fn push(&mut self, cmd: redis::Cmd, answer: Answer) {
        self.pipe.add_command(cmd);
        self.answers.push(answer);
    }
}

impl Bridge {
    /// Sends what the lanes hold as one pipeline. `true` if messages were left for the next.
    pub(super) async fn flush(
        &self,
        conn: &mut MultiplexedConnection,
        subscriptions: &mut Subscriptions,
    ) -> Result<bool, SessionError> {
        self.apply_invalidations();
        let mut batch = Batch::new();
        let mut touched_topics = Vec::new();
        while let Some(change) = self.inbox.try_control() {
            self.apply(change, Some(&mut batch), &mut touched_topics);
        }
        let mut taken = 0;
        if !self.settling() {
            let retry_due = self.retry_due.get().is_none_or(|due| due <= Instant::now());
            if retry_due {
                self.retry_due.set(None);
                while taken < MAX_BATCH {
                    let Some(pending) = self.retry.borrow_mut().pop_front() else {
                        break;
                    };
                    taken += 1;
                    self.encode(pending, &mut batch);
                }
            }
            while taken < MAX_BATCH {
                let Some(pending) = self.inbox.try_message() else {
                    break;
                };
                taken += 1;
                self.encode(pending, &mut batch);
            }
        }
        if let Err(error) = self.sync_topics(&touched_topics, subscriptions).await {
            self.requeue_in_flight();
            return Err(error);
        }
        if !batch.answers.is_empty() {
            self.send_batch(batch, conn).await?;
        }
        Ok(taken == MAX_BATCH)
    }

    /// Adds one message for other nodes to `batch`, unless it waited too long.
    fn encode(&self, pending: Pending, batch: &mut Batch) {
        let instance = self.instance.get();
        if pending
            .outbound
            .entered_ns()
            .is_some_and(|at| self.too_old(at))
        {
            self.drop_pending(pending, BusDrop::Stale);
            return;
        }
        let (plan, payload_len) = match &pending.outbound {
            Outbound::User { users, message } => {
                let (payload, recipients) = match &message.body {
                    router::Body::Frame(frame) => {
                        (wire::user(instance, message.mid, users, frame), 1)
                    }
                    // (A direct message is never rendered per topic.)
                    router::Body::PerUser(template) | router::Body::PerTopic(template) => (
                        wire::direct(
                            instance,
                            message.mid,
                            template.ts,
                            template.from.as_deref(),
                            users,
                            &template.data,
                        ),
                        users.len(),
                    ),
                };
                let plan = self.user_plan(users, recipients, &payload, &pending, batch);
                (plan, payload.len())
            }
            Outbound::Mailboxes {
                users,
                message,
                template,
                except,
                delivered_here,
                positions,
                ..
            } => {
                // Published back to this node too, unless it delivered the message itself.
                let skipped = if *delivered_here {
                    self.instance_hex.borrow().clone()
                } else {
                    String::new()
                };
                let to = template.to.as_deref();
                let head = wire::mailboxes_head(
                    instance,
                    message.mid,
                    template.ts,
                    *except,
                    template.from.as_deref(),
                    to,
                    users,
                );
                // A `send` (which names its recipient) has one recipient and the sender.
                let recipients = if to.is_some() { 1 } else { users.len() };
                let cmd = match positions {
                    None => {
                        let candidate = self.epochs.borrow_mut().next_epoch();
                        // Mailbox messages are made only while mailboxes are on (same config).
                        let retention = self.config.mailbox_retention().expect("mailboxes are on");
                        let append = StreamAppend {
                            candidate_ep: &candidate,
                            retention,
                            now_ms: protocol::now_ms(),
                            mid: message.mid,
                            ts: template.ts,
                            from: template.from.as_deref(),
                            to,
                            data: &template.data,
                        };
                        self.scripts.route_to_mailboxes(
                            users,
                            recipients,
                            &skipped,
                            &self.epoch.borrow(),
                            &head,
                            &append,
                        )
                    }
                    Some(positions) => {
                        let mut payload = head.to_vec();
                        payload.extend_from_slice(template.data.as_bytes());
                        payload.extend_from_slice(&layout::positions_trailer(positions));
                        self.scripts.route(
                            users,
                            recipients,
                            &skipped,
                            &self.epoch.borrow(),
                            &payload,
                        )
                    }
                };
                (Plan::Command(cmd), head.len() + template.data.len())
            }
            Outbound::History {
                topic,
                message,
                template,
                delivered_here,
            } => {
                if *delivered_here {
                    // The topic channel brings it back here: seen already.
                    self.delivered_here(message.mid, topic);
                }
                let head = wire::history_head(instance, message.mid, template.ts, topic);
                let candidate = self.epochs.borrow_mut().next_epoch();
                // History messages are made only for topics a rule covers (same config).
                let retention = self
                    .config
                    .history_rule_for(topic)
                    .expect("the topic has a history rule");
                let append = StreamAppend {
                    candidate_ep: &candidate,
                    retention,
                    now_ms: protocol::now_ms(),
                    mid: message.mid,
                    ts: template.ts,
                    from: None,
                    to: None,
                    data: &template.data,
                };
                let cmd = self.scripts.publish_to_history(topic, &head, &append);
                (Plan::Command(cmd), head.len() + template.data.len())
            }
            Outbound::Kick { user, code } => {
                let payload = wire::kick(instance, user, *code);
                let users = std::slice::from_ref(user);
                let plan = self.user_plan(users, 0, &payload, &pending, batch);
                (plan, payload.len())
            }
            Outbound::Topic { topic, message } => {
                let payload = wire::topic(instance, message.mid, topic, &message.frame_for(topic));
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(self.names.topic(topic)).arg(&payload[..]);
                (Plan::Command(cmd), payload.len())
            }
            Outbound::Broadcast { message } => {
                let payload = wire::broadcast(instance, message.mid, &message.shared_frame());
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(self.names.broadcast()).arg(&payload[..]);
                (Plan::Command(cmd), payload.len())
            }
            Outbound::Upstream(append) => {
                append.metrics.requests.inc();
                batch.upstream.get_or_insert_with(|| append.metrics.clone());
                let cmd = layout::xadd_record(
                    &self.names,
                    &append.record,
                    self.config.upstream_stream_maxlen,
                );
                (Plan::Command(cmd), append.weight)
            }
        };
        match plan {
            Plan::Nowhere => self.state.release(pending.size),
            Plan::Command(cmd) => {
                batch.bytes += payload_len as u64;
                batch.messages += 1;
                self.in_flight.borrow_mut().push(pending);
                batch.push(cmd, Answer::Message);
            }
            Plan::Cached(publishes) => {
                let count = publishes.len();
                batch.bytes += (payload_len * count) as u64;
                batch.messages += 1;
                self.in_flight.borrow_mut().push(pending);
                for (index, cmd) in publishes.into_iter().enumerate() {
                    let last = index + 1 == count;
                    batch.push(cmd, Answer::CachedPublish { last });
                }
            }
        }
    }

    /// How a message to `users` (the first `recipients` of them its recipients) is routed:
    /// by the route cache when it knows every user (one publish per other instance holding
    /// any of them; recipients held nowhere are counted `no_route`), else by the route
    /// script, with a `ZRANGE` of each unknown user to fill the cache.
    fn user_plan(
        &self,
        users: &[Arc<str>],
        recipients: usize,
        payload: &[u8],
        pending: &Pending,
        batch: &mut Batch,
    ) -> Plan {
        let routes = self.routes.borrow();
        if !routes.enabled() || pending.skip_cache {
            return Plan::Command(self.route_cmd(users, recipients, payload));
        }
        let metrics = &self.state.metrics;
        if users.iter().any(|user| routes.get(user).is_none()) {
            metrics.route_cache_misses.inc();
            for user in users.iter().filter(|user| routes.get(user).is_none()) {
                // Tracking is opt-in: only these reads are tracked, not the scripts'.
                let mut track = redis::cmd("CLIENT");
                track.arg("CACHING").arg("YES");
                batch.push(track, Answer::Ignore);
                let mut read = redis::cmd("ZRANGE");
                read.arg(self.names.user(user)).arg(0).arg(-1);
                batch.push(read, Answer::Fill(user.clone()));
            }
            return Plan::Command(self.route_cmd(users, recipients, payload));
        }
        metrics.route_cache_hits.inc();
        let own = self.instance.get();
        let cached = users.iter().filter_map(|user| routes.get(user));
        let no_route = cached
            .clone()
            .take(recipients)
            .filter(|instances| instances.is_empty())
            .count();
        if no_route > 0 {
            metrics.drops[BusDrop::NoRoute as usize].add(no_route as u64);
            let mid = pending.outbound.message().map(|m| m.mid);
            self.state.log_drop(BusDrop::NoRoute, mid);
        }
        let mut targets = routes::Instances::new();
        for instance in cached.flatten() {
            if *instance != own && !targets.contains(instance) {
                targets.push(*instance);
            }
        }
        if targets.is_empty() {
            return Plan::Nowhere;
        }
        let publishes = targets
            .into_iter()
            .map(|instance| {
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(self.names.instance_channel(instance)).arg(payload);
                cmd
            })
            .collect();
        Plan::Cached(publishes)
    }

    /// Applies the route invalidations Redis pushed since the last pipeline.
    fn apply_invalidations(&self) {
        let mut invalidations = self.invalidations.borrow_mut();
        let Some(pushes) = invalidations.as_mut() else {
            return;
        };
        let mut routes = self.routes.borrow_mut();
        while let Ok(push) = pushes.try_recv() {
            if push.kind != PushKind::Invalidate {
                continue;
            }
            // One array of keys, or nil: Redis flushed its whole tracking table.
            let keys = match push.data.first() {
                Some(Value::Array(keys)) => Some(layout::bulk_strings(keys)),
                _ => None,
            };
            let dropped = routes.invalidate(keys.as_deref());
            self.state
                .metrics
                .route_cache_invalidations
                .add(dropped as u64);
        }
    }

    /// Whether something that entered the node at `entered_ns` has waited longer than
    /// `bridge_hold_ms`.
    fn too_old(&self, entered_ns: u64) -> bool {
        let waited = metrics::monotonic_ns().saturating_sub(entered_ns);
        waited > self.config.bridge_hold_ms.saturating_mul(1_000_000)
    }

    /// Finishes a message the bridge gives up on: counted, logged (rate-limited), released.
    /// An upstream record is counted by its sink instead, and its ticket told.
    pub(super) fn drop_pending(&self, pending: Pending, reason: BusDrop) {
        self.state.release(pending.size);
        if let Outbound::Upstream(append) = pending.outbound {
            let undelivered = if self.state.stopping() {
                Undelivered::Stopped
            } else if reason == BusDrop::RedisError {
                Undelivered::RedisRefused
            } else {
                Undelivered::RetriesExhausted
            };
            append.settle(Err(undelivered));
            return;
        }
        self.state.metrics.dropped(reason);
        self.state
            .log_drop(reason, pending.outbound.message().map(|m| m.mid));
    }

    /// The route script call for a message to `users`, the first `recipients` of which are
    /// its recipients.
    fn route_cmd(&self, users: &[Arc<str>], recipients: usize, payload: &[u8]) -> redis::Cmd {
        self.scripts.route(
            users,
            recipients,
            &self.instance_hex.borrow(),
            &self.epoch.borrow(),
            payload,
        )
    }

    async fn send_batch(
        &self,
        batch: Batch,
        conn: &mut MultiplexedConnection,
    ) -> Result<(), SessionError> {
        let metrics = &self.state.metrics;
        metrics.bytes_out.add(batch.bytes);
        metrics.envelopes_out.add(batch.messages);
        let started = metrics::monotonic_ns();
        if let Some(upstream) = &batch.upstream {
            upstream.in_flight.add(1);
        }
        let answered = self.timed_query(&batch.pipe, conn).await;
        if let Some(upstream) = &batch.upstream {
            upstream.in_flight.add(-1);
            if answered.is_ok() {
                upstream
                    .latency
                    .record(metrics::monotonic_ns().saturating_sub(started));
            }
        }
        let answers: Vec<Value> = match answered {
            Ok(answers) => answers,
            Err(error) => {
                // Redis may or may not have run it: route it again in the next session
                // (receivers drop what they already got).
                self.requeue_in_flight();
                return Err(error);
            }
        };
        let mut outcome = BatchOutcome::default();
        let mut evictions = Vec::new();
        let mut in_flight = std::mem::take(&mut *self.in_flight.borrow_mut()).into_iter();
        let mut heard_all = true;
        for (answer, value) in batch.answers.into_iter().zip(answers) {
            match answer {
                Answer::Message => {
                    // One message per `Answer::Message`, pushed in the same order.
                    if let Some(pending) = in_flight.next() {
                        self.finish(pending, value, &mut outcome);
                    }
                }
                Answer::Welcome { user, conn } => {
                    let position = layout::replay_of(&value).and_then(|replay| {
                        let ep = replay.ep?;
                        Some(Position {
                            seq: replay.last_seq,
                            ep,
                        })
                    });
                    self.welcome(&user, conn, position);
                }
                Answer::Read(reply) => {
                    let _ = reply.send(layout::replay_of(&value).ok_or(BusError::Redis));
                }
                Answer::Fill(user) => {
                    if let Value::Array(members) = &value {
                        let members = layout::bulk_strings(members);
                        self.routes.borrow_mut().fill(user, &members);
                    }
                }
                Answer::CachedPublish { last } => {
                    heard_all &= matches!(value, Value::Int(receivers) if receivers > 0);
                    if last {
                        if let Some(mut pending) = in_flight.next() {
                            if heard_all {
                                self.state.release(pending.size);
                            } else {
                                // A dead instance: the script prunes it and finds the rest.
                                pending.skip_cache = true;
                                outcome.retry.push(pending);
                            }
                        }
                        heard_all = true;
                    }
                }
                _ if self.refused(&value, &mut outcome) => {}
                Answer::DeviceAdded => {
                    let added = layout::DeviceAdded::of(&value).unwrap_or_default();
                    evictions.extend(added.evicted);
                    self.announce(added.events);
                }
                Answer::Presence => self.announce(layout::presence_events(&value)),
                Answer::Ignore => {}
            }
        }
        // Redis answers every command of a pipeline; should an answer be missing, its
        // message is routed again rather than forgotten.
        outcome.retry.extend(in_flight);
        self.requeue_front(outcome.retry);
        if let Some(broken) = outcome.broken {
            return Err(broken);
        }
        if !evictions.is_empty() {
            self.evict(&evictions, conn).await?;
        }
        Ok(())
    }

    /// Whether Redis answered a command that is not a message with an error: counted and
    /// logged, and when the error says the scripts are gone, the session marked broken.
    fn refused(&self, value: &Value, outcome: &mut BatchOutcome) -> bool {
        let Value::ServerError(error) = value else {
            return false;
        };
        if error.code() == "NOSCRIPT" {
            outcome.broken = Some(SessionError::ScriptsLost);
        }
        self.state.metrics.errors.inc();
        tracing::warn!(error = %error.code(), "Redis refused a command");
        true
    }

    /// Settles one message by Redis's answer: finished, dropped and counted, or retried.
    fn finish(&self, mut pending: Pending, value: Value, outcome: &mut BatchOutcome) {
        let metrics = &self.state.metrics;
        // An upstream record's XADD answered its entry id; an error is refused below, as
        // any message's (`drop_pending` settles the record).
        if !matches!(value, Value::ServerError(_)) {
            if let Outbound::Upstream(append) = pending.outbound {
                self.state.release(pending.size);
                append.settle(Ok(()));
                return;
            }
        }
        let routed = match &value {
            Value::ServerError(error) if error.code() == "NOSCRIPT" => {
                outcome.broken = Some(SessionError::ScriptsLost);
                outcome.retry.push(pending);
                return;
            }
            Value::ServerError(error) => {
                metrics.errors.inc();
                tracing::warn!(error = %error.code(), "Redis refused a message");
                self.drop_pending(pending, BusDrop::RedisError);
                return;
            }
            // A topic publication or a broadcast: PUBLISH answers how many nodes heard it.
            Value::Int(_) => {
                self.state.release(pending.size);
                return;
            }
            reply => match &mut pending.outbound {
                Outbound::History { topic, .. } => {
                    if HistoryPublished::of(reply).is_some() {
                        self.count_append(topic);
                        self.state.release(pending.size);
                        return;
                    }
                    None
                }
                Outbound::Mailboxes {
                    users,
                    offline,
                    positions: positions @ None,
                    ..
                } => MailboxRouted::of(reply).map(|answer| {
                    if let Routed::Done { .. } = answer.routed {
                        for user in users.iter() {
                            self.count_append(user);
                        }
                        for &index in &answer.offline {
                            if let Some(user) = users.get(index) {
                                self.shard_metrics(user).mailbox_offline.inc();
                            }
                        }
                        if let Some(offline) = offline.take() {
                            let _ = offline.send(answer.offline);
                        }
                        *positions = Some(answer.positions);
                    }
                    answer.routed
                }),
                _ => Routed::of(reply),
            },
        };
        match routed {
            Some(Routed::EpochLost) => {
                outcome.broken = Some(SessionError::EpochLost);
                outcome.retry.push(pending);
            }
            Some(Routed::Done {
                no_route, unheard, ..
            }) => {
                let lost_route = unheard > 0 || (pending.lost_route && no_route > 0);
                if lost_route {
                    let expired = pending
                        .outbound
                        .entered_ns()
                        .is_some_and(|at| self.too_old(at));
                    if expired {
                        self.drop_pending(pending, BusDrop::Unheard);
                    } else {
                        pending.lost_route = true;
                        self.retry_due.set(Some(Instant::now() + UNHEARD_RETRY));
                        outcome.retry.push(pending);
                    }
                    return;
                }
                // A mailbox keeps what its offline recipients get later.
                let kept = matches!(pending.outbound, Outbound::Mailboxes { .. });
                if no_route > 0 && !kept {
                    metrics.drops[BusDrop::NoRoute as usize].add(no_route);
                    self.state
                        .log_drop(BusDrop::NoRoute, pending.outbound.message().map(|m| m.mid));
                }
                self.state.release(pending.size);
            }
            None => {
                metrics.errors.inc();
                tracing::warn!(answer = ?value, "unexpected answer to a routed message");
                self.drop_pending(pending, BusDrop::RedisError);
            }
        }
    }

    /// The metrics of the home shard of a user or topic (stream counters).
    fn shard_metrics(&self, name: &str) -> &metrics::ShardMetrics {
        self.metrics.shard(self.router.mesh().home(name))
    }

    /// Counts an append to the stream of a user or topic, as its home shard would alone.
    fn count_append(&self, name: &str) {
        self.shard_metrics(name).stream_appends.inc();
    }

    /// Puts the messages of a pipeline that was not answered back at the front of the retry
    /// queue.
    pub(super) fn requeue_in_flight(&self) {
        let in_flight = std::mem::take(&mut *self.in_flight.borrow_mut());
        if !in_flight.is_empty() {
            // Due at once: they go first in the next session.
            self.retry_due.set(None);
            self.requeue_front(in_flight);
        }
    }

    /// Puts messages back at the front of the retry queue, keeping their order.
    fn requeue_front(&self, pendings: Vec<Pending>) {
        self.state.metrics.retries.add(pendings.len() as u64);
        let mut retry = self.retry.borrow_mut();
        for pending in pendings.into_iter().rev() {
            if let Outbound::Upstream(append) = &pending.outbound {
                append.metrics.retries.inc();
            }
            retry.push_front(pending);
        }
    }

    /// Closes devices the cluster device limit evicted: ours directly, others' through
    /// their node's channel.
    async fn evict(
        &self,
        members: &[String],
        conn: &mut MultiplexedConnection,
    ) -> Result<(), SessionError> {
        let instance = self.instance.get();
        let mut pipe = redis::pipe();
        for member in members {
            let Some((owner, conn_id)) = layout::parse_device_member(member) else {
                continue;
            };
            if owner == instance {
                self.close_local(conn_id, close::REPLACED, metrics::Close::Replaced);
            } else {
                pipe.publish(
                    self.names.instance_channel(owner),
                    &wire::evict(instance, conn_id)[..],
                )
                .ignore();
            }
        }
        if !pipe.is_empty() {
            let _: () = self.timed_query(&pipe, conn).await?;
        }
        Ok(())
    }
}
