//! `shardcast-loadtest`: the load generator for shardcast, from a few connections to C1M-style
//! runs spread over many processes, source addresses and nodes.
//!
//! Scenarios ([`scenario`], and [`up`] for `up`): `connect`, `fanout`, `p2p`, `churn`,
//! `mixed`, `up` run through the
//! coordinator ([`run`]), which re-executes this binary as hidden `worker` processes
//! ([`worker`], [`fleet`], protocol in [`wire`]) holding at most `--per-process` sockets
//! each, because `RLIMIT_NOFILE` caps one process. `api` ([`api`]) is a single-process
//! benchmark of the HTTP publish path. `floor` ([`floor`]) is no scenario but a reference
//! server that makes only the syscalls a WebSocket connect needs: `connect` against it
//! measures the kernel's share of a connect on the machine.
//!
//! Everything is loopback only: targets, API addresses and source addresses must be in
//! `127.0.0.0/8`. Client sockets are spread over the nodes (`--url`, comma-separated) and
//! source addresses (`--sources`, bound before `connect`, so one address's ephemeral ports
//! do not run out). `--spawn-cluster K` ([`cluster`]) starts redis (or, with
//! `--redis-primaries N`, an N-primary Redis Cluster: [`redis_cluster`]) and K nodes for the
//! run and stops them after. With node pids (`--pid`, or the spawned nodes), RSS, descriptors
//! and CPU come from `/proc` ([`probe`]), and what the nodes spend per connect, delivery
//! or message ([`cost`]). Every run ends within `--timeout` seconds and
//! prints a table, then exactly one JSON line.
//!
//! Within a process, threads open the sockets ([`client`]) and then read them, and send what
//! the scenario schedules, each with its own epoll set ([`readers`], [`traffic`], [`churn`]).

mod api;
mod churn;
mod client;
mod cluster;
mod cost;
mod fleet;
mod floor;
mod http;
mod probe;
mod readers;
mod redis_cluster;
mod report;
mod run;
mod scenario;
mod traffic;
mod up;
mod wire;
mod worker;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::{Parser, Subcommand};

use crate::client::{Deadline, Target};
use crate::cluster::{Cluster, ClusterSpec};

#[derive(Parser)]
#[command(about = "Load generator for shardcast (loopback only)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options every scenario takes.
#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// The nodes' WebSocket endpoints, comma-separated, e.g. `ws://127.0.0.1:8080/ws`
    /// (loopback only). Connection i goes to the (i mod n)-th.
    #[arg(long, value_delimiter = ',', required_unless_present = "spawn_cluster")]
    pub url: Vec<Target>,
    /// The nodes' HTTP API addresses, comma-separated (loopback only), for scenarios that
    /// publish through the API.
    #[arg(long, value_delimiter = ',')]
    pub api: Vec<SocketAddr>,
    /// API key, if the nodes have one.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The nodes' pids, comma-separated or repeated: RSS, descriptors, CPU and context
    /// switches from /proc (`loadtest/run-node.sh` prints its node's first).
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Also count the nodes' syscalls per event: `strace -c -f` attached to the nodes for
    /// each measured phase (slows them down: take CPU figures from a run without it).
    #[arg(long)]
    pub strace: bool,
    /// Source addresses to spread client sockets over (comma-separated, 127.0.0.0/8).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"
    )]
    pub sources: Vec<IpAddr>,
    /// Threads per worker process (opening, then reading and sending).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Most sockets per worker process (RLIMIT_NOFILE is capped per process).
    #[arg(long, default_value_t = 18_000)]
    pub per_process: usize,
    /// Give up after this many seconds, whatever the phase.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Start redis-server and K shardcast nodes for this run (and stop them after), instead
    /// of --url/--api/--pid.
    #[arg(long, conflicts_with_all = ["url", "api", "pid"])]
    pub spawn_cluster: Option<usize>,
    /// The shardcast binary for --spawn-cluster [default: `shardcast` next to this binary].
    #[arg(long)]
    pub shardcast_bin: Option<PathBuf>,
    /// The redis-server binary for --spawn-cluster.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// With --spawn-cluster: no redis, nodes run alone (only sensible with one node).
    #[arg(long, requires = "spawn_cluster")]
    pub without_redis: bool,
    /// With --spawn-cluster: an N-primary Redis Cluster (no replicas) instead of one
    /// redis-server; the nodes get `--redis redis+cluster://...` listing every primary, and
    /// Redis CPU figures are summed over the primaries.
    #[arg(long, requires = "spawn_cluster", conflicts_with = "without_redis")]
    pub redis_primaries: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// N idle connections: connect rate, node RSS per connection, idle node CPU.
    Connect {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenario::ConnectArgs,
    },
    /// N topic subscribers, M API publications one at a time: time to the last subscriber.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenario::FanoutArgs,
    },
    /// N users, M direct messages at a rate (API or client frames): delivered, lost,
    /// duplicated, latency. With `--to topics`, each user subscribes to its own topic
    /// `t-<user>` and the API publishes to it instead.
    P2p {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenario::P2pArgs,
    },
    /// Connections opened and closed at a rate while direct messages flow.
    Churn {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenario::ChurnScenarioArgs,
    },
    /// Fan-out, direct messages and churn at once.
    Mixed {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenario::MixedArgs,
    },
    /// HTTP publish to single users (one process): requests per second, latency, client
    /// ping under load.
    Api {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: api::Args,
    },
    /// N users send `up` frames at a rate: acks, refusals, ack latency, node (and Redis)
    /// CPU per message, webhook batching (`--sink` configures spawned nodes).
    Up {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: up::UpArgs,
    },
    /// A reference server that makes only the syscalls a WebSocket connect needs (accept,
    /// upgrade with a hello, close), for `connect --pid` to measure the kernel's share of a
    /// connect. Prints `floor listening on 127.0.0.1:PORT pid PID`; runs until killed.
    Floor {
        #[command(flatten)]
        args: floor::Args,
    },
    /// A worker process (started by the coordinator).
    #[command(hide = true)]
    Worker,
}

