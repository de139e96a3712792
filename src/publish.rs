//! Messages from outside the shards: the HTTP API and programs embedding a node push
//! through a [`Publisher`], which renders each message once, stamps it with a message id
//! and hands it to [`Router::route`] exactly as a client's `send`/`pub` is. A message for
//! a stream (a mailbox, a topic with history) enters as a template instead: alone,
//! its home shard appends it and renders it with its position. Clustered, it goes only to
//! Redis, which appends it and routes it to every node with recipients, this one included
//! ([`Reach::Streamed`]).

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;

use crate::cluster::{Bus, Outbound, StreamedMessage};
use crate::config::History;
use crate::metrics::{self, NodeMetrics};
use crate::protocol::{self, render, SharedMidGenerator};
use crate::router::{Envelope, Message, Reach, Route, Router, Template};

/// Who a message from outside the shards is for.
#[derive(Debug, Default, Clone, Copy)]
pub struct Target<'a> {
    /// Users: every device of each.
    pub users: &'a [&'a str],
    /// Topics: every subscriber of each.
    pub topics: &'a [&'a str],
    /// Every user connection of the node.
    pub broadcast: bool,
}

/// What [`Publisher::publish`] did.
#[derive(Debug)]
pub struct Published {
    /// The message id.
    pub mid: u64,
    /// Routes that could not be queued (a shard's inbox or the cluster bus was full).
    pub dropped: usize,
    /// Clustered with mailboxes: per bus message, its users and where Redis's answer of
    /// those with no live device comes (see [`Publisher::offline`]).
    offline: Vec<(Vec<Arc<str>>, OfflineAnswer)>,
}

/// The indexes of a bus message's users that had no live device, as Redis answered them.
type OfflineAnswer = tokio::sync::oneshot::Receiver<Vec<usize>>;

/// How long the API waits for Redis to say which recipients are offline: the message
/// waits in the bus queue while Redis is slow or down, and the publish answer should not.
const OFFLINE_WAIT: Duration = Duration::from_secs(2);

/// Which messages a node keeps in streams (in memory alone, in Redis clustered): they enter
/// routing as templates (see the module docs).
#[derive(Debug, Clone, Default)]
pub(crate) struct Streamed {
    /// Users have mailboxes.
    pub(crate) mailboxes: bool,
    /// Topic history rules.
    pub(crate) topics: Option<Arc<History>>,
}

/// Pushes server messages into the node from any thread. Frames are rendered once here
/// and handed to the home shards, exactly as a client's `send`/`pub` would be.
pub struct Publisher {
    router: Router,
    bus: Option<Bus>,
    metrics: NodeMetrics,
    mids: Arc<SharedMidGenerator>,
    streamed: Streamed,
}

impl Publisher {
    /// A publisher taking message ids from `mids` (the node's generator for ids made
    /// outside the shards) and routing through `router`; kicks go through `bus` to the
    /// other nodes.
    pub(crate) fn new(
        router: Router,
        bus: Option<Bus>,
        metrics: NodeMetrics,
        mids: Arc<SharedMidGenerator>,
        streamed: Streamed,
    ) -> Self {
        Publisher {
            router,
            bus,
            metrics,
            mids,
            streamed,
        }
    }

