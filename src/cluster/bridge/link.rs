//! The bridge's command connection: one multiplexed connection to a standalone Redis, or a
//! Redis Cluster connection that pipelines per primary.
//!
//! # Pipelines on a Redis Cluster
//! The bridge builds one pipeline per round trip whatever Redis it talks to. On a cluster
//! [`ClusterLink`] splits it by the primary that owns each command's slot (from its own
//! copy of the slot map, read with `CLUSTER SLOTS`), sends the parts to their primaries at
//! once, and puts the answers back in the pipeline's order, so a round trip still carries
//! thousands of messages and costs one write per primary. A command without a key
//! (`CLIENT CACHING YES`) travels with the keyed command after it: tracking opts in the
//! next command on the same connection. The split copies each command once: redis-rs
//! takes a part by value, and a redirected command must still be at hand to be sent again.
//!
//! A command whose slot moved is answered `MOVED` or `ASK` (or `TRYAGAIN` while a
//! migrating slot's keys are split): it is sent again on its own through redis-rs's
//! cluster routing, which follows the redirection (with `ASKING`) and retries, and the
//! slot map is read again before the next pipeline. A tracked read (the command after
//! `CLIENT CACHING YES`) is not sent again: untracked, its answer must not fill the route
//! cache, so it keeps its error and the message that needed it looks again.
//!
//! A lost connection to any primary ends the bridge's session (redis-rs reports it as a
//! `Disconnection` push, see [`super::Bridge::on_push`]): the primary failed over or
//! restarted, and the session is rebuilt from a fresh topology, exactly as a standalone
//! Redis's restart is survived.

use std::future::Future;
use std::sync::Arc;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, ProtocolVersion, RedisFuture, RedisResult, Value};

use crate::config::Config;

/// Hash slots in a Redis Cluster.
const SLOTS: usize = 16384;

/// Where the bridge connects, read once from the configuration.
pub(super) enum Endpoint {
    /// A standalone Redis.
    Single {
        /// For the pub/sub connection (RESP2). (Boxed: a client is large, and this is
        /// read once per session.)
        pubsub: Box<redis::Client>,
        /// For the command connection: RESP3 when the route cache is on, since Redis pushes
        /// its invalidations on the connection that read the routes (see `routes`).
        commands: Box<redis::Client>,
    },
    /// A Redis Cluster (`redis+cluster://`).
    Cluster {
        /// The seed nodes, as `redis://` URLs.
        seeds: Vec<String>,
        /// The same as `host:port`, where the slot map is asked for first.
        addresses: Vec<(String, u16)>,
    },
}

impl Endpoint {
    /// The endpoint `config.redis` names (validated at start).
    pub(super) fn of(config: &Config) -> std::io::Result<Endpoint> {
        if let Some(seeds) = config.redis_cluster_seeds() {
            let seeds = seeds.map_err(std::io::Error::other)?;
            let addresses = seeds.iter().filter_map(|seed| seed_address(seed)).collect();
            return Ok(Endpoint::Cluster { seeds, addresses });
        }
        let url = config.redis.as_deref().unwrap_or_default();
        let pubsub = redis::Client::open(url).map_err(std::io::Error::other)?;
        let commands = if config.route_cache_max > 0 {
            let info = pubsub.get_connection_info().clone();
            let resp3 = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            redis::Client::open(info.set_redis_settings(resp3)).map_err(std::io::Error::other)?
        } else {
            pubsub.clone()
        };
        Ok(Endpoint::Single {
            pubsub: Box::new(pubsub),
            commands: Box::new(commands),
        })
    }
}

/// A connection that runs the bridge's pipelines.
#[derive(Clone)]
pub(super) enum Link {
    Single(MultiplexedConnection),
    Cluster(ClusterLink),
}

