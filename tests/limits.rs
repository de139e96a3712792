//! Every limit and every kind of bad input: each gets a clear answer (an `err` frame, a close
//! code or an HTTP status) and a metric, and nothing else is disturbed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, value::RawValue};
use shardcast::metrics::{Close, HandshakeRefusal, Rejection};
use shardcast::Target;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::Message;

fn http_status(result: Result<Ws, tungstenite::Error>) -> u16 {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

#[test]
fn device_limit_closes_the_oldest_with_4001() {
    let mut config = dev_config();
    config.max_devices_per_user = 2;
    let node = TestNode::start(config);
    // Each device connects after the previous one got its hello, so the user's home shard
    // learns of them in this order, whichever shards they land on.
    let mut oldest = Client::dev(&node, "dana");
    let mut newer = Client::dev(&node, "dana");
    let mut newest = Client::dev(&node, "dana");
    assert_eq!(oldest.expect_close(), 4001, "the oldest device is replaced");
    assert_eq!(newer.request(json!({"op":"ping"}))["op"], "pong");
    assert_eq!(newest.request(json!({"op":"ping"}))["op"], "pong");
    eventually("replacement counted", || {
        node.node().metrics().closes(Close::Replaced) == 1
    });
}

#[test]
fn topic_limit_answers_too_many() {
    let mut config = dev_config();
    config.max_topics_per_connection = 2;
    let node = TestNode::start(config);
    let mut c = Client::dev(&node, "t");
    assert_eq!(c.request(json!({"op":"sub","topic":"a"}))["op"], "ack");
    assert_eq!(c.request(json!({"op":"sub","topic":"b"}))["op"], "ack");
    let err = c.request(json!({"op":"sub","topic":"c","id":3}));
    assert_eq!(err["code"], "too_many");
    assert_eq!(err["id"], 3);
    assert_eq!(c.request(json!({"op":"unsub","topic":"a"}))["op"], "ack");
    assert_eq!(c.request(json!({"op":"sub","topic":"c"}))["op"], "ack");
    assert_eq!(
        node.node().metrics().rejections(Rejection::TooManyTopics),
        1
    );
    let long = "x".repeat(129);
    assert_eq!(
        c.request(json!({"op":"sub","topic":long}))["code"],
        "bad_request"
    );
    assert_eq!(
        c.request(json!({"op":"sub","topic":""}))["code"],
        "bad_request"
    );
}

#[test]
fn connection_limit_answers_503() {
    let mut config = dev_config();
    config.max_connections = 2;
    let node = TestNode::start(config);
    let _a = Client::dev(&node, "a");
    let _b = Client::dev(&node, "b");
    assert_eq!(http_status(connect_url(&node.url("/ws?user=c"))), 503);
    eventually("503 counted", || {
        node.node().metrics().refused(HandshakeRefusal::Unavailable) == 1
    });
    drop(_a);
    eventually("a slot frees up", || {
        connect_url(&node.url("/ws?user=c")).is_ok()
    });
}

#[test]
fn handshake_refusals_are_http_errors() {
    let mut config = dev_config();
    config.dev = false;
    let node = TestNode::start(config);
    assert_eq!(http_status(connect_url(&node.url("/ws"))), 401);
    assert_eq!(
        http_status(connect_url(&node.url("/ws?user=trusted-only-in-dev"))),
        401
    );
    assert_eq!(
        http_status(connect_url(&node.url("/ws?token=not.a.jwt"))),
        401
    );
    let expired = token(json!({"sub":"x","exp":1_000_000_000}));
    assert_eq!(
        http_status(connect_url(&node.url(&format!("/ws?token={expired}")))),
        401
    );
    assert_eq!(http_status(connect_url(&node.url("/elsewhere"))), 404);
    assert_eq!(
        http_status(connect_url(&node.url("/echo"))),
        404,
        "/echo is dev-only"
    );
    let metrics = node.node().metrics();
    eventually("refusals counted", || {
        metrics.refused(HandshakeRefusal::Unauthorized) == 4
            && metrics.refused(HandshakeRefusal::NotFound) == 2
    });

    let response = raw_exchange(node.addr, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(
        response.contains("\"error\":{\"code\":\"bad_request\""),
        "{response}"
    );

    let mut huge = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 10_000));
    let response = raw_exchange(node.addr, &huge);
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
}

