//! Opening dev-mode client connections: one at a time ([`open`]) or many over threads
//! ([`open_many`]), and who each connection is ([`Population`]) and where it goes
//! ([`Spread`]: nodes and source addresses).
//!
//! A connection is counted as open once the TCP connect, the HTTP upgrade and the server's
//! first frame (`hello`) are done; that span is its handshake time. Sockets are blocking while
//! they open (with timeouts) and are handed to [`crate::readers`] afterwards.

use std::fmt;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// A client WebSocket over a plain TCP stream.
pub type Ws = WebSocket<TcpStream>;

/// Longest wait for one TCP connect, one upgrade or one reply.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames read while waiting for one particular reply (pings may come first).
const FRAMES_PER_REPLY: usize = 16;

/// The node's WebSocket endpoint: a loopback IPv4 address, a port and a path.
#[derive(Clone, Debug)]
pub struct Target {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// Request path, with any query the user gave.
    pub path: String,
}

impl FromStr for Target {
    type Err = anyhow::Error;

    fn from_str(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .context("the URL must start with ws:// (no TLS)")?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, "/ws"),
        };
        let addr: SocketAddr = authority
            .parse()
            .with_context(|| format!("{authority:?} is not IP:PORT"))?;
        ensure!(
            addr.ip().is_loopback(),
            "only loopback targets (127.0.0.0/8) are allowed"
        );
        Ok(Target {
            addr,
            path: path.to_owned(),
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ws://{}{}", self.addr, self.path)
    }
}

impl Target {
    /// The URL of a dev-mode connection for `user`.
    pub fn for_user(&self, user: &str) -> String {
        let separator = if self.path.contains('?') { '&' } else { '?' };
        format!("{self}{separator}user={user}")
    }
}

/// The moment a scenario gives up (`--timeout`).
#[derive(Clone, Copy, Debug)]
pub struct Deadline(Instant);

impl Deadline {
    /// `limit` from now.
    pub fn after(limit: Duration) -> Self {
        Deadline(Instant::now() + limit)
    }

    /// Time left (zero once it has passed).
    pub fn left(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// The moment itself.
    pub fn at(&self) -> Instant {
        self.0
    }

    /// Time left, or an error once it has passed.
    pub fn remaining(&self) -> Result<Duration> {
        let left = self.0.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "timed out (--timeout)");
        Ok(left)
    }

    /// Whether it has passed.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.0
    }

    /// `limit`, or less if the deadline comes first (never zero: sockets take zero as "none").
    pub fn cap(&self, limit: Duration) -> Duration {
        limit
            .min(self.0.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1))
    }
}

/// Checks that this process may hold `sockets` more descriptors, raising its soft
/// `RLIMIT_NOFILE` to the hard limit if needed.
pub fn raise_fd_limit(sockets: usize) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    let needed = sockets as u64 + 64;
    if limit.rlim_cur < needed && limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: raising the soft limit up to the hard limit needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
    }
    ensure!(
        limit.rlim_cur >= needed,
        "{sockets} sockets need RLIMIT_NOFILE >= {needed}; this process has {} \
         (use more worker processes: lower --per-process)",
        limit.rlim_cur
    );
    Ok(())
}

/// Refuses any source address outside `127.0.0.0/8`.
pub fn check_sources(sources: &[IpAddr]) -> Result<()> {
    ensure!(!sources.is_empty(), "--sources is empty");
    for source in sources {
        ensure!(
            matches!(source, IpAddr::V4(v4) if v4.is_loopback()),
            "source {source} is not in 127.0.0.0/8"
        );
    }
    Ok(())
}

/// Where connections go: connection `i` goes to URL `i % urls` from source
/// `(i / urls) % sources`, so every node sees every source address.
#[derive(Clone, Debug)]
pub struct Spread {
    /// The nodes' WebSocket endpoints.
    pub urls: Vec<Target>,
    /// Loopback source addresses.
    pub sources: Vec<IpAddr>,
}

impl Spread {
    /// The endpoint and source address of connection `i`.
    pub fn route(&self, i: usize) -> (&Target, IpAddr) {
        let url = &self.urls[i % self.urls.len()];
        let source = self.sources[(i / self.urls.len()) % self.sources.len()];
        (url, source)
    }
}