impl Link {
    /// Runs `pipe` on every primary (the same commands on each: loading scripts, turning
    /// tracking on); answers the first primary's values. An error answer is an error.
    pub(super) async fn on_every_primary(&mut self, pipe: &Pipeline) -> RedisResult<Vec<Value>> {
        let answers = match self {
            Link::Single(conn) => vec![pipe.query_async(conn).await?],
            Link::Cluster(link) => {
                let mut answers = Vec::new();
                for primary in link.slots.primaries.clone() {
                    answers.push(link.on_primary(&primary, pipe.clone()).await?);
                }
                answers
            }
        };
        for values in &answers {
            if let Some(Value::ServerError(error)) = values
                .iter()
                .find(|value| matches!(value, Value::ServerError(_)))
            {
                return Err(error.clone().into());
            }
        }
        Ok(answers.into_iter().next().unwrap_or_default())
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(conn) => conn.req_packed_command(cmd),
            Link::Cluster(link) => link.conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Link::Cluster(link) => Box::pin(link.pipeline(pipeline)),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// One primary, as `CLUSTER SLOTS` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Primary {
    host: String,
    port: u16,
}

/// Which primary serves each slot.
#[derive(Debug)]
struct SlotMap {
    primaries: Vec<Primary>,
    /// Slot → index into `primaries`.
    owners: Vec<u16>,
}

impl SlotMap {
    /// Reads `CLUSTER SLOTS`' answer: `[[start, end, [host, port, id, …], replicas…], …]`,
    /// as `asked` (the host the question went to) answered it: an empty host is the
    /// answering node's own, which a node that never met another does not know.
    fn of(answer: &Value, asked: &str) -> Option<SlotMap> {
        let Value::Array(ranges) = answer else {
            return None;
        };
        let mut primaries: Vec<Primary> = Vec::new();
        let mut owners = vec![0u16; SLOTS];
        let mut covered = 0;
        for range in ranges {
            let Value::Array(fields) = range else {
                return None;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(node))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let host = match node.first()? {
                Value::BulkString(host) => String::from_utf8(host.clone()).ok()?,
                Value::SimpleString(host) => host.clone(),
                _ => return None,
            };
            let host = if host.is_empty() {
                asked.to_owned()
            } else {
                host
            };
            let Value::Int(port) = node.get(1)? else {
                return None;
            };
            let primary = Primary {
                host,
                port: u16::try_from(*port).ok()?,
            };
            let index = match primaries.iter().position(|p| *p == primary) {
                Some(index) => index,
                None => {
                    primaries.push(primary);
                    primaries.len() - 1
                }
            };
            let (start, end) = (usize::try_from(*start).ok()?, usize::try_from(*end).ok()?);
            if start > end || end >= SLOTS {
                return None;
            }
            owners[start..=end].fill(index as u16);
            covered += end - start + 1;
        }
        (covered == SLOTS && !primaries.is_empty()).then_some(SlotMap { primaries, owners })
    }
}

/// A Redis Cluster connection and the slot map the bridge splits its pipelines by.
#[derive(Clone)]
pub(super) struct ClusterLink {
    conn: ClusterConnection,
    slots: Arc<SlotMap>,
    /// Where the slot map is asked for (the seeds, then the primaries it names).
    seeds: Arc<Vec<(String, u16)>>,
}

impl ClusterLink {
    /// Reads the slot map through `conn`, asking the seeds (`host:port`) in turn.
    pub(super) async fn new(
        mut conn: ClusterConnection,
        seeds: Vec<(String, u16)>,
    ) -> RedisResult<ClusterLink> {
        let slots = read_slots(&mut conn, &seeds).await?;
        Ok(ClusterLink {
            conn,
            slots: Arc::new(slots),
            seeds: Arc::new(seeds),
        })
    }

    /// The connection, for sharded subscriptions.
    pub(super) fn connection(&self) -> ClusterConnection {
        self.conn.clone()
    }

    /// The primaries, as the slot map names them.
    pub(super) fn primaries(&self) -> usize {
        self.slots.primaries.len()
    }

    fn on_primary(
        &self,
        primary: &Primary,
        pipe: Pipeline,
    ) -> impl Future<Output = RedisResult<Vec<Value>>> + Send + 'static {
        let mut conn = self.conn.clone();
        let count = pipe.len();
        let route = SingleNodeRoutingInfo::ByAddress {
            host: primary.host.clone(),
            port: primary.port,
        };
        async move { conn.route_pipeline(pipe, 0, count, route).await }
    }

    /// Runs `pipeline` split per primary; answers in the pipeline's order (see the module
    /// docs).
    async fn pipeline(&mut self, pipeline: &Pipeline) -> RedisResult<Vec<Value>> {
        let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
        let mut parts: Vec<(Pipeline, Vec<usize>)> = (0..self.slots.primaries.len())
            .map(|_| (redis::pipe(), Vec::new()))
            .collect();
        let mut keyless = Vec::new();
        for (index, cmd) in commands.iter().enumerate() {
            match key_of(cmd) {
                None => keyless.push(index),
                Some(key) => {
                    let owner = self.slots.owners[usize::from(slot_of(key))] as usize;
                    let (pipe, indexes) = &mut parts[owner];
                    for waiting in keyless.drain(..) {
                        pipe.add_command(commands[waiting].clone());
                        indexes.push(waiting);
                    }
                    pipe.add_command((*cmd).clone());
                    indexes.push(index);
                }
            }
        }
        let (pipe, indexes) = &mut parts[0];
        for waiting in keyless {
            pipe.add_command(commands[waiting].clone());
            indexes.push(waiting);
        }
        let mut answers = vec![Value::Nil; commands.len()];
        // One task per primary: the parts travel at once.
        let mut sends = Vec::new();
        for (owner, (pipe, indexes)) in parts.into_iter().enumerate() {
            if !indexes.is_empty() {
                let send = self.on_primary(&self.slots.primaries[owner], pipe);
                sends.push((indexes, tokio::spawn(send)));
            }
        }
        for (indexes, send) in sends {
            let values = send.await.map_err(|_| super::lost_task())??;
            for (index, value) in indexes.into_iter().zip(values) {
                answers[index] = value;
            }
        }
        let mut moved = false;
        for index in 0..commands.len() {
            let Value::ServerError(error) = &answers[index] else {
                continue;
            };
            if !matches!(error.code(), "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN") {
                continue;
            }
            moved = true;
            let tracked_read = index > 0 && key_of(commands[index - 1]).is_none();
            if !tracked_read {
                // An error here (a failover under way, scripts missing on a new primary)
                // ends the session, which requeues the whole pipeline.
                answers[index] = self.conn.req_packed_command(commands[index]).await?;
            }
        }
        if moved {
            let mut ask: Vec<(String, u16)> = self
                .slots
                .primaries
                .iter()
                .map(|p| (p.host.clone(), p.port))
                .collect();
            ask.extend(self.seeds.iter().cloned());
            self.slots = Arc::new(read_slots(&mut self.conn, &ask).await?);
        }
        Ok(answers)
    }
}