    /// Pushes `data` to `target`, on this node and (clustered) through the bus to the others.
    /// The message id is the same for every recipient; `dropped` counts the routes (one to
    /// each user's and topic's home shard, one to the bus per topic and per bus message of
    /// users, one per shard and one to the bus for a broadcast) that could not be queued
    /// because a shard's inbox or the bus was full (also counted in `drops{inbox_full}` or
    /// `bus_drops{bus_full}`).
    pub fn publish(&self, target: Target<'_>, data: &RawValue) -> Published {
        let ts = protocol::now_ms();
        let mid = self.mids.next(ts);
        // Hand-offs that fail are counted on shard 0's metrics (the sum over shards is what
        // the exporter shows).
        let metrics = self.metrics.shard(0);
        let route = |to: Route, message: Message, reach: Reach| {
            self.router.route(to, message, None, reach, metrics)
        };
        let mut dropped = 0;
        let mut offline = Vec::new();
        let mailboxes_in_redis = self.bus.as_ref().filter(|_| self.streamed.mailboxes);
        let direct = match target.users {
            [] => None,
            // A mailbox message is rendered on each user's home shard, with its position.
            _ if self.streamed.mailboxes => Some(Message::per_user(mid, template(ts, data))),
            // One recipient: one frame, rendered here once for every device on every node.
            [user] => Some(Message::new(
                mid,
                render::msg(None, user, mid, ts, data.get()),
            )),
            // Each recipient's frame names it: carry `data` once and render per recipient
            // as its sockets are written (see `router::Body`).
            _ => Some(Message::per_user(mid, template(ts, data))),
        };
        if let Some(message) = direct {
            let users: Vec<Arc<str>> = target.users.iter().map(|user| Arc::from(*user)).collect();
            match (mailboxes_in_redis, message.template()) {
                // Clustered mailboxes: Redis appends and routes it, and says who is offline.
                (Some(bus), Some(template)) if bus.is_up() => {
                    let streamed = StreamedMessage {
                        message: &message,
                        template,
                        except: None,
                        delivered_here: false,
                    };
                    dropped += bus.to_mailboxes(&users, streamed, |chunk| {
                        let (reply, answer) = tokio::sync::oneshot::channel();
                        offline.push((chunk.to_vec(), answer));
                        Some(reply)
                    });
                }
                // Redis down: delivered here at once, appended when Redis is back.
                (Some(_), Some(_)) => {
                    let to = Route::Users(users.into_iter().collect());
                    dropped += route(to, message, Reach::Streamed);
                }
                _ => {
                    let to = Route::Users(users.into_iter().collect());
                    dropped += route(to, message, Reach::Cluster);
                }
            }
        }
        let has_history = |topic: &&str| {
            let rules = self.streamed.topics.as_ref();
            rules.is_some_and(|rules| rules.rule_for(topic).is_some())
        };
        let publication = match target.topics {
            [] => None,
            [topic] if !has_history(topic) => Some(Message::new(
                mid,
                render::publication(Some(topic), mid, ts, data.get()),
            )),
            // Each topic's frame names it: render it on the topic's home shard, and only if
            // someone subscribes there (see `router::Body`).
            _ => Some(Message::per_topic(mid, template(ts, data))),
        };
        if let Some(message) = publication {
            for topic in target.topics {
                // Clustered, a topic with history is appended and published by Redis.
                let reach = if self.bus.is_some() && has_history(topic) {
                    Reach::Streamed
                } else {
                    Reach::Cluster
                };
                dropped += route(Route::Topic(Arc::from(*topic)), message.clone(), reach);
            }
        }
        if target.broadcast {
            let message = Message::new(mid, render::publication(None, mid, ts, data.get()));
            dropped += route(Route::Broadcast, message, Reach::Cluster);
        }
        Published {
            mid,
            dropped,
            offline,
        }
    }

    /// The recipients of `published` (sent to `users`) whose message waits in their
    /// mailbox because no device of theirs is online: clustered, as Redis answered when it
    /// appended the message (`None` when it did not answer within [`OFFLINE_WAIT`], or the
    /// bus is down); alone, those with no device on this node.
    pub async fn offline(&self, published: Published, users: &[&str]) -> Option<Vec<String>> {
        let Some(bus) = &self.bus else {
            return Some(self.offline_here(users).await);
        };
        if !bus.is_up() {
            return None;
        }
        let deadline = tokio::time::Instant::now() + OFFLINE_WAIT;
        let mut offline = Vec::new();
        for (chunk, answer) in published.offline {
            let indexes = tokio::time::timeout_at(deadline, answer).await.ok()?.ok()?;
            offline.extend(
                indexes
                    .into_iter()
                    .filter_map(|i| chunk.get(i).map(|user| user.to_string())),
            );
        }
        Some(offline)
    }

    /// The users among `users` with no device online on this node: on a lone node, those
    /// whose messages wait in their mailbox. Asks every home shard at once.
    async fn offline_here(&self, users: &[&str]) -> Vec<String> {
        let mesh = self.router.mesh();
        let answers: Vec<_> = users
            .iter()
            .map(|user| {
                let (reply, answer) = tokio::sync::oneshot::channel();
                let home = mesh.home(user);
                let envelope = Envelope::QueryUser {
                    user: Arc::from(*user),
                    reply,
                };
                mesh.to_shard(home, envelope, self.metrics.shard(home));
                answer
            })
            .collect();
        let mut offline = Vec::new();
        for (user, answer) in users.iter().zip(answers) {
            if answer.await == Ok(0) {
                offline.push((*user).to_owned());
            }
        }
        offline
    }

    /// How many connections `user` has on this node; `None` if the home shard's inbox is
    /// gone.
    pub async fn user_connections(&self, user: &str) -> Option<usize> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let mesh = self.router.mesh();
        let home = mesh.home(user);
        let envelope = Envelope::QueryUser {
            user: Arc::from(user),
            reply,
        };
        mesh.to_shard(home, envelope, self.metrics.shard(home));
        answer.await.ok()
    }

    /// Closes every connection of `user` with 4003: on this node, and through the bus on
    /// every other node that holds one. `false` if the bus dropped the kick (lane full).
    pub fn disconnect_user(&self, user: &str) -> bool {
        let user: Arc<str> = Arc::from(user);
        let code = crate::ws::close::KICKED;
        let sent = self.bus.as_ref().is_none_or(|bus| {
            bus.queue(Outbound::Kick {
                user: user.clone(),
                code,
            })
        });
        let mesh = self.router.mesh();
        let home = mesh.home(&user);
        let envelope = Envelope::CloseUser {
            user,
            code,
            reason: metrics::Close::Kicked,
        };
        mesh.to_shard(home, envelope, self.metrics.shard(home));
        sent
    }
}

/// A message's `data` and time, to be rendered per target.
fn template(ts: u64, data: &RawValue) -> Template {
    Template {
        ts,
        from: None,
        to: None,
        data: Arc::from(data.get()),
    }
}