/// Who connection `i` is: the first `subs` connections are topic subscribers `s0`, `s1`, ...;
/// the rest are users `p0`, `p1`, ... (user `p{u}` is connection `subs + u`). With
/// `user_topics` (`p2p --to topics`), every user subscribes to its own topic `t-p{u}`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Population {
    /// Topic subscribers.
    pub subs: usize,
    /// Users that receive (and may send) direct messages.
    pub users: usize,
    /// The subscribers' topic.
    pub topic: String,
    /// Whether every user subscribes to its own topic ([`user_topic`]).
    #[serde(default)]
    pub user_topics: bool,
}

impl Population {
    /// Every connection.
    pub fn total(&self) -> usize {
        self.subs + self.users
    }

    /// Connection `i`'s user name.
    pub fn user_name(&self, i: usize) -> String {
        if i < self.subs {
            format!("s{i}")
        } else {
            user_name(i - self.subs)
        }
    }

    /// The topic connection `i` subscribes to, if any.
    pub fn topic_of(&self, i: usize) -> Option<String> {
        if i < self.subs {
            Some(self.topic.clone())
        } else {
            self.own_topic(i)
        }
    }

    /// Connection `i`'s own user topic, if it is a user and users subscribe to theirs.
    pub fn own_topic(&self, i: usize) -> Option<String> {
        (self.user_topics && i >= self.subs).then(|| user_topic(i - self.subs))
    }
}

/// The name of direct-message user `u`.
pub fn user_name(u: usize) -> String {
    format!("p{u}")
}

/// User `u`'s own topic (`p2p --to topics`): `t-` and its name.
pub fn user_topic(u: usize) -> String {
    format!("t-{}", user_name(u))
}

/// Opens one dev-mode connection for `user` from `source` and reads its `hello`.
pub fn open(target: &Target, source: IpAddr, user: &str, deadline: Deadline) -> Result<Ws> {
    ensure!(source.is_loopback(), "source {source} is not loopback");
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).context("socket")?;
    // Pick the local port at connect time, per destination: the same source address then
    // serves more than one port range's worth of sockets across destinations.
    set_bind_address_no_port(&socket);
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .with_context(|| format!("bind {source}"))?;
    socket
        .connect_timeout(&target.addr.into(), deadline.cap(IO_TIMEOUT))
        .with_context(|| format!("connect {} from {source}", target.addr))?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(deadline.cap(IO_TIMEOUT)))?;
    stream.set_write_timeout(Some(deadline.cap(IO_TIMEOUT)))?;
    // Small buffers: the load generator holds up to ~20,000 of these.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) =
        tungstenite::client::client_with_config(target.for_user(user), stream, Some(config))
            .map_err(|e| anyhow!("upgrade: {e}"))?;
    let hello = next_json(&mut ws).context("waiting for hello")?;
    ensure!(hello["op"] == "hello", "expected hello, got {hello}");
    Ok(ws)
}

/// Reads frames until a text frame arrives and parses it (pings in between are answered).
pub fn next_json(ws: &mut Ws) -> Result<Value> {
    for _ in 0..FRAMES_PER_REPLY {
        match ws.read()? {
            Message::Text(text) => {
                return serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
            }
            Message::Close(frame) => bail!("server closed the connection: {frame:?}"),
            _ => {}
        }
    }
    bail!("no text frame in {FRAMES_PER_REPLY} frames")
}

/// Sends `request` (which must carry `"id"`) and waits for its `ack`; an `err` is an error.
pub fn request(ws: &mut Ws, request: &Value) -> Result<Value> {
    ws.send(Message::text(request.to_string()))?;
    for _ in 0..FRAMES_PER_REPLY {
        let reply = next_json(ws)?;
        if reply["id"] != request["id"] {
            continue;
        }
        ensure!(reply["op"] == "ack", "{request} was refused: {reply}");
        return Ok(reply);
    }
    bail!("no reply to {request}")
}

/// Subscribes an open connection to `topic`.
pub fn subscribe(ws: &mut Ws, topic: &str) -> Result<()> {
    request(ws, &json!({"op": "sub", "topic": topic, "id": 1})).map(|_| ())
}

/// What [`open_many`] opened.
pub struct Opened {
    /// The connections, one group per thread, with their connection numbers.
    pub groups: Vec<Vec<(usize, Ws)>>,
    /// Handshake time of each connection (connect, upgrade, `hello`), microseconds.
    pub handshake_us: Histogram<u64>,
}

/// How [`open_many`] opens its connections.
pub struct Plan<'a> {
    /// Where connections go.
    pub spread: &'a Spread,
    /// Who they are.
    pub population: &'a Population,
    /// The connection numbers to open, in order.
    pub indices: &'a [usize],
    /// Threads opening them (and, later, reading them: one group each).
    pub threads: usize,
    /// Handshakes per second to stay under; 0 for as fast as the threads go.
    pub rate: f64,
}

