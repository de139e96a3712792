//! Helpers for integration tests: in-process nodes on free loopback ports, `shardcast serve`
//! child processes, throwaway `redis-server`s, and real tungstenite clients with bounded waits.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shardcast::{Config, Node};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);

pub const SECRET: &str = "test-secret";

/// A test configuration: dev mode, 2 unpinned shards, free ports on 127.0.0.1.
pub fn dev_config() -> Config {
    Config {
        dev: true,
        secret: Some(SECRET.into()),
        listen: "127.0.0.1:0".parse().expect("addr"),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        shards: 2,
        pin_shards: false,
        grace_period_ms: 2000,
        drain_window_ms: 0,
        // one_per_shard opens up to 64 devices of one user while probing for both shards.
        max_devices_per_user: 64,
        close_timeout_ms: 500,
        ..Config::default()
    }
}

/// A node that stops (gracefully) when dropped.
pub struct TestNode {
    pub node: Option<Node>,
    pub addr: SocketAddr,
}

impl TestNode {
    pub fn start(config: Config) -> TestNode {
        let node = Node::start(config).expect("node starts");
        let addr = node.local_addr();
        TestNode {
            node: Some(node),
            addr,
        }
    }

    pub fn node(&self) -> &Node {
        self.node.as_ref().expect("running")
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            node.stopper().stop();
            node.join();
        }
    }
}

pub type Ws = WebSocket<TcpStream>;

/// Connects to `url` with a read timeout so no test can hang.
pub fn connect_url(url: &str) -> Result<Ws, tungstenite::Error> {
    let uri: tungstenite::http::Uri = url.parse().expect("uri");
    let addr = format!(
        "{}:{}",
        uri.host().expect("host"),
        uri.port_u16().expect("port")
    );
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    tungstenite::client(url, stream)
        .map(|(ws, _)| ws)
        .map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => panic!("blocking handshake interrupted"),
        })
}

/// A dev-mode client of `user`, with its hello frame read.
pub struct Client {
    pub ws: Ws,
    pub hello: Value,
}

impl Client {
    pub fn dev(node: &TestNode, user: &str) -> Client {
        Self::from_ws(connect_url(&node.url(&format!("/ws?user={user}"))).expect("upgrade"))
    }

    pub fn from_ws(mut ws: Ws) -> Client {
        let hello = recv_json(&mut ws);
        assert_eq!(hello["op"], "hello", "{hello}");
        Client { ws, hello }
    }

    /// The shard this connection landed on (top byte of the connection id).
    pub fn shard(&self) -> u64 {
        let conn: u64 = self.hello["conn"]
            .as_str()
            .expect("conn")
            .parse()
            .expect("u64");
        conn >> 56
    }

    pub fn send(&mut self, value: Value) {
        self.ws
            .send(Message::text(value.to_string()))
            .expect("send");
    }

    pub fn recv(&mut self) -> Value {
        recv_json(&mut self.ws)
    }

    /// Sends a request and returns the reply (ack/err/pong).
    pub fn request(&mut self, value: Value) -> Value {
        self.send(value);
        self.recv()
    }

    /// Reads until the close frame; returns its code.
    pub fn expect_close(&mut self) -> u16 {
        expect_close(&mut self.ws)
    }

