//! Helpers for integration tests: in-process nodes on free loopback ports, `shardcast serve`
//! child processes, throwaway `redis-server`s, and real tungstenite clients with bounded waits.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
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
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (scripts/test installs it)");
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if child.try_wait().expect("try_wait").is_some() {
                return false;
            }
            if ping(&self.url()) {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "redis-server on port {} did not answer PING within {WAIT:?}",
            self.port
        );
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
        status == 200
            && reply["connections"] == connections
            && reply["nodes"] == serde_json::json!(nodes)
    });
}
