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
    /// A `ZRANGE` of a user's devices right after `CLIENT CACHING YES`: fill the route
    /// cache (only if the tracking opt-in was accepted).
    Fill(Arc<str>),
    /// The `CLIENT CACHING YES` before a [`Answer::Fill`].
    Track,
    /// One of the publishes of a message routed by the cache; the last one settles the
    /// next message of [`Bridge::in_flight`].
    CachedPublish {
        /// The instance published to.
        instance: u64,
        /// It is the message's last publish.
        last: bool,
    },
    /// Redis Cluster: one of the mailbox appends of a message; the last one settles the
    /// next message of [`Bridge::in_flight`] (routed next with the positions).
    Appended {
        /// It is the message's last append.
        last: bool,
    },
    /// Redis Cluster: the deletion of the lease of an instance a publish was not heard by
    /// (`0`: it was dead already).
    Suspect(u64),
}

/// How one message goes into the pipeline.
enum Plan {
    /// One command (a script call or a publish), answered by one [`Answer::Message`].
    Command(redis::Cmd),
    /// Publishes to the instances the route cache names, one [`Answer::CachedPublish`]
    /// each.
    Cached(Vec<(u64, redis::Cmd)>),
    /// The route cache says no other node holds any of its users: finished at once.
    Nowhere,
    /// Redis Cluster: the route cache misses users, whose reads are in this pipeline; the
    /// message is routed after it.
    AfterFills,
    /// Redis Cluster: appends to the users' mailboxes, one [`Answer::Appended`] each; the
    /// message is routed after them, with the positions they answered.
    Appends(Vec<redis::Cmd>),
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
    /// Redis Cluster: messages to route once this pipeline is answered (their routes are
    /// read in it).
    after: Vec<Pending>,
}

