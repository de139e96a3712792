//! `--redis-primaries N`: the Redis side of a spawned cluster as an N-primary Redis Cluster
//! (no replicas), and the few RESP commands the load tool sends Redis.
//!
//! Each `redis-server` gets a client port and a cluster bus port (`--cluster-port`, both
//! probed free: the default `port + 10000` may be taken, or above 65535), its own directory
//! for `nodes.conf`, and nothing saved. The cluster is formed by hand, as the test fixture
//! in `tests/common` does: `CLUSTER ADDSLOTSRANGE` (an even share of the 16384 slots each),
//! `CLUSTER SET-CONFIG-EPOCH` (distinct epochs), `CLUSTER MEET` from the first process to
//! the others; `redis-cli --cluster create` would refuse fewer than 3 primaries. It is ready
//! when every process reports `cluster_state:ok`, all slots assigned and every node known.
//! `--cluster-node-timeout` stays at its default (15 s): with no replicas nothing can fail
//! over, and a short timeout could mark a primary failing while a benchmark starves it of
//! CPU.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The number of hash slots.
const SLOTS: usize = 16384;

/// The `redis-server` arguments that make a process a cluster node on `port` (bus on
/// `bus_port`), keeping `nodes.conf` in `dir`.
pub fn server_args(port: u16, bus_port: u16, dir: &std::path::Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--bind",
        "127.0.0.1",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-require-full-coverage",
        "yes",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .map(String::from)
    .into();
    args.extend([
        "--port".into(),
        port.to_string(),
        "--cluster-port".into(),
        bus_port.to_string(),
        "--dir".into(),
        dir.display().to_string(),
    ]);
    args
}

/// Forms a cluster of `nodes` (each `(address, bus port)`, all primaries) and waits until
/// it is ready, until `until` at the latest.
pub fn form(nodes: &[(SocketAddr, u16)], until: Instant) -> Result<()> {
    let count = nodes.len();
    for (i, (addr, _)) in nodes.iter().enumerate() {
        let from = i * SLOTS / count;
        let to = (i + 1) * SLOTS / count - 1;
        expect_ok(
            *addr,
            &[
                "CLUSTER",
                "ADDSLOTSRANGE",
                &from.to_string(),
                &to.to_string(),
            ],
        )?;
        expect_ok(
            *addr,
            &["CLUSTER", "SET-CONFIG-EPOCH", &(i + 1).to_string()],
        )?;
    }
    let first = nodes[0].0;
    for (addr, bus_port) in &nodes[1..] {
        expect_ok(
            first,
            &[
                "CLUSTER",
                "MEET",
                &addr.ip().to_string(),
                &addr.port().to_string(),
                &bus_port.to_string(),
            ],
        )?;
    }
    let mut why = String::new();
    while Instant::now() < until {
        why.clear();
        for (addr, _) in nodes {
            let info = match command(*addr, &["CLUSTER", "INFO"])? {
                Reply::Bulk(Some(text)) => text,
                other => bail!("CLUSTER INFO on {addr} answered {other:?}"),
            };
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
                    .unwrap_or_default()
                    .to_owned()
            };
            let known = count.to_string();
            if field("cluster_state") != "ok"
                || field("cluster_slots_assigned") != "16384"
                || field("cluster_known_nodes") != known
            {
                why = format!(
                    "{addr}: cluster_state:{} cluster_slots_assigned:{} cluster_known_nodes:{} \
                     (of {count})",
                    field("cluster_state"),
                    field("cluster_slots_assigned"),
                    field("cluster_known_nodes")
                );
                break;
            }
        }
        if why.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the Redis Cluster was not ready in time: {why}")
}

/// A RESP2 reply to the commands the load tool sends (none answers with an array).
#[derive(Debug)]
pub enum Reply {
    /// `+...`
    Status(String),
    /// `-...`
    Error(String),
    /// `:...`
    Int(i64),
    /// `$...`; None for a nil.
    Bulk(Option<String>),
}

/// Sends one command over a fresh connection to `addr` and reads its reply. An error reply
/// is a [`Reply::Error`], not an `Err`.
pub fn command(addr: SocketAddr, args: &[&str]) -> Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to redis at {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes())?;
    read_reply(&mut BufReader::new(stream)).with_context(|| format!("{args:?} on {addr}"))
}

/// [`command`] on whichever of `addrs` serves the key: the first, then where a `MOVED`
/// answer points.
pub fn keyed_command(addrs: &[SocketAddr], args: &[&str]) -> Result<Reply> {
    let mut addr = *addrs.first().context("no redis address")?;
    for _ in 0..3 {
        match command(addr, args)? {
            Reply::Error(e) if e.starts_with("MOVED ") => {
                let to = e.rsplit(' ').next().unwrap_or_default();
                addr = to
                    .parse()
                    .with_context(|| format!("MOVED to {to:?} in {e:?}"))?;
            }
            reply => return Ok(reply),
        }
    }
    bail!("{args:?}: redirected 3 times")
}

fn expect_ok(addr: SocketAddr, args: &[&str]) -> Result<()> {
    match command(addr, args)? {
        Reply::Status(s) if s == "OK" => Ok(()),
        other => bail!("{args:?} on {addr} answered {other:?}"),
    }
}

fn read_reply(reader: &mut impl BufRead) -> Result<Reply> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        bail!("connection closed before the reply");
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at_checked(1).context("empty reply line")?;
    Ok(match kind {
        "+" => Reply::Status(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Int(rest.parse().context("integer reply")?),
        "$" => {
            let len: i64 = rest.parse().context("bulk length")?;
            if len < 0 {
                Reply::Bulk(None)
            } else {
                let mut data = vec![0; len as usize + 2];
                reader.read_exact(&mut data)?;
                data.truncate(len as usize);
                Reply::Bulk(Some(String::from_utf8_lossy(&data).into_owned()))
            }
        }
        _ => bail!("unexpected reply line {line:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Reply {
        read_reply(&mut std::io::Cursor::new(bytes)).expect("a reply")
    }

    #[test]
    fn replies() {
        assert!(matches!(parse(b"+OK\r\n"), Reply::Status(s) if s == "OK"));
        assert!(matches!(parse(b":42\r\n"), Reply::Int(42)));
        assert!(matches!(parse(b"$-1\r\n"), Reply::Bulk(None)));
        assert!(
            matches!(parse(b"$9\r\na:1\r\nb:ok\r\n"), Reply::Bulk(Some(s)) if s == "a:1\r\nb:ok")
        );
        assert!(
            matches!(parse(b"-MOVED 3999 127.0.0.1:6381\r\n"), Reply::Error(e) if e.starts_with("MOVED "))
        );
        assert!(read_reply(&mut std::io::Cursor::new(b"*1\r\n:1\r\n")).is_err());
    }
}
