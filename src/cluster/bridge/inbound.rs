//! What reaches the bridge from outside: envelopes other nodes published, handed to the
//! home shards of their users and topics (retried copies dropped), and the API's and the
//! shards' cluster queries, answered from Redis. Streamed envelopes this node published
//! itself come back here too: that is how its own devices get them, numbered, in Redis's
//! order (see [`super::outbound`]).

use super::*;

/// The kind of a [`Body::History`] envelope in the memory of envelopes seen.
const HISTORY_KIND: u8 = 6;

/// How long a topic query waits for the nodes' answers.
const TOPIC_QUERY_TIMEOUT: Duration = Duration::from_millis(1000);

pub(super) fn answer_down(query: Query) {
    match query {
        Query::Presence { reply, .. } => {
            let _ = reply.send(Err(BusError::Down));
        }
        Query::Nodes { reply } => {
            let _ = reply.send(Err(BusError::Down));
        }
        Query::Topic { reply, .. } => {
            let _ = reply.send(Err(BusError::Down));
        }
        Query::Stream { reply, .. } => {
            let _ = reply.send(Err(BusError::Down));
        }
    }
}

fn presence_of(answer: Vec<Value>) -> Result<Presence, BusError> {
    let mut values = answer.into_iter();
    let Some(Value::Int(connections)) = values.next() else {
        return Err(BusError::Redis);
    };
    let mut nodes: Vec<String> = values
        .filter_map(|v| match v {
            Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
            _ => None,
        })
        .collect();
    nodes.sort();
    Ok(Presence {
        connections: connections.max(0) as u64,
        nodes,
    })
}

/// The route to every device of `users` (named in an envelope from another node).
fn users_of(users: Vec<String>) -> Route {
    Route::Users(users.into_iter().map(Arc::from).collect())
}

fn nodes_of(flat: &[String]) -> Vec<NodeInfo> {
    flat.chunks_exact(5)
        .map(|f| NodeInfo {
            node: f[0].clone(),
            ws: f[1].clone(),
            api: f[2].clone(),
            shards: f[3].parse().unwrap_or(0),
            connections: f[4].parse().unwrap_or(0),
        })
        .collect()
}

impl Bridge {
    pub(super) async fn read_loop(&self, incoming: &mut Incoming) -> Result<(), SessionError> {
        let stream = match incoming {
            Incoming::Single(stream) => stream,
            Incoming::Cluster => loop {
                let push = std::future::poll_fn(|cx| match self.pushes.borrow_mut().as_mut() {
                    Some(pushes) => pushes.poll_recv(cx),
                    None => Poll::Ready(None),
                })
                .await;
                match push {
                    Some(push) => self.on_push(push)?,
                    None => return Err(SessionError::Disconnected),
                }
            },
        };
        while let Some(message) = stream.next().await {
            let payload = Bytes::copy_from_slice(message.get_payload_bytes());
            self.state.metrics.bytes_in.add(payload.len() as u64);
            self.receive(payload);
        }
        Err(SessionError::SubscriptionLost)
    }

