//! Protocol v1.1's browser-friendly handshake and token lifetime: the `shardcast.v1`
//! subprotocol, credential failures as close codes 4401/4402, `hello.exp`, closing at
//! `exp`, `refresh`, and the `id` rules.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::json;
use tungstenite::client::IntoClientRequest;

/// Opens `path_and_query` offering `protocols` in `Sec-WebSocket-Protocol`; returns the
/// socket and the subprotocol the node answered.
fn connect_offering(
    node: &TestNode,
    path_and_query: &str,
    protocols: &str,
) -> (Ws, Option<String>) {
    let mut request = node
        .url(path_and_query)
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        protocols.parse().expect("header value"),
    );
    let stream = TcpStream::connect(node.addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let (ws, response) = tungstenite::client(request, stream).expect("upgrade");
    let answered = response
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().expect("ascii").to_owned());
    (ws, answered)
}

#[test]
fn the_subprotocol_is_answered_when_offered_and_others_are_ignored() {
    let node = TestNode::start(dev_config());
    let (ws, answered) = connect_offering(&node, "/ws?user=ann", "chat, shardcast.v1");
    assert_eq!(answered.as_deref(), Some("shardcast.v1"));
    let mut ann = Client::from_ws(ws);
    assert_eq!(ann.request(json!({"op":"ping","id":1}))["op"], "pong");

    // Only unknown subprotocols: upgraded without naming one (a browser then gives up,
    // which is the client's choice to make).
    let request =
        "GET /ws?user=bo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Protocol: mqtt\r\n\r\n";
    let answer = raw_exchange_until(node.addr, request.as_bytes(), "\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    assert!(
        !answer
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol"),
        "{answer}"
    );
}

/// Sends `request` and reads until `end` appears (or the wait runs out).
fn raw_exchange_until(addr: std::net::SocketAddr, request: &[u8], end: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.write_all(request).expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains(end) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn refused_credentials_close_with_4401_or_4402_for_subprotocol_clients() {
    let node = TestNode::start(dev_config());
    let cases = [
        ("/ws?token=not-a-jwt".to_owned(), 4401),
        ("/ws".to_owned(), 4401),
        (
            format!(
                "/ws?token={}",
                token(json!({"sub":"x","exp": unix_now_secs() - 3_600}))
            ),
            4402,
        ),
    ];
    for (path, code) in cases {
        let (mut ws, answered) = connect_offering(&node, &path, "shardcast.v1");
        assert_eq!(answered.as_deref(), Some("shardcast.v1"));
        assert_eq!(expect_close(&mut ws), code, "{path}");
    }
    // Without the subprotocol the answer stays an HTTP 401.
    let refused = connect_url(&node.url("/ws?token=not-a-jwt")).expect_err("refused");
    match refused {
        tungstenite::Error::Http(response) => assert_eq!(response.status(), 401),
        other => panic!("expected HTTP 401, got {other}"),
    }
    // Counted once the answer is written: the client can read it first.
    let metrics = node.node().metrics();
    let unauthorized = shardcast::metrics::HandshakeRefusal::Unauthorized as usize;
    eventually("four refusals counted", || {
        metrics.sum(|s| s.handshakes_refused[unauthorized].get()) == 4
    });
}

#[test]
fn hello_carries_exp_and_the_connection_closes_with_4402_when_it_passes() {
    let node = TestNode::start(dev_config());
    let dev = Client::dev(&node, "dev-user");
    assert!(dev.hello.get("exp").is_none(), "{}", dev.hello);

    // Accepted within the clock leeway (5 s), so it expires about 2 s from now.
    let exp = unix_now_secs() - 3;
    let t = token(json!({"sub":"eve","exp":exp}));
    let mut eve = Client::from_ws(connect_url(&node.url(&format!("/ws?token={t}"))).expect("ok"));
    assert_eq!(eve.hello["exp"], exp);
    assert_eq!(eve.expect_close(), 4402);
}

#[test]
fn refresh_extends_the_token_of_the_same_user_only() {
    let node = TestNode::start(dev_config());
    let now = unix_now_secs();
    let t = token(json!({"sub":"rae","exp":now - 3}));
    let mut rae = Client::from_ws(connect_url(&node.url(&format!("/ws?token={t}"))).expect("ok"));

    let other = token(json!({"sub":"mallory","exp":now + 600}));
    let reply = rae.request(json!({"op":"refresh","id":1,"token":other}));
    assert_eq!(
        (reply["op"].as_str(), reply["code"].as_str()),
        (Some("err"), Some("forbidden"))
    );
    assert_eq!(reply["id"], 1);
    let reply = rae.request(json!({"op":"refresh","id":2,"token":"garbage"}));
    assert_eq!(reply["code"], "unauthorized");
    let reply = rae.request(json!({"op":"refresh","id":3}));
    assert_eq!(reply["code"], "bad_request");

    let fresh = token(json!({"sub":"rae","exp":now + 600}));
    assert_eq!(
        rae.request(json!({"op":"refresh","id":4,"token":fresh})),
        json!({"op":"ack","id":4})
    );
    // Past the old token's expiry (and its leeway) the connection is still served.
    rae.expect_silence(Duration::from_secs(4));
    assert_eq!(rae.request(json!({"op":"ping","id":5}))["op"], "pong");
}

#[test]
fn string_ids_count_their_decoded_bytes() {
    let node = TestNode::start(dev_config());
    let mut c = Client::dev(&node, "ids");
    let longest = "i".repeat(64);
    assert_eq!(
        c.request(json!({"op":"ping","id":longest}))["id"],
        json!(longest),
        "64 bytes, 66 with the quotes"
    );
    let reply = c.request(json!({"op":"ping","id":"i".repeat(65)}));
    assert_eq!(reply["code"], "bad_request");
    assert!(reply.get("id").is_none());
    // Escapes count as what they decode to: 64 bytes written as 384.
    let escaped = format!(r#"{{"op":"ping","id":"{}"}}"#, r"\u0069".repeat(64));
    c.ws.send(tungstenite::Message::text(escaped))
        .expect("send");
    assert_eq!(c.recv()["id"], json!(longest));
}
