//! `shardcast-loadtest`: the load driver behind the single-node figures in BENCHMARKS.md.
//!
//! Every scenario talks to one node on loopback (only `127.0.0.0/8` is accepted, as target and
//! as source), spreads its client sockets over several source addresses (`--sources`, bound
//! before `connect`, so 18,000 sockets do not exhaust one address's ephemeral ports), and
//! gives up after `--timeout` seconds. Each prints a human table and, last, one JSON line.
//!
//! * `connect` ([`connect`]): N idle dev-mode connections. Handshakes per second, the node's
//!   RSS per connection and its CPU while they sit idle.
//! * `fanout` ([`fanout`]): N subscribers of one topic and one publisher sending M
//!   publications one at a time. Time from the `pub` to the last (and the median) subscriber,
//!   and the node's CPU time per delivery.
//! * `api` ([`api`]): keep-alive HTTP `POST /v1/publish` to single users: requests per second,
//!   request latency, and whether API load delays a client's `ping` round trip.
//!
//! With `--pid`, the node's memory and CPU are read from `/proc/PID/status` (`VmRSS`) and
//! `/proc/PID/stat` (`utime`, `stime`), see [`probe`]. The load generator shares the machine
//! with the node, so latencies and node CPU under load are upper bounds.
//!
//! Client sockets are read by a few worker threads, each owning a slice of them and waiting on
//! them with its own epoll set ([`readers`]); tungstenite answers the server's pings.

mod api;
mod client;
mod connect;
mod fanout;
mod probe;
mod readers;

use std::net::IpAddr;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::client::Target;

#[derive(Parser)]
#[command(about = "Load driver for shardcast (single node, loopback only)")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

/// Options every scenario takes.
#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// The node's WebSocket endpoint, e.g. `ws://127.0.0.1:8080/ws` (loopback only).
    #[arg(long)]
    pub url: Target,
    /// Source addresses to spread client sockets over (comma-separated, loopback only).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"
    )]
    pub sources: Vec<IpAddr>,
    /// Client threads opening and reading the sockets.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// The node's pid: read its RSS and CPU time from /proc.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Give up after this many seconds, whatever the phase.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Subcommand)]
enum Scenario {
    /// N idle connections: handshake rate, node RSS per connection, idle node CPU.
    Connect(connect::Args),
    /// N subscribers of one topic, M publications one at a time: time to the last delivery.
    Fanout(fanout::Args),
    /// HTTP publish to single users: requests per second, latency, client ping under load.
    Api(api::Args),
}

fn main() -> Result<()> {
    match Cli::parse().scenario {
        Scenario::Connect(args) => connect::run(&args),
        Scenario::Fanout(args) => fanout::run(&args),
        Scenario::Api(args) => api::run(&args),
    }
}

/// Prints one line of a scenario's human-readable table.
pub fn row(label: &str, value: impl std::fmt::Display) {
    println!("  {label:<40}{value}");
}