/// Opens `plan.indices` over `plan.threads` threads; thread `t` opens positions `t`,
/// `t + threads`, ... and counts each open connection in `opened`. The first failure stops
/// every thread and is returned.
pub fn open_many(plan: &Plan<'_>, opened: &AtomicUsize, deadline: Deadline) -> Result<Opened> {
    ensure!(plan.threads > 0, "at least one thread is needed");
    let failed = AtomicBool::new(false);
    let started = Instant::now();
    let results: Vec<Result<Share>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..plan.threads)
            .map(|t| {
                let failed = &failed;
                scope.spawn(move || {
                    let result = open_share(plan, t, started, opened, deadline, failed);
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("opening thread panicked")))
            })
            .collect()
    });
    let mut groups = Vec::new();
    let mut handshake_us = Histogram::new(3)?;
    for result in results {
        let (group, histogram) = result?;
        handshake_us.add(histogram)?;
        groups.push(group);
    }
    Ok(Opened {
        groups,
        handshake_us,
    })
}

/// One thread's connections (with their numbers) and handshake times.
type Share = (Vec<(usize, Ws)>, Histogram<u64>);

/// One thread's share of [`open_many`]. Stops early (with what it has) when another failed.
fn open_share(
    plan: &Plan<'_>,
    thread: usize,
    started: Instant,
    opened: &AtomicUsize,
    deadline: Deadline,
    failed: &AtomicBool,
) -> Result<Share> {
    let mut group = Vec::with_capacity(plan.indices.len() / plan.threads + 1);
    let mut handshake_us = Histogram::new(3)?;
    for position in (thread..plan.indices.len()).step_by(plan.threads) {
        if failed.load(Ordering::Relaxed) {
            break;
        }
        deadline.remaining().with_context(|| {
            format!(
                "{} of {} connections opened",
                opened.load(Ordering::Relaxed),
                plan.indices.len()
            )
        })?;
        if plan.rate > 0.0 {
            let due = started + Duration::from_secs_f64(position as f64 / plan.rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let i = plan.indices[position];
        let (url, source) = plan.spread.route(i);
        let user = plan.population.user_name(i);
        let began = Instant::now();
        let mut ws = open(url, source, &user, deadline)
            .with_context(|| format!("connection {i} ({user} from {source} to {url})"))?;
        handshake_us.saturating_record(began.elapsed().as_micros() as u64);
        if let Some(topic) = plan.population.topic_of(i) {
            subscribe(&mut ws, &topic).with_context(|| format!("subscribing {user}"))?;
        }
        group.push((i, ws));
        opened.fetch_add(1, Ordering::Relaxed);
    }
    Ok((group, handshake_us))
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (Linux 4.2+); without it, bind picks a port at once.
fn set_bind_address_no_port(socket: &Socket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, option and int-sized value; failure only means bind picks the
    // port early, which is still correct.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loopback_urls_only() {
        let t: Target = "ws://127.0.0.1:9000/ws".parse().expect("valid");
        assert_eq!(t.addr, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(t.for_user("u1"), "ws://127.0.0.1:9000/ws?user=u1");
        let t: Target = "ws://127.0.0.1:9000".parse().expect("no path");
        assert_eq!(t.path, "/ws");
        let t: Target = "ws://127.0.0.1:9000/ws?x=1".parse().expect("query");
        assert_eq!(t.for_user("a"), "ws://127.0.0.1:9000/ws?x=1&user=a");
        assert!("ws://10.0.0.1:9000/ws".parse::<Target>().is_err());
        assert!("wss://127.0.0.1:9000/ws".parse::<Target>().is_err());
        assert!("ws://localhost:9000/ws".parse::<Target>().is_err());
    }

    #[test]
    fn users_subscribe_to_their_own_topics_only_when_asked() {
        let mut population = Population {
            subs: 2,
            users: 3,
            topic: "bench".into(),
            user_topics: false,
        };
        assert_eq!(population.topic_of(1).as_deref(), Some("bench"));
        assert_eq!(population.topic_of(2), None);
        population.user_topics = true;
        assert_eq!(population.topic_of(1).as_deref(), Some("bench"));
        assert_eq!(population.own_topic(1), None);
        assert_eq!(population.topic_of(3).as_deref(), Some("t-p1"));
        assert_eq!(population.own_topic(4).as_deref(), Some("t-p2"));
    }
}