#[test]
fn upgrade_with_another_websocket_version_gets_426() {
    let node = TestNode::start(dev_config());
    let request = "GET /ws?user=v8 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n";
    let response = raw_exchange(node.addr, request.as_bytes());
    assert!(
        response.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{response}"
    );
    assert!(
        response.contains("\r\nSec-WebSocket-Version: 13\r\n"),
        "{response}"
    );
    assert!(response.contains("\"bad_version\""), "{response}");
    eventually("counted", || {
        node.node().metrics().refused(HandshakeRefusal::BadVersion) == 1
    });
}

#[test]
fn tokens_with_malformed_or_future_times_are_refused_at_the_upgrade() {
    let mut config = dev_config();
    config.dev = false;
    let node = TestNode::start(config);
    let now = unix_now_secs();
    let refused = [
        (json!({"sub":"x","exp":"never"}), "auth_bad_claims"),
        (json!({"sub":"x","exp":-1}), "auth_bad_claims"),
        (json!({"sub":"x","nbf":"soon"}), "auth_bad_claims"),
        (json!({"sub":"x","nbf":now + 600}), "auth_not_yet_valid"),
    ];
    for (claims, code) in &refused {
        let request = format!(
            "GET /ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            token(claims.clone())
        );
        let response = raw_exchange(node.addr, request.as_bytes());
        assert!(response.starts_with("HTTP/1.1 401"), "{claims}: {response}");
        assert!(response.contains(code), "{claims}: {response}");
    }
    let started = token(json!({"sub":"x","nbf":now - 60,"exp":now + 60}));
    let mut ok =
        Client::from_ws(connect_url(&node.url(&format!("/ws?token={started}"))).expect("upgrade"));
    assert_eq!(ok.hello["user"], "x");
    assert_eq!(ok.request(json!({"op":"ping"}))["op"], "pong");
    eventually("refusals counted", || {
        node.node()
            .metrics()
            .refused(HandshakeRefusal::Unauthorized)
            == refused.len() as u64
    });
}

#[test]
fn silent_handshakes_time_out() {
    let mut config = dev_config();
    config.handshake_timeout_ms = 200;
    let node = TestNode::start(config);
    let mut stream = TcpStream::connect(node.addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 16];
    assert_eq!(stream.read(&mut buf).expect("eof, not a timeout"), 0);
    assert!(started.elapsed() < Duration::from_secs(3));
    eventually("timeout counted", || {
        node.node().metrics().refused(HandshakeRefusal::Timeout) == 1
    });
}

