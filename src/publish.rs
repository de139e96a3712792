//! Messages from outside the shards: the HTTP API and programs embedding a node push
//! through a [`Publisher`], which renders each message once, stamps it with a message id
//! and hands it to [`Router::route`] exactly as a client's `send`/`pub` is. A message for
//! a stream (a mailbox, a topic with history, on a lone node) enters as a template instead:
//! its home shard appends it and renders it with its position.

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::cluster::{Bus, Outbound};
use crate::config::{History, MAX_SHARDS};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The message id.
    pub mid: u64,
    /// Routes that could not be queued (a shard's inbox or the cluster bus was full).
    pub dropped: usize,
}

/// Which messages a node keeps in streams in memory (a lone node): they enter routing as
/// templates (see the module docs).
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
    mids: SharedMidGenerator,
    streamed: Streamed,
}

impl Publisher {
    /// A publisher for node number `node_number` (message ids) routing through `router`;
    /// kicks go through `bus` to the other nodes.
    pub(crate) fn new(
        router: Router,
        bus: Option<Bus>,
        metrics: NodeMetrics,
        node_number: u16,
        streamed: Streamed,
    ) -> Self {
        // The shard number past the last shard is reserved for ids made outside the shards.
        let mids = SharedMidGenerator::new(node_number, MAX_SHARDS);
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
        let route = |to: Route, message: Message| {
            self.router
                .route(to, message, None, Reach::Cluster, metrics)
        };
        let mut dropped = 0;
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
            let users = target.users.iter().map(|user| Arc::from(*user)).collect();
            dropped += route(Route::Users(users), message);
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
                dropped += route(Route::Topic(Arc::from(*topic)), message.clone());
            }
        }
        if target.broadcast {
            let message = Message::new(mid, render::publication(None, mid, ts, data.get()));
            dropped += route(Route::Broadcast, message);
        }
        Published { mid, dropped }
    }

    /// The users among `users` with no device online on this node: on a lone node, those
    /// whose messages wait in their mailbox. Asks every home shard at once.
    pub async fn offline(&self, users: &[&str]) -> Vec<String> {
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