    /// Asserts nothing but control frames arrive for `quiet`.
    pub fn expect_silence(&mut self, quiet: Duration) {
        self.ws
            .get_mut()
            .set_read_timeout(Some(quiet))
            .expect("timeout");
        match self.ws.read() {
            Ok(Message::Text(t)) => panic!("unexpected message {t}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
        self.ws
            .get_mut()
            .set_read_timeout(Some(WAIT))
            .expect("timeout");
    }
}

/// Reads the next text message as JSON, skipping pings and pongs.
pub fn recv_json(ws: &mut Ws) -> Value {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match ws.read().expect("read") {
            Message::Text(text) => return serde_json::from_str(&text).expect("json"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
    panic!("no message within {WAIT:?}");
}

/// Reads until a close frame and returns its code; panics on anything unexpected.
pub fn expect_close(ws: &mut Ws) -> u16 {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => return u16::from(frame.code),
            Ok(Message::Close(None)) => return u16::from(CloseCode::Status),
            Ok(_) => continue,
            Err(e) => panic!("expected a close frame, got error {e}"),
        }
    }
    panic!("no close within {WAIT:?}");
}

/// Opens dev clients for `user` until one lands on each of the node's 2 shards.
pub fn one_per_shard(node: &TestNode, user: &str) -> (Client, Client) {
    let mut by_shard: [Option<Client>; 2] = [None, None];
    for _ in 0..64 {
        let client = Client::dev(node, user);
        let shard = client.shard() as usize;
        if by_shard[shard].is_none() {
            by_shard[shard] = Some(client);
        }
        if by_shard.iter().all(Option::is_some) {
            let [a, b] = by_shard;
            return (a.expect("shard 0"), b.expect("shard 1"));
        }
    }
    panic!("the kernel never spread 64 connections over both shards");
}

/// Polls `check` until it holds, for at most `WAIT`.
pub fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_within(WAIT, what, check);
}

/// Polls `check` until it holds, for at most `bound` (it is tried at least once).
pub fn eventually_within(bound: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    loop {
        if check() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {bound:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Signs a client token with the test secret.
pub fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`); returns the status and
/// the body as text.
pub fn http_text(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: api\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("write head");
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}

/// [`http_text`] without a key, with the body parsed as JSON (`null` if it is not JSON).
pub fn http_json(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let (status, text) = http_text(addr, method, path, None, body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A `shardcast serve` child process (dev flags are the caller's), killed if the test fails
/// midway. Its stderr lines arrive on `stderr`.
pub struct Process {
    pub child: Child,
    /// The client listener, from the start line's `listen=`.
    pub addr: String,
    /// The API listener, from the start line's `api_listen=`.
    pub api: SocketAddr,
    /// The node id, from the start line's `node_id=`.
    pub node_id: String,
    pub stderr: mpsc::Receiver<String>,
}

impl Process {
    /// Starts `shardcast serve` on free loopback ports with `args` and `env` (which override
    /// the test defaults) and waits for its start line.
    pub fn serve(args: &[&str], env: &[(&str, &str)]) -> Process {
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_shardcast")), args, env)
    }

    /// [`Process::serve`] with `RLIMIT_NOFILE` (soft and hard) set to `nofile` in the child
    /// before it execs, as `ulimit -n` would.
    pub fn serve_with_nofile(nofile: u64, args: &[&str], env: &[(&str, &str)]) -> Process {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(env!("CARGO_BIN_EXE_shardcast"));
        // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        };
        Self::spawn(command, args, env)
    }

    fn spawn(mut command: Command, args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut child = command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
            .args(args)
            .env("SHARDCAST_PIN_SHARDS", "false")
            .env("SHARDCAST_GRACE_PERIOD_MS", "3000")
            .env("SHARDCAST_DRAIN_WINDOW_MS", "1000")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shardcast");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        let line = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("start line");
            if line.contains("shardcast node started") {
                break line;
            }
        };
        let field = |key: &str| -> String {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no `{key}=` in the start line: {line}"))
                .to_owned()
        };
        Process {
            addr: field("listen"),
            api: field("api_listen").parse().expect("api address"),
            node_id: field("node_id"),
            child,
            stderr: rx,
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// Kills the node with SIGKILL (nothing cleaned up) and waits until it is gone.
    pub fn kill_abruptly(&mut self) {
        self.signal(libc::SIGKILL);
        assert!(!self.wait_exit().success());
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("node did not exit within {WAIT:?}");
    }

    pub fn client(&self, user: &str) -> Client {
        Client::from_ws(
            connect_url(&format!("ws://{}/ws?user={user}", self.addr)).expect("upgrade"),
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway `redis-server` on a free loopback port, with nothing saved to disk; killed on
/// drop.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        // Another process may take the probed port before redis-server binds it: try again.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let mut server = RedisServer { port, child: None };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Spawns redis-server on `self.port`; false if it exited (port taken) before answering.
    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (scripts/test installs it)");
        self.child = answering(child, &self.url(), || format!("port {}", self.port));
        self.child.is_some()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILLs the server and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL redis-server");
            child.wait().expect("reap redis-server");
        }
    }

    /// Sends `signal` to the server (SIGSTOP/SIGCONT to make it stall and resume).
    pub fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("redis-server running");
        // SAFETY: plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    }

    /// Kills the server (if running) and starts a new, empty one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "port {} was taken while redis was down",
            self.port
        );
    }

    /// A fresh synchronous connection, for inspecting what the nodes did.
    pub fn connection(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).expect("redis url");
        let con = client
            .get_connection_with_timeout(WAIT)
            .expect("connect to redis");
        con.set_read_timeout(Some(WAIT)).expect("timeout");
        con
    }

    /// `PUBSUB NUMSUB channel`: how many connections (nodes) are subscribed to `channel`.
    pub fn numsub(&self, channel: &str) -> u64 {
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(&mut self.connection())
            .expect("PUBSUB NUMSUB");
        counts.first().map_or(0, |(_, n)| *n)
    }
}

/// Waits until the redis-server `child` answers PING at `url`: `Some(child)` then, `None` if
/// it exited first (its port was taken); panics naming `which` if it does neither within
/// [`WAIT`].
fn answering(mut child: Child, url: &str, which: impl FnOnce() -> String) -> Option<Child> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if child.try_wait().expect("try_wait").is_some() {
            return None;
        }
        if ping(url) {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "redis-server on {} did not answer PING within {WAIT:?}",
        which()
    );
}

/// Whether a Redis server at `url` answers PING.
fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    client
        .get_connection_with_timeout(Duration::from_millis(200))
        .and_then(|mut con| redis::cmd("PING").query::<String>(&mut con))
        .is_ok_and(|pong| pong == "PONG")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster node's test configuration: [`dev_config`] joined to `redis_url` as `node_id`.
pub fn cluster_config(redis_url: &str, node_id: &str) -> Config {
    Config {
        redis: Some(redis_url.to_owned()),
        node_id: Some(node_id.to_owned()),
        ..dev_config()
    }
}

/// Starts `n` in-process nodes `n0`, `n1`, ... on `redis`, each from [`cluster_config`]
/// passed through `tweak`, and waits until they form one cluster (see [`await_cluster`]).
pub fn start_cluster(redis: &RedisServer, n: usize, tweak: impl Fn(&mut Config)) -> Vec<TestNode> {
    let nodes: Vec<TestNode> = (0..n)
        .map(|i| {
            let mut config = cluster_config(&redis.url(), &format!("n{i}"));
            tweak(&mut config);
            TestNode::start(config)
        })
        .collect();
    await_cluster(redis, &nodes);
    nodes
}

/// Waits until the node whose API listens on `api` answers `/readyz` with 200 (in cluster
/// mode: its Redis bus is up; until then cluster-wide API calls answer 503).
pub fn await_ready(api: SocketAddr) {
    eventually("the node is ready", || {
        http_text(api, "GET", "/readyz", None, b"").0 == 200
    });
}

/// Waits until every node in `nodes` is ready, subscribed to `shardcast:broadcast`, and sees
/// all of them (and no other) in `/v1/nodes`.
pub fn await_cluster(redis: &RedisServer, nodes: &[TestNode]) {
    for node in nodes {
        await_ready(node.node().api_addr());
    }
    let mut ids: Vec<&str> = nodes.iter().map(|n| n.node().node_id()).collect();
    ids.sort_unstable();
    eventually("every node subscribed to the broadcast channel", || {
        redis.numsub("shardcast:broadcast") == nodes.len() as u64
    });
    for node in nodes {
        eventually("every node registered", || {
            let (_, listed) = http_json(node.node().api_addr(), "GET", "/v1/nodes", b"");
            let mut seen: Vec<&str> = listed
                .as_array()
                .map(|a| a.iter().filter_map(|n| n["node"].as_str()).collect())
                .unwrap_or_default();
            seen.sort_unstable();
            seen == ids
        });
    }
}

/// Seconds since the Unix epoch (for token `exp` and `nbf`).
pub fn unix_now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Sends `request` as is on a fresh connection to `addr` and returns everything answered
/// until the server closes (or [`WAIT`] passes).
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.write_all(request).expect("write");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// How much bigger than their quick in-suite size the measuring tests run (`MEASURE_SCALE`,
/// default 1): BENCHMARKS.md quotes them at the scale it names. Not a `SHARDCAST_*`
/// variable, which the `shardcast serve` children would read as a setting.
pub fn measure_scale() -> u64 {
    std::env::var("MEASURE_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Waits until the stream a history endpoint (`history`, e.g.
/// `/v1/users/alice/history?limit=1`) reads stands at `seq` (publishing is asynchronous).
pub fn await_stream(api: SocketAddr, history: &str, seq: u64) {
    eventually(&format!("{history} at {seq}"), || {
        http_json(api, "GET", history, b"").1["seq"] == seq
    });
}

/// Reads frames until the `ack` answering `id`; returns the frames before it and the ack.
pub fn until_ack(client: &mut Client, id: &str) -> (Vec<Value>, Value) {
    let mut frames = Vec::new();
    for _ in 0..100_000 {
        let frame = client.recv();
        if frame["op"] == "ack" && frame["id"] == id {
            return (frames, frame);
        }
        frames.push(frame);
    }
    panic!("no ack {id}");
}

/// The `seq` of each streamed frame.
pub fn seqs(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| f["seq"].as_u64().expect("seq"))
        .collect()
}

/// A node's API address.
pub fn api(node: &TestNode) -> SocketAddr {
    node.node().api_addr()
}

/// A node's id.
pub fn id(node: &TestNode) -> &str {
    node.node().node_id()
}

/// `POST /v1/publish` of `body`, which must be accepted (202); returns the answer.
pub fn publish(api: SocketAddr, body: Value) -> Value {
    let (status, reply) = http_json(api, "POST", "/v1/publish", body.to_string().as_bytes());
    assert_eq!(status, 202, "{reply}");
    reply
}

/// A node in its own process under the id `doomed`, on the Redis at `redis_url`, with
/// `args` and `env` added, once ready: the node a test kills with SIGKILL.
pub fn serve_doomed(redis_url: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
    let mut all = vec!["--dev", "--redis", redis_url, "--node-id", "doomed"];
    all.extend_from_slice(args);
    let node = Process::serve(&all, env);
    await_ready(node.api);
    node
}

/// The users around a node about to be killed: bob on the survivor and on the doomed node,
/// dave on the doomed node only, and a sender on the survivor.
pub struct Bystanders {
    pub bob_here: Client,
    pub bob_there: Client,
    pub dave: Client,
    pub sender: Client,
}

impl Bystanders {
    /// Connects them, and waits until the survivor lists bob on both nodes.
    pub fn connect(survivor: &TestNode, doomed: &Process) -> Bystanders {
        let bystanders = Bystanders {
            bob_here: Client::dev(survivor, "bob"),
            bob_there: doomed.client("bob"),
            dave: doomed.client("dave"),
            sender: Client::dev(survivor, "sender"),
        };
        let node_id = survivor.node().node_id().to_owned();
        let mut both = ["doomed", node_id.as_str()];
        both.sort_unstable();
        await_presence(api(survivor), "bob", 2, &both);
        bystanders
    }
}

/// `GET /v1/users/{user}`, which must answer 200.
pub fn presence(api: SocketAddr, user: &str) -> Value {
    let (status, reply) = http_json(api, "GET", &format!("/v1/users/{user}"), b"");
    assert_eq!(status, 200, "{reply}");
    reply
}

/// Waits until `api` reports `user` with `connections` connections on exactly `nodes`.
pub fn await_presence(api: SocketAddr, user: &str, connections: u64, nodes: &[&str]) {
    await_presence_within(WAIT, api, user, connections, nodes);
}

/// [`await_presence`] within `bound` (an answer other than 200 is waited out too).
pub fn await_presence_within(
    bound: Duration,
    api: SocketAddr,
    user: &str,
    connections: u64,
    nodes: &[&str],
) {
    let what = format!("{user} on {nodes:?} with {connections} connections");
    eventually_within(bound, &what, || {
        let (status, reply) = http_json(api, "GET", &format!("/v1/users/{user}"), b"");
        status == 200 && reply["connections"] == connections && reply["nodes"] == json!(nodes)
    });
}

/// How long a Redis Cluster may take to form, fail over, come back or settle a migration
/// (`--cluster-node-timeout 1000`: a failover takes 2 to 3 s on loopback; an initial sync
/// well under 1 s with `--repl-diskless-sync-delay 0`).
pub const CLUSTER_WAIT: Duration = Duration::from_secs(20);

/// The number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// One `redis-server --cluster-enabled yes` process of a [`RedisCluster`].
struct ClusterProcess {
    port: u16,
    /// The cluster bus port, given with `--cluster-port` rather than left at `port + 10000`:
    /// that one may be taken (or above 65535 for a high free port).
    bus_port: u16,
    /// Its own directory: `nodes.conf` (and the log) live there, so a restart keeps its id.
    dir: std::path::PathBuf,
    /// None once killed.
    child: Option<Child>,
}

impl ClusterProcess {
    /// Spawns the process on its ports in its directory; false if it exited before answering
    /// PING (a port was taken meanwhile).
    fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.join("redis.log")).expect("redis log file");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-port", &self.bus_port.to_string()])
            .args(["--cluster-node-timeout", "1000"])
            .args(["--cluster-require-full-coverage", "yes"])
            // Any replica may be promoted, however long its link has been down.
            .args(["--cluster-replica-validity-factor", "0"])
            // The default waits 5 s for more replicas before a diskless initial sync.
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn redis-server (scripts/test installs it)");
        let url = format!("redis://127.0.0.1:{}/", self.port);
        self.child = answering(child, &url, || {
            let log = self.dir.join("redis.log");
            format!("port {} (see {})", self.port, log.display())
        });
        self.child.is_some()
    }

    /// SIGKILLs the process (by its pid) and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL redis-server");
            child.wait().expect("reap redis-server");
        }
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine {
    id: String,
    port: u16,
    flags: String,
    /// The primary's id, for a replica.
    primary: Option<String>,
    /// Slot ranges served (inclusive), without the `[slot->-id]` migration markers.
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn parse(line: &str) -> NodeLine {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 8, "short CLUSTER NODES line: {line}");
        // `127.0.0.1:port@bus_port[,hostname]`
        let port = fields[1]
            .split('@')
            .next()
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no port in CLUSTER NODES line: {line}"));
        let slots = fields[8..]
            .iter()
            .filter(|range| !range.starts_with('['))
            .map(|range| {
                let (from, to) = range.split_once('-').unwrap_or((range, range));
                (
                    from.parse().expect("slot number"),
                    to.parse().expect("slot number"),
                )
            })
            .collect();
        NodeLine {
            id: fields[0].to_owned(),
            port,
            flags: fields[2].to_owned(),
            primary: (fields[3] != "-").then(|| fields[3].to_owned()),
            slots,
        }
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.flags.split(',').any(|f| f == flag)
    }

    fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(from, to)| (from..=to).contains(&slot))
    }
}

/// A throwaway Redis Cluster on free loopback ports: `primaries` primaries with
/// `replicas_per_primary` replicas each, nothing saved to disk, every process in its own
/// temporary directory. Killed (by pid) and cleaned up on drop.
///
/// It is built by hand (`CLUSTER ADDSLOTSRANGE`, `SET-CONFIG-EPOCH`, `MEET`, `REPLICATE`)
/// rather than with `redis-cli --cluster create`, which refuses fewer than 3 primaries. A
/// failover needs a majority of the primaries alive to vote, so [`RedisCluster::kill_primary`]
/// is only useful with 3 primaries or more.
pub struct RedisCluster {
    /// Primaries first (in slot order), then the replicas of primary 0, 1, ... in turn, as
    /// started (roles change on failover).
    processes: Vec<ClusterProcess>,
    primaries: usize,
}

impl RedisCluster {
    /// Starts the processes, forms the cluster and waits until it is healthy: `cluster_state:ok`
    /// and all slots assigned on every node, every node known to every other, every replica's
    /// initial sync done.
    pub fn start(primaries: usize, replicas_per_primary: usize) -> RedisCluster {
        assert!(
            (1..=usize::from(SLOTS)).contains(&primaries),
            "a cluster needs 1 to 16384 primaries"
        );
        let total = primaries * (1 + replicas_per_primary);
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let cluster_dir = std::env::temp_dir().join(format!(
            "shardcast-rcluster-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&cluster_dir);
        let mut processes: Vec<ClusterProcess> = Vec::with_capacity(total);
        for i in 0..total {
            let dir = cluster_dir.join(i.to_string());
            std::fs::create_dir_all(&dir).expect("cluster node directory");
            // Another process may take a probed port before redis-server binds it: try again.
            let started = (0..5).find_map(|_| {
                let [port, bus_port] = free_ports::<2>(&processes);
                let mut process = ClusterProcess {
                    port,
                    bus_port,
                    dir: dir.clone(),
                    child: None,
                };
                process.spawn().then_some(process)
            });
            processes.push(started.unwrap_or_else(|| {
                panic!("cluster redis-server {i} did not start on any of 5 free port pairs")
            }));
        }
        let cluster = RedisCluster {
            processes,
            primaries,
        };
        cluster.form(replicas_per_primary);
        cluster.await_healthy("the new cluster");
        cluster
    }

    /// Assigns the slots, meets the nodes and attaches the replicas.
    fn form(&self, replicas_per_primary: usize) {
        let slots = usize::from(SLOTS);
        for (i, process) in self.processes[..self.primaries].iter().enumerate() {
            let mut con = self.connection(process.port);
            let from = i * slots / self.primaries;
            let to = (i + 1) * slots / self.primaries - 1;
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(from)
                .arg(to)
                .exec(&mut con)
                .expect("CLUSTER ADDSLOTSRANGE");
            // Distinct epochs up front, as `redis-cli --cluster create` does, rather than
            // leaving equal epochs to the collision rule.
            redis::cmd("CLUSTER")
                .arg("SET-CONFIG-EPOCH")
                .arg(i + 1)
                .exec(&mut con)
                .expect("CLUSTER SET-CONFIG-EPOCH");
        }
        let mut first = self.connection(self.processes[0].port);
        for process in &self.processes[1..] {
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(process.port)
                .arg(process.bus_port)
                .exec(&mut first)
                .expect("CLUSTER MEET");
        }
        let total = self.processes.len();
        eventually_within(CLUSTER_WAIT, "every cluster node knows every other", || {
            self.processes.iter().all(|p| {
                let view = self.nodes_view(p.port);
                view.len() == total
                    && view
                        .iter()
                        .all(|n| !n.has_flag("handshake") && !n.has_flag("noaddr"))
            })
        });
        for (r, replica) in self.processes[self.primaries..].iter().enumerate() {
            let primary = &self.processes[r / replicas_per_primary];
            redis::cmd("CLUSTER")
                .arg("REPLICATE")
                .arg(self.node_id(primary.port))
                .exec(&mut self.connection(replica.port))
                .expect("CLUSTER REPLICATE");
        }
    }

    /// Waits until every running node reports `cluster_state:ok` with all slots assigned,
    /// sees exactly `primaries` primaries serving slots and every other running node as a
    /// connected replica, and every replica's link to its primary is up.
    fn await_healthy(&self, what: &str) {
        let deadline = Instant::now() + CLUSTER_WAIT;
        loop {
            let Err(last) = self.health() else {
                return;
            };
            if Instant::now() >= deadline {
                panic!(
                    "{what}: the Redis Cluster was not healthy within {CLUSTER_WAIT:?}: {last} \
                     (logs under {})",
                    self.processes[0]
                        .dir
                        .parent()
                        .expect("cluster dir")
                        .display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ok, or why the cluster is not healthy (see [`RedisCluster::await_healthy`]).
    fn health(&self) -> Result<(), String> {
        let running: Vec<u16> = self.running().collect();
        for &port in &running {
            let info = self.cluster_info(port);
            if info.get("cluster_state").map(String::as_str) != Some("ok") {
                return Err(format!("{port}: cluster_state is not ok"));
            }
            if info.get("cluster_slots_assigned").map(String::as_str) != Some("16384") {
                return Err(format!("{port}: not every slot is assigned"));
            }
            let view = self.nodes_view(port);
            let serving = view
                .iter()
                .filter(|n| n.has_flag("master") && !n.slots.is_empty() && !n.has_flag("fail"))
                .count();
            if serving != self.primaries {
                return Err(format!("{port}: sees {serving} primaries serving slots"));
            }
            for node in view.iter().filter(|n| running.contains(&n.port)) {
                let ok = !node.has_flag("fail?")
                    && !node.has_flag("fail")
                    && (node.has_flag("slave") || !node.slots.is_empty());
                if !ok {
                    return Err(format!("{port} sees {}: {}", node.port, node.flags));
                }
            }
            let replication = self.info(port, "replication");
            if replication.get("role").map(String::as_str) == Some("slave")
                && replication.get("master_link_status").map(String::as_str) != Some("up")
            {
                return Err(format!("{port}: replica link not up"));
            }
        }
        Ok(())
    }

    /// The ports of the running processes.
    fn running(&self) -> impl Iterator<Item = u16> + '_ {
        self.processes
            .iter()
            .filter(|p| p.child.is_some())
            .map(|p| p.port)
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...`: every process, primaries and replicas.
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .processes
            .iter()
            .map(|p| format!("127.0.0.1:{}", p.port))
            .collect();
        format!("redis+cluster://{}", addrs.join(","))
    }

    /// Every process's port, as started (running or not).
    pub fn ports(&self) -> Vec<u16> {
        self.processes.iter().map(|p| p.port).collect()
    }

    /// The ports of the primaries serving slots now, as the cluster reports them (sorted).
    pub fn primary_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .view()
            .iter()
            .filter(|n| n.has_flag("master") && !n.has_flag("fail") && !n.slots.is_empty())
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The port of the primary serving `slot`.
    pub fn primary_of_slot(&self, slot: u16) -> u16 {
        self.view()
            .iter()
            .find(|n| n.has_flag("master") && !n.has_flag("fail") && n.serves(slot))
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"))
            .port
    }

    /// The port of the primary serving `key`'s slot.
    pub fn primary_of_key(&self, key: &str) -> u16 {
        self.primary_of_slot(self.keyslot(key))
    }

    /// `CLUSTER KEYSLOT key` (hash tags included).
    pub fn keyslot(&self, key: &str) -> u16 {
        let port = self.running().next().expect("a running node");
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.connection(port))
            .expect("CLUSTER KEYSLOT")
    }

    /// A fresh synchronous connection to the process on `port`, for inspecting it alone.
    pub fn connection(&self, port: u16) -> redis::Connection {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("redis url");
        let con = client
            .get_connection_with_timeout(WAIT)
            .unwrap_or_else(|e| panic!("connect to cluster node {port}: {e}"));
        con.set_read_timeout(Some(WAIT)).expect("timeout");
        con
    }

    /// SIGKILLs the primary on `port` (by pid). Its replica takes over within a few seconds
    /// if a majority of the primaries survive: see [`RedisCluster::await_failover`].
    pub fn kill_primary(&mut self, port: u16) {
        assert!(
            self.primary_ports().contains(&port),
            "{port} is not a primary serving slots"
        );
        self.process_mut(port).kill();
    }

    /// Waits until every surviving node sees none of the dead node's former slots served by
    /// it (a replica was promoted) and reports `cluster_state:ok` with all slots assigned.
    pub fn await_failover(&self, dead_port: u16) {
        assert!(
            !self.running().any(|p| p == dead_port),
            "{dead_port} is still running"
        );
        let what = format!(
            "a replica of {dead_port} promoted and cluster_state:ok everywhere (a failover \
             needs a majority of the {} primaries alive, and a replica)",
            self.primaries
        );
        eventually_within(CLUSTER_WAIT, &what, || {
            self.running().all(|port| {
                let info = self.cluster_info(port);
                info.get("cluster_state").map(String::as_str) == Some("ok")
                    && info.get("cluster_slots_assigned").map(String::as_str) == Some("16384")
                    && self
                        .nodes_view(port)
                        .iter()
                        .all(|n| n.port != dead_port || n.slots.is_empty())
            })
        });
    }

    /// Kills every process and starts each again on the same ports and directories: the
    /// nodes find each other again from their `nodes.conf` (ids, epochs, slots and roles are
    /// kept; a primary that failed over comes back as a replica), and the data is gone since
    /// nothing is saved. Waits until the cluster is healthy again (about 2 s on loopback).
    pub fn restart_all(&mut self) {
        for process in &mut self.processes {
            process.kill();
        }
        for process in &mut self.processes {
            assert!(
                process.spawn(),
                "port {} or {} was taken while the cluster was down",
                process.port,
                process.bus_port
            );
        }
        self.await_healthy("after restart_all");
    }

    /// Moves `slot` to the primary on `to_port` with its keys, live, as `redis-cli --cluster
    /// reshard` does: `IMPORTING` on the target, `MIGRATING` on the source, `MIGRATE` the keys
    /// in batches, then `SETSLOT ... NODE` on the target, the source and the other primaries.
    /// Waits until every running node sees the new owner.
    pub fn migrate_slot(&self, slot: u16, to_port: u16) {
        let from_port = self.primary_of_slot(slot);
        if from_port == to_port {
            return;
        }
        let from_id = self.node_id(from_port);
        let to_id = self.node_id(to_port);
        let mut source = self.connection(from_port);
        let mut target = self.connection(to_port);
        let setslot = |con: &mut redis::Connection, state: &str, id: &str| {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(id)
                .exec(con)
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {state} {id}: {e}"));
        };
        setslot(&mut target, "IMPORTING", &from_id);
        setslot(&mut source, "MIGRATING", &to_id);
        let mut moved = 0usize;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut source)
                .expect("CLUSTER GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            moved += keys.len();
            assert!(moved <= 1_000_000, "slot {slot} keeps refilling");
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to_port)
                .arg("")
                .arg(0)
                .arg(WAIT.as_millis() as u64)
                .arg("KEYS")
                .arg(&keys)
                .exec(&mut source)
                .expect("MIGRATE");
        }
        setslot(&mut target, "NODE", &to_id);
        setslot(&mut source, "NODE", &to_id);
        for port in self.primary_ports() {
            if port != from_port && port != to_port {
                setslot(&mut self.connection(port), "NODE", &to_id);
            }
        }
        eventually_within(
            CLUSTER_WAIT,
            &format!("every node sees slot {slot} on {to_port}"),
            || {
                self.running().all(|port| {
                    self.nodes_view(port)
                        .iter()
                        .any(|n| n.port == to_port && n.serves(slot))
                })
            },
        );
    }

    /// `PUBSUB SHARDNUMSUB channel`, asked of the primary serving the channel's slot: how many
    /// connections hold an `SSUBSCRIBE` to it there.
    pub fn numsub_sharded(&self, channel: &str) -> u64 {
        let port = self.primary_of_key(channel);
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(channel)
            .query(&mut self.connection(port))
            .expect("PUBSUB SHARDNUMSUB");
        counts.first().map_or(0, |(_, n)| *n)
    }

    fn process_mut(&mut self, port: u16) -> &mut ClusterProcess {
        self.processes
            .iter_mut()
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("no cluster process on {port}"))
    }

    fn node_id(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.connection(port))
            .expect("CLUSTER MYID")
    }

    /// `CLUSTER NODES` as the process on `port` sees it.
    fn nodes_view(&self, port: u16) -> Vec<NodeLine> {
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut self.connection(port))
            .expect("CLUSTER NODES");
        text.lines()
            .filter(|l| !l.is_empty())
            .map(NodeLine::parse)
            .collect()
    }

    /// The cluster as the first running primary sees it (it is told of slot moves first).
    fn view(&self) -> Vec<NodeLine> {
        let mut fallback = None;
        for port in self.running() {
            let view = self.nodes_view(port);
            if view
                .iter()
                .any(|n| n.has_flag("myself") && n.has_flag("master"))
            {
                return view;
            }
            fallback.get_or_insert(view);
        }
        fallback.expect("a running cluster node")
    }

    fn cluster_info(&self, port: u16) -> std::collections::HashMap<String, String> {
        let text: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query(&mut self.connection(port))
            .expect("CLUSTER INFO");
        info_fields(&text)
    }

    fn info(&self, port: u16, section: &str) -> std::collections::HashMap<String, String> {
        let text: String = redis::cmd("INFO")
            .arg(section)
            .query(&mut self.connection(port))
            .expect("INFO");
        info_fields(&text)
    }
}

