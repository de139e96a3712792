//! The descriptor limit: a node started under a low `ulimit -n` holds what fits after its
//! reserve, answers every client past that with 503 at once, keeps answering `/healthz` and
//! `/metrics`, and serves again once clients leave; `accept` failing with EMFILE neither
//! hangs waiting clients nor spins nor floods the log.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// The descriptor limit the node runs under, and what its reserve leaves for clients with
/// one shard and 8 API connections: 64 + 8 per shard + 8 + 32 refusal slots.
const NOFILE: u64 = 256;
const FITS: usize = 256 - (64 + 8 + 8 + 32);

/// Upgrades `user`; `Ok` with the client, or `Err(status)` of the HTTP refusal.
fn upgrade(node: &Process, user: &str) -> Result<Client, u16> {
    match connect_url(&format!("ws://{}/ws?user={user}", node.addr)) {
        Ok(ws) => Ok(Client::from_ws(ws)),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(other) => panic!("expected an upgrade or an HTTP refusal, got {other}"),
    }
}

/// Reads a raw socket's answer until it closes (bounded by `WAIT`).
fn answer(stream: &mut TcpStream) -> String {
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

fn metric(node: &Process, name: &str) -> f64 {
    let (status, text) = http_text(node.api, "GET", "/metrics", None, b"");
    assert_eq!(status, 200);
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Lines of the node's log so far that mention `what`.
fn log_lines(node: &Process, what: &str) -> usize {
    node.stderr.try_iter().filter(|l| l.contains(what)).count()
}

#[test]
fn past_the_descriptor_limit_clients_get_503_at_once_and_the_api_answers() {
    let node = Process::serve_with_nofile(
        NOFILE,
        &["--dev", "--shards", "1"],
        &[("SHARDCAST_MAX_API_CONNECTIONS", "8")],
    );
    let mut clients = Vec::new();
    let refused = loop {
        assert!(
            clients.len() <= FITS,
            "more than {FITS} clients were served"
        );
        match upgrade(&node, &format!("u{}", clients.len())) {
            Ok(client) => clients.push(client),
            Err(status) => break status,
        }
    };
    assert_eq!(refused, 503);
    assert_eq!(clients.len(), FITS, "max_connections defaults to what fits");

    // A flood of sockets that send nothing: the refusal slots hold a few until their request
    // would arrive; every one past those is answered 503 at once, and none hangs.
    let mut flood: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(&node.addr).expect("connect"))
        .collect();
    let started = Instant::now();
    let answered_at_once = flood[40..]
        .iter_mut()
        .map(answer)
        .filter(|a| a.starts_with("HTTP/1.1 503"))
        .count();
    assert_eq!(answered_at_once, 60, "sockets past the slots are refused");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Probes still answer while every client descriptor is taken.
    for path in ["/healthz", "/metrics", "/readyz"] {
        let started = Instant::now();
        assert_eq!(http_text(node.api, "GET", path, None, b"").0, 200, "{path}");
        assert!(started.elapsed() < Duration::from_secs(1), "{path} at once");
    }
    let started = Instant::now();
    assert_eq!(upgrade(&node, "late").err(), Some(503));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a late client at once"
    );
    assert!(
        metric(
            &node,
            "shardcast_handshakes_refused_total{reason=\"unavailable\"}"
        ) >= 62.0
    );
    assert_eq!(metric(&node, "shardcast_accept_errors_total"), 0.0);

    drop(flood);
    clients.truncate(FITS - 3);
    eventually("the node serves again once clients leave", || {
        upgrade(&node, "again").is_ok()
    });
}

#[test]
fn emfile_at_accept_refuses_waiting_clients_without_spinning() {
    let node = Process::serve(&["--dev", "--shards", "1"], &[]);
    let _held: Vec<Client> = (0..3).map(|i| node.client(&format!("h{i}"))).collect();
    let pid = node.child.id() as libc::pid_t;
    // The lowest descriptor number the node has free: with the soft limit there, every new
    // descriptor (an accepted socket) fails with EMFILE, but for the spare's, freed to refuse.
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .collect();
    let lowest_free = (0..).find(|fd| !open.contains(fd)).expect("a free number");
    let mut saved = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on our own child with valid rlimit structs.
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut saved) },
        0
    );
    let lowered = libc::rlimit {
        rlim_cur: lowest_free,
        rlim_max: saved.rlim_max,
    };
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lowered, std::ptr::null_mut()) },
        0
    );
    let started = Instant::now();
    let outcomes: Vec<Result<Client, u16>> =
        (0..20).map(|i| upgrade(&node, &format!("e{i}"))).collect();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered promptly: {:?}",
        started.elapsed()
    );
    let refused = outcomes
        .iter()
        .filter(|o| o.as_ref().err() == Some(&503))
        .count();
    assert!(refused >= 15, "{refused} of 20 refused with 503");
    std::thread::sleep(Duration::from_millis(500));

    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &saved, std::ptr::null_mut()) },
        0
    );
    drop(outcomes);
    eventually("the node serves again", || upgrade(&node, "back").is_ok());
    let errors = metric(&node, "shardcast_accept_errors_total");
    assert!(
        (1.0..=60.0).contains(&errors),
        "one failed accept per refusal, no spinning: {errors}"
    );
    assert!(
        log_lines(&node, "accept failed") <= 1,
        "accept warnings are rate-limited"
    );
}

#[test]
fn a_max_connections_over_the_descriptor_limit_is_lowered_with_a_warning() {
    use std::io::BufRead;
    // The warning comes before the start line, which `Process` reads past: run it by hand,
    // under `ulimit -n` as an operator would.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {NOFILE} && exec \"$0\" serve --dev --shards 1 --listen 127.0.0.1:0 --api-listen 127.0.0.1:0"
        ))
        .arg(env!("CARGO_BIN_EXE_shardcast"))
        .env("SHARDCAST_PIN_SHARDS", "false")
        .env("SHARDCAST_MAX_API_CONNECTIONS", "8")
        .env("SHARDCAST_MAX_CONNECTIONS", "1000000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut warning = None;
    let started = loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            break None;
        };
        if line.contains("max_connections is more than RLIMIT_NOFILE allows") {
            warning = Some(line);
        } else if line.contains("shardcast node started") {
            break Some(line);
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let warning = warning.expect("a warning at start");
    assert!(warning.contains(&format!("limit={FITS}")), "{warning}");
    let started = started.expect("the node starts");
    assert!(
        started.contains(&format!("max_connections={FITS}")),
        "{started}"
    );
}
