//! The binary's life: start-up (configuration errors, the start line), the dev-mode echo
//! endpoint, and graceful stop on SIGTERM and SIGINT (clients closed with 1001, exit 0).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tungstenite::Message;

fn graceful_stop_on(signal: i32) {
    let mut node = Process::serve(&["--dev", "--shards", "2"], &[]);
    let mut clients: Vec<Client> = (0..6).map(|i| node.client(&format!("u{i}"))).collect();
    assert_eq!(clients[0].request(json!({"op":"ping"}))["op"], "pong");
    node.signal(signal);
    for client in &mut clients {
        assert_eq!(client.expect_close(), 1001);
    }
    assert!(node.wait_exit().success());
    let log: Vec<String> = node.stderr.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("node stopped")), "{log:?}");
}

#[test]
fn sigterm_closes_clients_with_1001_and_exits_0() {
    graceful_stop_on(libc::SIGTERM);
}

#[test]
fn sigint_stops_the_same_way() {
    graceful_stop_on(libc::SIGINT);
}

/// Runs `shardcast serve` with `args`, expects it to refuse to start (exit 64, EX_USAGE),
/// and returns what it printed.
/// Runs `shardcast serve ARGS`, which must exit 64 within [`WAIT`]; returns its stderr.
fn refused_start(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} started instead of being refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("output");
    assert_eq!(output.status.code(), Some(64), "{args:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn refuses_to_start_on_bad_configuration() {
    assert!(refused_start(&[]).contains("`secret` is required"));
    assert!(refused_start(&["--dev", "--shards", "99"]).contains("`shards` is 99"));
    let cluster = refused_start(&["--dev", "--redis", "not-a-url"]);
    assert!(
        cluster.contains("`redis` is not a usable Redis URL"),
        "{cluster}"
    );
}

#[test]
fn settings_layer_file_then_environment_then_flags() {
    let dir = std::env::temp_dir().join(format!("shardcast-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("node.toml");
    std::fs::write(
        &file,
        "node_id = \"from-file\"\nshards = 1\nheartbeat_secs = 7\nsecret = \"file-secret\"\n",
    )
    .expect("write");
    let config = file.to_str().expect("utf8");
    let t = token(json!({"sub":"layered"}));

    // The file's secret is not the one the token was signed with.
    let node = Process::serve(&["--config", config], &[]);
    let err = connect_url(&format!("ws://{}/ws?token={t}", node.addr)).expect_err("wrong secret");
    assert!(matches!(err, tungstenite::Error::Http(r) if r.status() == 401));
    drop(node);

    // The environment beats the file; a flag beats both.
    let node = Process::serve(
        &["--config", config, "--node-id", "from-flag"],
        &[
            ("SHARDCAST_SECRET", SECRET),
            ("SHARDCAST_NODE_ID", "from-env"),
        ],
    );
    let ws = connect_url(&format!("ws://{}/ws?token={t}", node.addr)).expect("upgrade");
    let client = Client::from_ws(ws);
    assert_eq!(client.hello["user"], "layered");
    assert_eq!(client.hello["node"], "from-flag");
    assert_eq!(client.hello["hb"], 7);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn echo_endpoint_in_dev_mode() {
    let node = TestNode::start(dev_config());
    let mut ws = connect_url(&node.url("/echo")).expect("upgrade");
    ws.send(Message::text("héllo")).expect("send");
    assert_eq!(ws.read().expect("echo"), Message::text("héllo"));
    ws.send(Message::binary(vec![0u8, 1, 2])).expect("send");
    assert_eq!(ws.read().expect("echo"), Message::binary(vec![0u8, 1, 2]));
    ws.close(None).expect("close");
    assert!(matches!(ws.read(), Ok(Message::Close(_))));
}

#[test]
fn stopping_in_process_closes_clients_and_refuses_new_ones() {
    let mut node = TestNode::start(dev_config());
    let (mut a, mut b) = one_per_shard(&node, "s");
    let stopper = node.node().stopper();
    stopper.stop();
    assert_eq!(a.expect_close(), 1001);
    assert_eq!(b.expect_close(), 1001);
    node.node.take().expect("running").join();
    assert!(
        std::net::TcpStream::connect(node.addr).is_err(),
        "the listeners are closed once the node has stopped"
    );
}

#[test]
fn draining_spreads_closes_over_the_window() {
    let mut config = dev_config();
    config.drain_window_ms = 1000;
    config.grace_period_ms = 4000;
    let node = TestNode::start(config);
    let mut clients: Vec<Client> = (0..20)
        .map(|i| Client::dev(&node, &format!("d{i}")))
        .collect();
    node.node().stopper().stop();
    let started = Instant::now();
    let mut closed_at = Vec::new();
    for client in &mut clients {
        assert_eq!(client.expect_close(), 1001);
        closed_at.push(started.elapsed());
    }
    let last = closed_at.iter().max().expect("closes");
    assert!(
        *last >= Duration::from_millis(300),
        "20 closes over a 1 s window were not spread: {closed_at:?}"
    );
}