impl Drop for ClusterProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Killed here rather than as each process drops: the directories go after them.
        for process in &mut self.processes {
            if let Some(mut child) = process.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(dir) = self.processes.first().and_then(|p| p.dir.parent()) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `field:value` lines of `INFO` or `CLUSTER INFO`.
fn info_fields(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.trim_end().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// `N` distinct loopback ports that were free a moment ago and are none of `taken`'s (the
/// probing listeners are held together so they differ).
fn free_ports<const N: usize>(taken: &[ClusterProcess]) -> [u16; N] {
    for _ in 0..10 {
        let listeners: Vec<TcpListener> = (0..N)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("free port"))
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("local addr").port())
            .collect();
        if !ports
            .iter()
            .any(|&p| taken.iter().any(|t| t.port == p || t.bus_port == p))
        {
            return ports.try_into().expect("N ports");
        }
    }
    panic!("no {N} free ports apart from the cluster's own");
}

/// The sum of every series of `name` (all label values) in a node's Prometheus text.
pub fn metric_sum(api: SocketAddr, name: &str) -> f64 {
    let (status, text) = http_text(api, "GET", "/metrics", None, b"");
    assert_eq!(status, 200);
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Checks a cluster-wide device limit of 2 over the first three of `nodes`: a third device
/// of one user, on a third node, replaces the oldest (closed with 4001) and the other two
/// stay.
pub fn assert_device_limit_of_two(nodes: &[TestNode]) {
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut first = Client::dev(a, "alice");
    await_presence(api(c), "alice", 1, &[id(a)]);
    let mut second = Client::dev(b, "alice");
    let mut sorted = [id(a), id(b)];
    sorted.sort_unstable();
    await_presence(api(c), "alice", 2, &sorted);

    let mut third = Client::dev(c, "alice");
    assert_eq!(first.expect_close(), 4001, "the oldest device is replaced");
    for device in [&mut second, &mut third] {
        assert_eq!(device.request(json!({"op":"ping"}))["op"], "pong");
    }
    let mut sorted = [id(b), id(c)];
    sorted.sort_unstable();
    await_presence(api(a), "alice", 2, &sorted);
}

/// Races a replay against live traffic. Another thread calls `publish(n)` for n = 1000,
/// 1001, ... every 200 µs (at most 2,000 times); 20 ms in, `request` (answered by an ack
/// with its `id`, which must say `recovered`) is sent on the client `connect` makes; 50 ms
/// after the ack the publisher stops. Then every frame, replayed or live, is read and the
/// seqs must be each of `after + 1 ..= published + sent` exactly once, then silence for
/// `quiet`. `published`: the messages in the stream before the race.
pub fn race_replay_against_publisher(
    publish: impl Fn(u64) + Send + 'static,
    connect: impl FnOnce() -> Client,
    request: Value,
    after: u64,
    published: u64,
    quiet: Duration,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) && sent < 2_000 {
                publish(1_000 + sent);
                sent += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    let mut client = connect();
    let id = request["id"].as_str().expect("the request's id").to_owned();
    client.send(request);
    let (mut frames, ack) = until_ack(&mut client, &id);
    assert_eq!(ack["recovered"], true, "{ack}");
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let sent = background.join().expect("publisher thread");
    let last = published + sent;
    while frames.len() < (last - after) as usize {
        frames.push(client.recv());
    }
    let got = seqs(&frames);
    let unique: std::collections::BTreeSet<u64> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "no duplicate");
    assert_eq!(unique, (after + 1..=last).collect(), "no gap");
    client.expect_silence(quiet);
}

/// Resumes `client`'s mailbox from its start and checks that it replays exactly one
/// message, `data` addressed to `to`, recovered.
pub fn assert_resumes_one(client: &mut Client, data: Value, to: &str) {
    client.send(json!({"op":"resume","id":"r","since":{"seq":0}}));
    let (replayed, ack) = until_ack(client, "r");
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0]["data"], data);
    assert_eq!(replayed[0]["to"], to);
    assert_eq!(ack["recovered"], true);
}