/// How a batch's answers ended.
#[derive(Default)]
struct BatchOutcome {
    /// Messages to route again, in their order.
    retry: Vec<Pending>,
    /// Redis has lost the epoch or the scripts: the session must be rebuilt.
    broken: Option<SessionError>,
    /// Messages whose next step is ready (a Redis Cluster routes a message in steps).
    staged: Vec<Pending>,
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
            after: Vec::new(),
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
        conn: &mut Link,
        subscriptions: &mut Subscriptions,
    ) -> Result<bool, SessionError> {
        self.drain_pushes()?;
        let mut batch = Batch::new();
        for instance in self.suspects.borrow_mut().drain(..) {
            let mut lease = redis::cmd("DEL");
            lease.arg(self.names.alive(instance));
            batch.push(lease, Answer::Suspect(instance));
        }
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
        // Messages whose next step is due go out at once, not at the next wake-up.
        let due_now =
            self.retry_due.get().is_none() && !self.retry.borrow().is_empty() && !self.settling();
        Ok(taken == MAX_BATCH || due_now)
    }

    /// Adds one message for other nodes to `batch`, unless it waited too long.
    fn encode(&self, mut pending: Pending, batch: &mut Batch) {
        let instance = self.instance.get();
        if pending
            .outbound
            .entered_ns()
            .is_some_and(|at| self.too_old(at))
        {
            self.drop_pending(pending, BusDrop::Stale);
            return;
        }
        // Recipients the route cache knows no live device of.
        let mut unreachable = Vec::new();
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
                let plan = self.user_plan(
                    users,
                    recipients,
                    &payload,
                    &pending,
                    &mut unreachable,
                    batch,
                );
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
                let cluster = self.names.is_cluster();
                // Published back to this node too, unless it delivered the message itself.
                let own_instance = self.instance_hex.borrow();
                let skipped: &str = if *delivered_here { &own_instance } else { "" };
                let to = template.to.as_deref();
                let head = || {
                    wire::mailboxes_head(
                        instance,
                        message.mid,
                        template.ts,
                        *except,
                        template.from.as_deref(),
                        to,
                        users,
                    )
                };
                // A `send` (which names its recipient) has one recipient and the sender.
                let recipients = if to.is_some() { 1 } else { users.len() };
                match positions {
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
                        if cluster {
                            // One append per user, in its slot; routed once they answered.
                            let appends = users
                                .iter()
                                .enumerate()
                                .map(|(index, user)| {
                                    let senders_copy = index >= recipients;
                                    self.scripts.append_to_mailbox(user, &append, senders_copy)
                                })
                                .collect();
                            (Plan::Appends(appends), template.data.len())
                        } else {
                            let head = head();
                            let cmd = self.scripts.route_to_mailboxes(
                                users,
                                recipients,
                                skipped,
                                &self.epoch.borrow(),
                                &head,
                                &append,
                            );
                            (Plan::Command(cmd), head.len() + template.data.len())
                        }
                    }
                    Some(positions) => {
                        let mut payload = head().to_vec();
                        payload.extend_from_slice(template.data.as_bytes());
                        payload.extend_from_slice(&layout::positions_trailer(positions));
                        let plan = if cluster {
                            let include_self = !*delivered_here;
                            self.cluster_plan(
                                users,
                                recipients,
                                &payload,
                                include_self,
                                &mut unreachable,
                                batch,
                            )
                        } else {
                            Plan::Command(self.scripts.route(
                                users,
                                recipients,
                                skipped,
                                &self.epoch.borrow(),
                                &payload,
                            ))
                        };
                        (plan, payload.len())
                    }
                }
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
                let plan = self.user_plan(users, 0, &payload, &pending, &mut unreachable, batch);
                (plan, payload.len())
            }
            Outbound::Topic { topic, message } => {
                let payload = wire::topic(instance, message.mid, topic, &message.frame_for(topic));
                let cmd = self.names.publish(&self.names.topic(topic), &payload);
                (Plan::Command(cmd), payload.len())
            }
            Outbound::Broadcast { message } => {
                let payload = wire::broadcast(instance, message.mid, &message.shared_frame());
                let cmd = self.names.publish(&self.names.broadcast(), &payload);
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
        if matches!(plan, Plan::Cached(_) | Plan::Nowhere) {
            self.unreachable_recipients(&mut pending, unreachable);
        }
        let count = match &plan {
            Plan::Nowhere => return self.state.release(pending.size),
            Plan::AfterFills => return batch.after.push(pending),
            Plan::Command(_) => 1,
            Plan::Cached(publishes) => publishes.len(),
            Plan::Appends(appends) => appends.len(),
        };
        batch.bytes += (payload_len * count) as u64;
        batch.messages += 1;
        self.in_flight.borrow_mut().push(pending);
        match plan {
            Plan::Command(cmd) => batch.push(cmd, Answer::Message),
            Plan::Cached(publishes) => {
                for (index, (instance, cmd)) in publishes.into_iter().enumerate() {
                    let last = index + 1 == count;
                    batch.push(cmd, Answer::CachedPublish { instance, last });
                }
            }
            Plan::Appends(appends) => {
                for (index, cmd) in appends.into_iter().enumerate() {
                    let last = index + 1 == count;
                    batch.push(cmd, Answer::Appended { last });
                }
            }
            Plan::Nowhere | Plan::AfterFills => {}
        }
    }

    /// How a message to `users` (the first `recipients` of them its recipients) is routed:
    /// by the route cache when it knows every user (one publish per other instance holding
    /// any of them; recipients held nowhere go to `unreachable`), else by the route script,
    /// with a `ZRANGE` of each unknown user to fill the cache. On a Redis Cluster there is
    /// no route script: see [`Bridge::cluster_plan`].
    fn user_plan(
        &self,
        users: &[Arc<str>],
        recipients: usize,
        payload: &[u8],
        pending: &Pending,
        unreachable: &mut Vec<usize>,
        batch: &mut Batch,
    ) -> Plan {
        if self.names.is_cluster() {
            return self.cluster_plan(users, recipients, payload, false, unreachable, batch);
        }
        if !self.routes.borrow().enabled() || pending.skip_cache || self.fill_missing(users, batch)
        {
            return Plan::Command(self.route_cmd(users, recipients, payload));
        }
        self.cached_plan(users, recipients, payload, false, unreachable)
    }

    /// Redis Cluster: a message is routed by the route cache only (no script there can
    /// read other slots). Users it misses are read in this pipeline and the message is
    /// routed once it is answered. `include_self`: this node's instance gets it too (a
    /// mailbox message its own devices get numbered).
    fn cluster_plan(
        &self,
        users: &[Arc<str>],
        recipients: usize,
        payload: &[u8],
        include_self: bool,
        unreachable: &mut Vec<usize>,
        batch: &mut Batch,
    ) -> Plan {
        if self.fill_missing(users, batch) {
            return Plan::AfterFills;
        }
        self.cached_plan(users, recipients, payload, include_self, unreachable)
    }

    /// Adds a tracked read (`CLIENT CACHING YES`, `ZRANGE`) of every user the route cache
    /// misses to `batch`; whether there were any (counted as one miss).
    fn fill_missing(&self, users: &[Arc<str>], batch: &mut Batch) -> bool {
        let routes = self.routes.borrow();
        let mut missed = false;
        for user in users.iter().filter(|user| routes.get(user).is_none()) {
            missed = true;
            // Tracking is opt-in: only these reads are tracked, not the scripts'.
            let mut track = redis::cmd("CLIENT");
            track.arg("CACHING").arg("YES");
            batch.push(track, Answer::Track);
            let mut read = redis::cmd("ZRANGE");
            read.arg(self.names.user(user)).arg(0).arg(-1);
            batch.push(read, Answer::Fill(user.clone()));
        }
        if missed {
            self.state.metrics.route_cache_misses.inc();
        }
        missed
    }

    /// The publishes the route cache names for a message to `users` (all cached): one
    /// per instance holding any of them, this node's only when `include_self`, instances
    /// known dead skipped. Recipients held nowhere go to `unreachable`.
    fn cached_plan(
        &self,
        users: &[Arc<str>],
        recipients: usize,
        payload: &[u8],
        include_self: bool,
        unreachable: &mut Vec<usize>,
    ) -> Plan {
        self.state.metrics.route_cache_hits.inc();
        let routes = self.routes.borrow();
        let own = self.instance.get();
        let dead = self.known_dead.borrow();
        let mut targets = routes::Instances::new();
        for (index, user) in users.iter().enumerate() {
            let mut held = false;
            for &instance in routes.get(user).into_iter().flatten() {
                if dead.contains(&instance) {
                    continue;
                }
                held = true;
                if (instance != own || include_self) && !targets.contains(&instance) {
                    targets.push(instance);
                }
            }
            if index < recipients && !held {
                unreachable.push(index);
            }
        }
        if targets.is_empty() {
            return Plan::Nowhere;
        }
        let channel = |instance| self.names.instance_channel(instance);
        let publishes = targets
            .into_iter()
            .map(|instance| (instance, self.names.publish(&channel(instance), payload)))
            .collect();
        Plan::Cached(publishes)
    }

    /// Settles the recipients a routed message found no live device of: a mailbox
    /// message's are told to its sender (the API answers with them; always, once routed)
    /// and wait in their mailboxes; any other message's are counted `no_route`.
    fn unreachable_recipients(&self, pending: &mut Pending, unreachable: Vec<usize>) {
        match &mut pending.outbound {
            Outbound::Mailboxes { users, offline, .. } => {
                for &index in &unreachable {
                    if let Some(user) = users.get(index) {
                        self.shard_metrics(user).mailbox_offline.inc();
                    }
                }
                if let Some(offline) = offline.take() {
                    let _ = offline.send(unreachable);
                }
            }
            outbound => {
                if !unreachable.is_empty() {
                    let metrics = &self.state.metrics;
                    metrics.drops[BusDrop::NoRoute as usize].add(unreachable.len() as u64);
                    let mid = outbound.message().map(|m| m.mid);
                    self.state.log_drop(BusDrop::NoRoute, mid);
                }
            }
        }
    }

    /// Handles what Redis pushed since the last look (see [`Bridge::on_push`]).
    pub(super) fn drain_pushes(&self) -> Result<(), SessionError> {
        loop {
            let push = match self.pushes.borrow_mut().as_mut() {
                Some(pushes) => pushes.try_recv().ok(),
                None => None,
            };
            match push {
                Some(push) => self.on_push(push)?,
                None => return Ok(()),
            }
        }
    }

    /// One push from Redis on the command connection: a route invalidation (applied
    /// before the next pipeline is built, see `routes`), a lost connection (the session
    /// ends: tracking and subscriptions went with it), and on a Redis Cluster a sharded
    /// message from another node, or a sharded subscription Redis dropped (its slot
    /// moved; the session is rebuilt, which subscribes again where the slot is now).
    pub(super) fn on_push(&self, push: PushInfo) -> Result<(), SessionError> {
        match push.kind {
            PushKind::Invalidate => {
                // One array of keys, or nil: Redis flushed its whole tracking table.
                let keys = match push.data.first() {
                    Some(Value::Array(keys)) => Some(layout::bulk_strings(keys)),
                    _ => None,
                };
                let dropped = self.routes.borrow_mut().invalidate(keys.as_deref());
                self.state
                    .metrics
                    .route_cache_invalidations
                    .add(dropped as u64);
            }
            PushKind::SMessage | PushKind::Message => {
                let mut data = push.data;
                if data.len() >= 2 {
                    if let Value::BulkString(payload) = data.swap_remove(1) {
                        self.state.metrics.bytes_in.add(payload.len() as u64);
                        self.receive(Bytes::from(payload));
                    }
                }
            }
            PushKind::Disconnection => return Err(SessionError::Disconnected),
            PushKind::SUnsubscribe => {
                let channel = layout::bulk_strings(&push.data);
                if channel.first().is_some_and(|c| self.subscribed(c)) {
                    return Err(SessionError::SubscriptionLost);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether this node wants `channel` subscribed.
    fn subscribed(&self, channel: &str) -> bool {
        channel == self.names.broadcast()
            || channel == self.names.instance_channel(self.instance.get())
            || self
                .names
                .topic_of_channel(channel)
                .is_some_and(|topic| self.topics.borrow().contains(topic))
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

    async fn send_batch(&self, batch: Batch, conn: &mut Link) -> Result<(), SessionError> {
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
        outcome.staged = batch.after;
        let mut heard_all = true;
        let mut tracked = false;
        let mut positions = Vec::new();
        let mut appended = true;
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
                Answer::Track => tracked = !matches!(value, Value::ServerError(_)),
                Answer::Fill(user) => {
                    // Untracked (the opt-in was refused), a read must not be cached.
                    if let (true, Value::Array(members)) = (tracked, &value) {
                        let members = layout::bulk_strings(members);
                        self.routes.borrow_mut().fill(user, &members);
                    }
                    tracked = false;
                }
                Answer::CachedPublish { instance, last } => {
                    let heard = matches!(value, Value::Int(receivers) if receivers > 0);
                    if !heard && self.names.is_cluster() {
                        self.suspects.borrow_mut().push(instance);
                    }
                    heard_all &= heard;
                    if last {
                        if let Some(pending) = in_flight.next() {
                            self.settle_cached(pending, heard_all, &mut outcome);
                        }
                        heard_all = true;
                    }
                }
                Answer::Appended { last } => {
                    match layout::position_of(&value) {
                        Some(position) => positions.push(position),
                        None => {
                            if self.refused(&value, &mut outcome) {
                                appended = false;
                            }
                        }
                    }
                    if last {
                        if let Some(pending) = in_flight.next() {
                            let stage = std::mem::take(&mut positions);
                            self.settle_appends(pending, appended, stage, &mut outcome);
                        }
                        appended = true;
                    }
                }
                Answer::Suspect(instance) => {
                    if matches!(value, Value::Int(0)) {
                        let mut dead = self.known_dead.borrow_mut();
                        if !dead.contains(&instance) {
                            dead.push(instance);
                        }
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
        // Next steps go after the retries (both before anything new), and are no retries.
        self.stage_front(outcome.staged);
        self.requeue_front(outcome.retry);
        if let Some(broken) = outcome.broken {
            return Err(broken);
        }
        if !evictions.is_empty() {
            self.evict(&evictions, conn).await?;
        }
        Ok(())
    }

    /// Settles a message the route cache routed: finished when every publish was heard.
    /// Otherwise a standalone Redis routes it again by the script (which prunes the dead
    /// instance and finds the user's live devices); a Redis Cluster asks about the lease
    /// of the instance that did not hear it (see [`Answer::Suspect`]) and routes it again
    /// shortly, skipping it once it is known dead, until `bridge_hold_ms` runs out.
    fn settle_cached(&self, mut pending: Pending, heard_all: bool, outcome: &mut BatchOutcome) {
        if heard_all {
            self.state.release(pending.size);
        } else if !self.names.is_cluster() {
            pending.skip_cache = true;
            outcome.retry.push(pending);
        } else {
            self.retry_unheard(pending, outcome);
        }
    }

    /// A message met a node whose subscription was gone: routed again shortly, until that
    /// node's new instance has re-published its devices, or counted `unheard` once it
    /// waited `bridge_hold_ms`.
    fn retry_unheard(&self, mut pending: Pending, outcome: &mut BatchOutcome) {
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
    }

    /// Redis Cluster: settles a mailbox message's appends: with every position answered,
    /// it is routed next carrying them (a retry never appends again); a refused append
    /// drops it (counted), as a refused script call would.
    fn settle_appends(
        &self,
        mut pending: Pending,
        appended: bool,
        stage: Vec<Position>,
        outcome: &mut BatchOutcome,
    ) {
        match &mut pending.outbound {
            Outbound::Mailboxes {
                users, positions, ..
            } if appended && stage.len() == users.len() => {
                for user in users.iter() {
                    self.count_append(user);
                }
                *positions = Some(stage);
                outcome.staged.push(pending);
            }
            // The scripts are gone: appended again in the rebuilt session.
            _ if outcome.broken.is_some() => outcome.retry.push(pending),
            _ => self.drop_pending(pending, BusDrop::RedisError),
        }
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
                    self.retry_unheard(pending, outcome);
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
        for pending in &pendings {
            if let Outbound::Upstream(append) = &pending.outbound {
                append.metrics.retries.inc();
            }
        }
        self.stage_front(pendings);
    }

    /// Puts messages at the front of the retry queue, keeping their order, without
    /// counting them as retries (a Redis Cluster's next step for a message).
    fn stage_front(&self, pendings: Vec<Pending>) {
        let mut retry = self.retry.borrow_mut();
        for pending in pendings.into_iter().rev() {
            retry.push_front(pending);
        }
    }

    /// Closes devices the cluster device limit evicted: ours directly, others' through
    /// their node's channel.
    async fn evict(&self, members: &[String], conn: &mut Link) -> Result<(), SessionError> {
        let instance = self.instance.get();
        let mut pipe = redis::pipe();
        for member in members {
            let Some((owner, conn_id)) = layout::parse_device_member(member) else {
                continue;
            };
            if owner == instance {
                self.close_local(conn_id, close::REPLACED, metrics::Close::Replaced);
            } else {
                pipe.add_command(self.names.publish(
                    &self.names.instance_channel(owner),
                    &wire::evict(instance, conn_id),
                ))
                .ignore();
            }
        }
        if !pipe.is_empty() {
            let _: () = self.timed_query(&pipe, conn).await?;
        }
        Ok(())
    }
}