#[test]
fn bad_requests_get_err_and_keep_the_connection() {
    let node = TestNode::start(dev_config());
    let mut c = Client::dev(&node, "bad");
    let cases = [
        ("{oops", "bad_request"),
        ("[1,2]", "bad_request"),
        (r#"{"op":"dance","id":1}"#, "bad_request"),
        (r#"{"op":"pub","topic":"t"}"#, "bad_request"),
        (r#"{"op":"send","data":1}"#, "bad_request"),
        (r#"{"op":"sub"}"#, "bad_request"),
    ];
    for (text, code) in cases {
        c.ws.send(Message::text(text)).expect("send");
        let err = c.recv();
        assert_eq!(err["op"], "err", "{text}");
        assert_eq!(err["code"], code, "{text}");
        assert!(err["msg"].as_str().is_some_and(|m| !m.is_empty()));
    }
    c.ws.send(Message::binary(vec![1, 2, 3])).expect("send");
    assert_eq!(c.recv()["code"], "bad_request");
    assert_eq!(
        c.request(json!({"op":"ping","id":"still-here"}))["id"],
        "still-here"
    );
    let metrics = node.node().metrics();
    assert_eq!(metrics.rejections(Rejection::UnknownOp), 1);
    assert_eq!(metrics.rejections(Rejection::Malformed), 5);
    assert_eq!(metrics.rejections(Rejection::Binary), 1);
}

#[test]
fn fragmented_messages_and_websocket_pings_work() {
    let node = TestNode::start(dev_config());
    let mut c = Client::dev(&node, "frag");
    let text = br#"{"op":"ping","id":"fragmented"}"#;
    let (head, tail) = text.split_at(10);
    c.ws.send(Message::Frame(Frame::message(
        head.to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .expect("first fragment");
    c.ws.send(Message::Ping(vec![7u8].into()))
        .expect("ping between fragments");
    c.ws.send(Message::Frame(Frame::message(
        tail.to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .expect("last fragment");
    let mut got_pong = false;
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline);
        match c.ws.read().expect("read") {
            Message::Pong(payload) => {
                assert_eq!(&payload[..], &[7u8]);
                got_pong = true;
            }
            Message::Text(reply) => {
                assert_eq!(reply.as_str(), r#"{"op":"pong","id":"fragmented"}"#);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        got_pong,
        "the control frame is answered before the message completes"
    );
}

#[test]
fn invalid_utf8_closes_with_1007() {
    let node = TestNode::start(dev_config());
    let mut c = Client::dev(&node, "utf");
    let frame = Frame::message(vec![b'"', 0xff, 0xfe, b'"'], OpCode::Data(Data::Text), true);
    c.ws.send(Message::Frame(frame)).expect("send");
    assert_eq!(c.expect_close(), 1007);
    eventually("counted", || {
        node.node().metrics().closes(Close::BadUtf8) == 1
    });
}

#[test]
fn oversized_frames_and_messages_close_with_1009() {
    let mut config = dev_config();
    config.max_frame_bytes = 1024;
    config.max_message_bytes = 2048;
    let node = TestNode::start(config);
    let mut c = Client::dev(&node, "big");
    c.ws.send(Message::text("x".repeat(1025))).expect("send");
    assert_eq!(c.expect_close(), 1009);

    let mut c = Client::dev(&node, "big2");
    let first = Frame::message(vec![b' '; 1000], OpCode::Data(Data::Text), false);
    c.ws.send(Message::Frame(first)).expect("fragment");
    let second = Frame::message(vec![b' '; 1000], OpCode::Data(Data::Continue), false);
    c.ws.send(Message::Frame(second)).expect("fragment");
    let last = Frame::message(vec![b' '; 100], OpCode::Data(Data::Continue), true);
    c.ws.send(Message::Frame(last)).expect("fragment");
    assert_eq!(c.expect_close(), 1009);
    eventually("counted", || {
        node.node().metrics().closes(Close::TooBig) == 2
    });
}

#[test]
fn inbound_rate_limit_answers_one_err_per_window() {
    let mut config = dev_config();
    config.rate_limit_burst = 5;
    config.rate_limit_per_sec = 1;
    let node = TestNode::start(config);
    let mut c = Client::dev(&node, "fast");
    for id in 0..20 {
        c.send(json!({"op":"ping","id":id}));
    }
    let replies: Vec<_> = (0..6).map(|_| c.recv()).collect();
    let pongs = replies.iter().filter(|r| r["op"] == "pong").count();
    assert_eq!(pongs, 5, "{replies:?}");
    let err = &replies[5];
    assert_eq!(err["code"], "too_many", "{replies:?}");
    assert_eq!(err["id"], 5, "the one err names the first refused request");
    // The other 14 refusals are counted, not answered.
    c.expect_silence(Duration::from_millis(300));
    let metrics = node.node().metrics();
    eventually("every refusal counted", || {
        metrics.rejections(Rejection::RateLimited) == 15
    });
    // A new window: the bucket has a token again, and a refusal gets its err again.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(c.request(json!({"op":"ping","id":"later"}))["op"], "pong");
    let err = c.request(json!({"op":"ping","id":"again"}));
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("too_many"), Some("again"))
    );
}

/// A dev client of `user` whose socket has a tiny receive buffer.
fn small_buffered_client(node: &TestNode, user: &str) -> Client {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    socket.connect(&node.addr.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let url = node.url(&format!("/ws?user={user}"));
    let (ws, _) = tungstenite::client(url, stream).expect("upgrade");
    Client::from_ws(ws)
}

#[test]
fn slow_consumer_is_closed_with_1008_while_others_are_served() {
    let mut config = dev_config();
    config.max_outbound_bytes = 64 * 1024;
    config.close_timeout_ms = 5000;
    let node = TestNode::start(config);

    // A client with a tiny receive buffer that subscribes and then stops reading.
    let mut slow = small_buffered_client(&node, "slow");
    assert_eq!(
        slow.request(json!({"op":"sub","topic":"flood"}))["op"],
        "ack"
    );

    let mut healthy = Client::dev(&node, "healthy");
    let publisher = node.node().publisher();
    let payload = RawValue::from_string(format!("\"{}\"", "p".repeat(16 * 1024))).expect("raw");
    let metrics = node.node().metrics();
    let mut published = 0;
    while metrics.closes(Close::SlowConsumer) == 0 {
        assert!(
            published < 2000,
            "never detected as slow after {published} publications"
        );
        publisher.publish(
            Target {
                topics: &["flood"],
                ..Target::default()
            },
            &payload,
        );
        published += 1;
        if published % 50 == 0 {
            assert_eq!(healthy.request(json!({"op":"ping"}))["op"], "pong");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(healthy.request(json!({"op":"ping"}))["op"], "pong");
    eventually("slow consumer unregistered", || metrics.connections() == 1);

    // Once it reads again it finds what the kernel held, then the 1008 close.
    let deadline = Instant::now() + WAIT;
    let mut received = 0;
    loop {
        assert!(Instant::now() < deadline, "no close frame");
        match slow.ws.read() {
            Ok(Message::Text(_)) => received += 1,
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 1008);
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("expected the 1008 close, got {e}"),
        }
    }
    assert!(
        received < published,
        "frames beyond the queue limit were dropped"
    );
}

#[test]
fn a_reader_that_pauses_gets_everything_queued_once_it_reads_again() {
    // Sockets are watched for output only once a write leaves bytes behind: this is the
    // write path that depends on it.
    let mut config = dev_config();
    config.max_outbound_bytes = 8 * 1024 * 1024;
    let node = TestNode::start(config);
    let mut paused = small_buffered_client(&node, "paused");
    assert_eq!(
        paused.request(json!({"op":"sub","topic":"burst"}))["op"],
        "ack"
    );

    let publisher = node.node().publisher();
    let publish = |text: String| {
        let payload = RawValue::from_string(format!("\"{text}\"")).expect("raw");
        let target = Target {
            topics: &["burst"],
            ..Target::default()
        };
        publisher.publish(target, &payload);
    };
    // The subscription reaches the topic's home shard after the ack: probe until one
    // publication arrives.
    paused
        .ws
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut probes = 0;
    loop {
        assert!(probes < 50, "the subscription never took effect");
        publish("probe".into());
        probes += 1;
        if matches!(paused.ws.read(), Ok(Message::Text(_))) {
            break;
        }
    }
    paused
        .ws
        .get_ref()
        .set_read_timeout(Some(WAIT))
        .expect("timeout");

    // 200 publications of 16 KiB, far more than the socket buffers hold, while it reads
    // nothing.
    let filler = "p".repeat(16 * 1024);
    for i in 0..200 {
        publish(format!("{i} {filler}"));
    }
    std::thread::sleep(Duration::from_millis(200));

    let mut next = 0;
    while next < 200 {
        let frame = paused.recv();
        let data = frame["data"].as_str().expect("a publication");
        if data != "probe" {
            assert_eq!(data.split(' ').next(), Some(next.to_string().as_str()));
            next += 1;
        }
    }
    let metrics = node.node().metrics();
    assert_eq!(metrics.closes(Close::SlowConsumer), 0);
}

#[test]
fn silent_clients_are_closed_after_three_heartbeats() {
    let mut config = dev_config();
    config.heartbeat_secs = 1;
    // Long enough that the silent client can still answer the pings it finds when it reads.
    config.close_timeout_ms = 5000;
    let node = TestNode::start(config);
    let mut silent = Client::dev(&node, "silent");
    let mut lively = Client::dev(&node, "lively");
    assert_eq!(lively.hello["hb"], 1);
    let started = Instant::now();
    let mut pings = 0;
    lively
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    while started.elapsed() < Duration::from_millis(4500) {
        match lively.ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("{e}"),
        }
    }
    lively
        .ws
        .get_mut()
        .set_read_timeout(Some(WAIT))
        .expect("timeout");
    assert!(pings >= 2, "server pings every interval ({pings})");
    assert_eq!(lively.request(json!({"op":"ping"}))["op"], "pong");
    assert_eq!(silent.expect_close(), 1008);
    assert_eq!(node.node().metrics().closes(Close::HeartbeatTimeout), 1);
}

/// The header of a masked client text frame of `len` payload bytes (mask key zero, so the
/// payload goes as is).
fn masked_text_header(len: usize, fin: bool) -> Vec<u8> {
    let mut header = vec![if fin { 0x81 } else { 0x01 }];
    match len {
        0..=125 => header.push(0x80 | len as u8),
        126..=65535 => {
            header.push(0x80 | 126);
            header.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            header.push(0x80 | 127);
            header.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    header.extend_from_slice(&[0, 0, 0, 0]);
    header
}

/// Writes a frame header, then one byte of its payload every `every`, from a thread, until
/// `bytes` are out or the socket fails; returns the thread.
fn drip(ws: &Ws, bytes: usize, every: Duration) -> std::thread::JoinHandle<()> {
    let mut stream = ws.get_ref().try_clone().expect("clone");
    std::thread::spawn(move || {
        if stream.write_all(&masked_text_header(bytes, true)).is_err() {
            return;
        }
        for _ in 0..bytes {
            std::thread::sleep(every);
            if stream.write_all(b" ").is_err() {
                return;
            }
        }
    })
}

fn incomplete_bytes(node: &TestNode) -> i64 {
    let metrics = node.node().metrics();
    metrics
        .shards()
        .iter()
        .map(|s| s.incomplete_bytes.get())
        .sum()
}

#[test]
fn a_dripped_message_is_closed_with_1008_after_the_deadline() {
    let mut config = dev_config();
    config.incomplete_message_timeout_ms = 1500;
    let node = TestNode::start(config);
    let mut dripper = Client::dev(&node, "drip");
    let started = Instant::now();
    let dripping = drip(&dripper.ws, 100, Duration::from_millis(100));
    assert_eq!(dripper.expect_close(), 1008);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(3500),
        "closed after {took:?}"
    );
    // Stops the dripping thread: its next write fails.
    let _ = dripper.ws.get_ref().shutdown(std::net::Shutdown::Write);
    let _ = dripping.join();
    let metrics = node.node().metrics();
    assert_eq!(metrics.closes(Close::IncompleteTimeout), 1);
    eventually("the held bytes are released", || {
        incomplete_bytes(&node) == 0
    });

    // Messages that complete within the deadline are never affected, however long the
    // connection keeps sending: the age restarts with every message.
    let mut steady = Client::dev(&node, "steady");
    for id in 0..3 {
        let text = format!(r#"{{"op":"ping","id":{id}}}"#);
        let (head, tail) = text.split_at(8);
        steady
            .ws
            .send(Message::Frame(Frame::message(
                head.as_bytes().to_vec(),
                OpCode::Data(Data::Text),
                false,
            )))
            .expect("first fragment");
        std::thread::sleep(Duration::from_millis(700));
        steady
            .ws
            .send(Message::Frame(Frame::message(
                tail.as_bytes().to_vec(),
                OpCode::Data(Data::Continue),
                true,
            )))
            .expect("last fragment");
        assert_eq!(steady.recv()["id"], id);
    }
    assert_eq!(metrics.closes(Close::IncompleteTimeout), 1);
}

#[test]
fn the_heartbeat_closes_a_dripping_connection_that_never_completes_a_frame() {
    let mut config = dev_config();
    config.heartbeat_secs = 1;
    config.incomplete_message_timeout_ms = 60_000;
    config.close_timeout_ms = 5000;
    let node = TestNode::start(config);
    let mut dripper = Client::dev(&node, "drip");
    let started = Instant::now();
    let dripping = drip(&dripper.ws, 200, Duration::from_millis(100));
    let mut pings = 0;
    let code = loop {
        assert!(started.elapsed() < WAIT, "no close");
        match dripper.ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(Message::Close(Some(frame))) => break u16::from(frame.code),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => panic!("expected the 1008 close, got {e}"),
        }
    };
    assert_eq!(code, 1008);
    assert!(pings >= 1, "pinged while dripping");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(2500), "closed after {took:?}");
    // Stops the dripping thread: its next write fails.
    let _ = dripper.ws.get_ref().shutdown(std::net::Shutdown::Write);
    let _ = dripping.join();
    assert_eq!(node.node().metrics().closes(Close::HeartbeatTimeout), 1);
}

#[test]
fn incomplete_data_past_the_shard_budget_closes_the_connection_that_overflows_it() {
    let mut config = dev_config();
    config.shards = 1;
    config.shard_incomplete_bytes = 110_000;
    let node = TestNode::start(config);
    let mut first = Client::dev(&node, "first");
    let body = format!(
        r#"{{"op":"ping","id":"big","pad":"{}"}}"#,
        " ".repeat(59_900)
    );
    let (head, tail) = body.as_bytes().split_at(50_000);
    let mut raw = masked_text_header(body.len(), true);
    raw.extend_from_slice(head);
    first.ws.get_mut().write_all(&raw).expect("most of a frame");
    eventually("the first holds its part", || {
        incomplete_bytes(&node) >= 50_000
    });

    let mut second = Client::dev(&node, "second");
    let mut raw = masked_text_header(64_000, true);
    raw.extend_from_slice(&[b' '; 63_000]);
    second
        .ws
        .get_mut()
        .write_all(&raw)
        .expect("most of a frame");
    assert_eq!(second.expect_close(), 1008);
    assert_eq!(node.node().metrics().closes(Close::IncompleteBudget), 1);

    // The first, within the budget, finishes its message and is answered.
    first.ws.get_mut().write_all(tail).expect("the rest");
    let reply = first.recv();
    assert_eq!(reply["id"], "big", "{reply}");
    eventually("nothing held once complete", || {
        incomplete_bytes(&node) == 0
    });
}