/// `CLUSTER SLOTS`, asked of the first of `nodes` (`host:port`) that answers it.
async fn read_slots(conn: &mut ClusterConnection, nodes: &[(String, u16)]) -> RedisResult<SlotMap> {
    let mut last = None;
    for (host, port) in nodes {
        let mut ask = redis::cmd("CLUSTER");
        ask.arg("SLOTS");
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.clone(),
            port: *port,
        });
        match conn.route_command(ask, route).await {
            Ok(answer) => match SlotMap::of(&answer, host) {
                Some(map) => return Ok(map),
                None => {
                    last = Some(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "CLUSTER SLOTS left slots uncovered (the cluster is failing over or resharding)",
                    )))
                }
            },
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| {
        redis::RedisError::from((redis::ErrorKind::Client, "no Redis Cluster node to ask"))
    }))
}

/// A seed URL's `host:port` (`redis://host:port`, port 6379 when absent).
fn seed_address(seed: &str) -> Option<(String, u16)> {
    let address = seed.strip_prefix("redis://")?.split('/').next()?;
    let address = address.rsplit('@').next()?;
    match address.rsplit_once(':') {
        Some((host, port)) => Some((host.to_owned(), port.parse().ok()?)),
        None => Some((address.to_owned(), 6379)),
    }
}

/// The key a command is routed by: the first key of a script call, the channel of a
/// publication, the first argument of every other command the bridge sends; `None` for
/// commands about the connection (`PING`, `CLIENT`, `SCRIPT`, `CLUSTER`).
fn key_of(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        redis::Arg::Simple(bytes) => bytes,
        _ => &[][..],
    });
    let name = args.next()?;
    if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        let _script = args.next()?;
        let keys = std::str::from_utf8(args.next()?).ok()?;
        return (keys != "0").then(|| args.next()).flatten();
    }
    let connection_command = [&b"PING"[..], b"CLIENT", b"SCRIPT", b"CLUSTER", b"ASKING"]
        .iter()
        .any(|command| name.eq_ignore_ascii_case(command));
    if connection_command {
        return None;
    }
    args.next()
}

/// A key's hash slot: CRC16 (XMODEM) of its hash tag (the text between the first `{` and
/// the next `}`, when not empty) or of the whole key, modulo 16384.
pub(super) fn slot_of(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        assert_eq!(slot_of(b"sc:{u:ann}:user"), slot_of(b"sc:{u:ann}:mbox"));
    }

    #[test]
    fn commands_route_by_their_key() {
        let mut script = redis::cmd("EVALSHA");
        script.arg("abc").arg(2).arg("k1").arg("k2").arg("v");
        assert_eq!(key_of(&script), Some(&b"k1"[..]));
        let mut keyless = redis::cmd("EVALSHA");
        keyless.arg("abc").arg(0).arg("v");
        assert_eq!(key_of(&keyless), None);
        let mut caching = redis::cmd("CLIENT");
        caching.arg("CACHING").arg("YES");
        assert_eq!(key_of(&caching), None);
        let mut publish = redis::cmd("SPUBLISH");
        publish.arg("chan").arg("payload");
        assert_eq!(key_of(&publish), Some(&b"chan"[..]));
    }

    #[test]
    fn slot_maps_must_cover_every_slot() {
        let node = |port| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range =
            |start, end, port| Value::Array(vec![Value::Int(start), Value::Int(end), node(port)]);
        let full = Value::Array(vec![range(0, 8191, 7000), range(8192, 16383, 7001)]);
        let map = SlotMap::of(&full, "10.0.0.1").expect("a full map");
        assert_eq!(map.primaries.len(), 2);
        assert_eq!(map.owners[8191], 0);
        assert_eq!(map.owners[8192], 1);
        let partial = Value::Array(vec![range(0, 8191, 7000)]);
        assert!(SlotMap::of(&partial, "10.0.0.1").is_none());
        let lone = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(16383),
            Value::Array(vec![Value::BulkString(Vec::new()), Value::Int(7000)]),
        ])]);
        let map = SlotMap::of(&lone, "10.0.0.1").expect("a lone node's map");
        assert_eq!(map.primaries[0].host, "10.0.0.1", "its own, unknown host");
        assert_eq!(
            seed_address("redis://10.0.0.2:7001"),
            Some(("10.0.0.2".into(), 7001))
        );
        assert_eq!(seed_address("redis://h"), Some(("h".into(), 6379)));
    }
}
