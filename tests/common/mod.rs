//! Helpers for integration tests: in-process nodes on free loopback ports and real
//! tungstenite clients with bounded waits.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
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
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for: {what}");
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