/// Where a run's nodes are, and the cluster started for it (stopped when dropped).
pub struct Endpoints {
    /// The options given.
    pub common: Common,
    /// WebSocket endpoints.
    pub urls: Vec<Target>,
    /// API addresses.
    pub apis: Vec<SocketAddr>,
    /// Node pids to observe.
    pub pids: Vec<u32>,
    /// The spawned cluster, if any.
    cluster: Option<Cluster>,
}

impl Endpoints {
    /// Checks `common`, starting a cluster if it asks for one (its nodes with `node_env`
    /// added to their environment).
    fn resolve(common: Common, node_env: &[(&str, String)], deadline: Deadline) -> Result<Self> {
        client::check_sources(&common.sources)?;
        run::check_apis(&common.api)?;
        let Some(nodes) = common.spawn_cluster else {
            return Ok(Endpoints {
                urls: common.url.clone(),
                apis: common.api.clone(),
                pids: common.pid.clone(),
                common,
                cluster: None,
            });
        };
        ensure!(nodes > 0, "--spawn-cluster needs at least one node");
        ensure!(
            common.redis_primaries != Some(0),
            "--redis-primaries needs at least one primary"
        );
        ensure!(
            nodes == 1 || !common.without_redis,
            "--without-redis runs unconnected nodes: use it with one node only"
        );
        let shardcast = match &common.shardcast_bin {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("finding this executable")?
                .with_file_name("shardcast"),
        };
        ensure!(
            shardcast.is_file(),
            "{} does not exist (build it: cargo build --release -p shardcast, or give \
             --shardcast-bin)",
            shardcast.display()
        );
        let spec = ClusterSpec {
            nodes,
            shardcast: &shardcast,
            redis_server: &common.redis_server,
            without_redis: common.without_redis,
            redis_primaries: common.redis_primaries,
            env: node_env,
        };
        let cluster = Cluster::start(&spec, deadline)?;
        eprintln!(
            "started {nodes} node(s){}; logs in {}",
            match (common.without_redis, common.redis_primaries) {
                (true, _) => " without redis".to_owned(),
                (false, None) => " and redis".to_owned(),
                (false, Some(n)) => format!(" and a {n}-primary Redis Cluster"),
            },
            cluster.log_dir.display()
        );
        Ok(Endpoints {
            urls: cluster.urls(),
            apis: cluster.apis(),
            pids: cluster.pids(),
            common,
            cluster: Some(cluster),
        })
    }
}

/// Makes every process this one starts get SIGTERM if this one dies (Ctrl-C included), so
/// no worker, node or redis outlives a run.
pub fn die_with_parent(command: &mut std::process::Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

fn main() -> Result<()> {
    let (common, plan) = match Cli::parse().command {
        Command::Worker => return worker::run(),
        Command::Floor { args } => return floor::run(&args),
        Command::Api { common, args } => {
            let deadline = Deadline::after(Duration::from_secs(common.timeout));
            let endpoints = Endpoints::resolve(common, &[], deadline)?;
            return api::run(&args, &endpoints, deadline);
        }
        Command::Up { common, args } => {
            let deadline = Deadline::after(Duration::from_secs(common.timeout));
            return up::run(&args, common, deadline);
        }
        Command::Connect { common, args } => (common, args.plan()?),
        Command::Fanout { common, args } => (common, args.plan()?),
        Command::P2p { common, args } => (common, args.plan()?),
        Command::Churn { common, args } => (common, args.plan()?),
        Command::Mixed { common, args } => (common, args.plan()?),
    };
    let deadline = Deadline::after(Duration::from_secs(common.timeout));
    let endpoints = Endpoints::resolve(common, &[], deadline)?;
    let result = run::run(&plan, &endpoints, deadline);
    drop(endpoints.cluster);
    result
}