    /// Hands one envelope from another node to the shards that need it.
    pub(super) fn receive(&self, payload: Bytes) {
        let metrics = &self.state.metrics;
        let envelope = match wire::decode(payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                metrics.envelopes_invalid.inc();
                tracing::warn!(%error, "dropping an envelope this node cannot read");
                return;
            }
        };
        let own = envelope.origin == self.instance.get();
        let mesh = self.router.mesh();
        let shard_metrics = |shard: usize| self.metrics.shard(shard);
        // Other nodes got it from its origin: route it within this node only.
        let route = |to: Route, message: Message| {
            self.router
                .route(to, message, None, Reach::Node, shard_metrics(0))
        };
        match envelope.body {
            Body::Probe { .. } => {
                if own {
                    self.last_probe.set(Instant::now());
                }
                return;
            }
            // This node delivered its own topic publications and broadcasts locally.
            Body::Topic { .. }
            | Body::Broadcast { .. }
            | Body::User { .. }
            | Body::Direct { .. }
                if own =>
            {
                return
            }
            _ if !self.first_time(&envelope.body) => {
                metrics.duplicates.inc();
                return;
            }
            Body::Direct {
                mid,
                ts,
                from,
                users,
                data,
            } => {
                let template = Template {
                    ts,
                    from: from.map(Arc::from),
                    to: None,
                    data: Arc::from(data),
                };
                route(users_of(users), Message::per_user(mid, template));
            }
            Body::User { mid, users, frame } => {
                route(users_of(users), Message::new(mid, frame));
            }
            Body::Mailboxes {
                mid,
                ts,
                except,
                from,
                to,
                users,
                data,
                positions,
            } => {
                let template = Template {
                    ts,
                    from: from.map(Arc::from),
                    to: to.map(Arc::from),
                    data: Arc::from(data),
                };
                let message = Message::per_user(mid, template);
                // A connection id means something only on the node that made it.
                let except = except.filter(|_| own);
                for (user, at) in users.into_iter().zip(positions) {
                    // The envelope names every user of the message; most of a large
                    // publish's users have no device here.
                    if self.devices.borrow().contains_key(user.as_str()) {
                        self.route_to_mailbox(Arc::from(user), message.clone(), except, at);
                    }
                }
            }
            Body::History {
                mid,
                ts,
                topic,
                data,
                position,
            } => {
                let template = Template {
                    ts,
                    from: None,
                    to: None,
                    data: Arc::from(data),
                };
                let topic: Arc<str> = Arc::from(topic);
                let home = mesh.home(&topic);
                let route = Envelope::RouteTopic {
                    topic,
                    message: Message::per_topic(mid, template),
                    at: Some(position),
                };
                mesh.to_shard(home, route, shard_metrics(home));
            }
            Body::Topic { mid, topic, frame } => {
                route(Route::Topic(Arc::from(topic)), Message::new(mid, frame));
            }
            Body::Broadcast { mid, frame } => {
                route(Route::Broadcast, Message::new(mid, frame));
            }
            Body::Kick { user, code } => {
                let home = mesh.home(&user);
                mesh.to_shard(
                    home,
                    Envelope::CloseUser {
                        user: Arc::from(user),
                        code,
                        reason: metrics::Close::Kicked,
                    },
                    shard_metrics(home),
                );
            }
            Body::Evict { conn } => {
                self.close_local(conn, close::REPLACED, metrics::Close::Replaced);
            }
            Body::TopicQuery { request, topic } => {
                let router = self.router.clone();
                let metrics = self.metrics.clone();
                let node_id = self.identity.id.clone();
                let names = self.names.clone();
                let channel = self.names.instance_channel(envelope.origin);
                let instance = self.instance.get();
                let Some(mut conn) = self.commands.borrow().clone() else {
                    return;
                };
                tokio::task::spawn_local(async move {
                    let count = router
                        .mesh()
                        .topic_subscribers(&topic, &metrics)
                        .await
                        .unwrap_or(0);
                    let answer = wire::topic_count(instance, request, count as u64, &node_id);
                    let sent: Result<(), _> =
                        timed(names.publish(&channel, &answer).query_async(&mut conn)).await;
                    if let Err(error) = sent {
                        tracing::warn!(%error, "could not answer a topic query");
                    }
                });
            }
            Body::TopicCount {
                request,
                count,
                node,
            } => {
                if let Some(waiting) = self.topic_requests.borrow().get(&request) {
                    let _ = waiting.send((node, count));
                }
            }
        }
        metrics.envelopes_in.inc();
    }

    /// Whether a message envelope arrives for the first time (a retry can bring it twice).
    fn first_time(&self, body: &Body) -> bool {
        let (kind, mid, name) = match body {
            Body::User { mid, users, .. } => (1, *mid, users.first().map_or("", String::as_str)),
            Body::Direct { mid, users, .. } => (2, *mid, users.first().map_or("", String::as_str)),
            Body::Topic { mid, topic, .. } => (3, *mid, topic.as_str()),
            Body::Broadcast { mid, .. } => (4, *mid, ""),
            Body::Mailboxes { mid, users, .. } => {
                (5, *mid, users.first().map_or("", String::as_str))
            }
            Body::History { mid, topic, .. } => (HISTORY_KIND, *mid, topic.as_str()),
            _ => return true,
        };
        let now_ms = metrics::monotonic_ns() / 1_000_000;
        self.recent.borrow_mut().first_time(kind, mid, name, now_ms)
    }

    /// Remembers a publication to `topic`'s history that this node delivered itself, so
    /// the copy Redis publishes back on the topic's channel is dropped as seen.
    pub(super) fn delivered_here(&self, mid: u64, topic: &str) {
        let now_ms = metrics::monotonic_ns() / 1_000_000;
        self.recent
            .borrow_mut()
            .first_time(HISTORY_KIND, mid, topic, now_ms);
    }

    pub(super) async fn query_loop(
        self: &Rc<Self>,
        conn: Link,
        queries: &mut mpsc::Receiver<Query>,
    ) -> Result<(), SessionError> {
        while let Some(query) = queries.recv().await {
            let bridge = self.clone();
            let conn = conn.clone();
            tokio::task::spawn_local(async move { bridge.answer(query, conn).await });
        }
        std::future::pending().await
    }

    async fn answer(&self, query: Query, mut conn: Link) {
        self.state.metrics.commands.inc();
        match query {
            Query::Presence { user, reply } => {
                let answer = if self.names.is_cluster() {
                    self.cluster_presence(&user, &mut conn).await
                } else {
                    let cmd = self.scripts.presence(&user);
                    timed(cmd.query_async(&mut conn))
                        .await
                        .map_err(|_| BusError::Redis)
                        .and_then(presence_of)
                };
                let _ = reply.send(answer);
            }
            Query::Nodes { reply } => {
                let cmd = self.scripts.nodes();
                let answer: Result<Vec<String>, _> = timed(cmd.query_async(&mut conn)).await;
                let _ = reply.send(
                    answer
                        .map_err(|_| BusError::Redis)
                        .map(|flat| nodes_of(&flat)),
                );
            }
            Query::Topic { topic, reply } => {
                let _ = reply.send(self.topic_counts(&topic, &mut conn).await);
            }
            Query::Stream { read, reply } => {
                let cmd = self.read_cmd(&read);
                let answer: Result<Value, _> = timed(cmd.query_async(&mut conn)).await;
                let replay = answer.ok().as_ref().and_then(layout::replay_of);
                let _ = reply.send(replay.ok_or(BusError::Redis));
            }
        }
    }

    /// [`layout::PRESENCE`]'s answer on a Redis Cluster, where a user's devices and the
    /// leases live in different slots: the user's members, then the leases of their
    /// instances (`MGET`, all in the registry's slot), whose values are the node ids.
    async fn cluster_presence(&self, user: &str, conn: &mut Link) -> Result<Presence, BusError> {
        let members: Vec<String> = timed(
            redis::cmd("ZRANGE")
                .arg(self.names.user(user))
                .arg(0)
                .arg(-1)
                .query_async(conn),
        )
        .await
        .map_err(|_| BusError::Redis)?;
        let instances: Vec<u64> = members
            .iter()
            .filter_map(|member| layout::parse_device_member(member).map(|(inst, _)| inst))
            .collect();
        let mut distinct = instances.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let mut leases: Vec<Option<String>> = Vec::new();
        if !distinct.is_empty() {
            let mut read = redis::cmd("MGET");
            for instance in &distinct {
                read.arg(self.names.alive(*instance));
            }
            leases = timed(read.query_async(conn))
                .await
                .map_err(|_| BusError::Redis)?;
        }
        let node_of = |instance: &u64| {
            let at = distinct.binary_search(instance).ok()?;
            leases.get(at)?.as_deref()
        };
        let connections = instances.iter().filter(|i| node_of(i).is_some()).count() as u64;
        let mut nodes: Vec<String> = distinct
            .iter()
            .filter_map(node_of)
            .map(str::to_owned)
            .collect();
        nodes.sort();
        nodes.dedup();
        Ok(Presence { connections, nodes })
    }

    /// Asks every node subscribed to `topic` (through the topic's own channel: `PUBLISH`
    /// says how many nodes heard it) and gathers their counts.
    async fn topic_counts(
        &self,
        topic: &str,
        conn: &mut Link,
    ) -> Result<Vec<(String, u64)>, BusError> {
        let request = rand_u64();
        let (sender, mut answers) = mpsc::unbounded_channel();
        self.topic_requests.borrow_mut().insert(request, sender);
        let query = wire::topic_query(self.instance.get(), request, topic);
        let asked: Result<i64, SessionError> = timed(
            self.names
                .publish(&self.names.topic(topic), &query)
                .query_async(conn),
        )
        .await;
        let mut counts = Vec::new();
        if let Ok(nodes) = asked {
            let deadline = tokio::time::Instant::now() + TOPIC_QUERY_TIMEOUT;
            while counts.len() < nodes as usize {
                match tokio::time::timeout_at(deadline, answers.recv()).await {
                    Ok(Some(count)) => counts.push(count),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        self.topic_requests.borrow_mut().remove(&request);
        asked.map_err(|_| BusError::Redis)?;
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_answers_parse() {
        let answer = vec![
            Value::Int(3),
            Value::BulkString(b"b".to_vec()),
            Value::BulkString(b"a".to_vec()),
        ];
        assert_eq!(
            presence_of(answer),
            Ok(Presence {
                connections: 3,
                nodes: vec!["a".into(), "b".into()]
            })
        );
        assert_eq!(presence_of(vec![]), Err(BusError::Redis));
    }

    #[test]
    fn node_answers_parse() {
        let flat: Vec<String> = ["a", "127.0.0.1:1", "127.0.0.1:2", "2", "10"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let nodes = nodes_of(&flat);
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].connections, 10);
        assert_eq!(nodes[0].shards, 2);
    }
}
