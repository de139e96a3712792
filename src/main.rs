//! The `shardcast` binary: parses the command line, sets up logging and signals, runs a node.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shardcast::config::{Config, LogFormat, ServeFlags};
use shardcast::Node;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Clustered WebSocket push gateway.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve(ServeFlags),
}

/// `mi_option_arena_eager_commit` in mimalloc.h's `mi_option_e` (the crate names no constant).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// A gateway holds millions of small long-lived objects: have mimalloc commit arena memory
/// as it is used rather than eagerly, so RSS tracks what connections use (measured at 10,000
/// idle connections: about 2.7 KiB of RSS per connection with eager commit, 0.7 KiB without;
/// see BENCHMARKS.md). The option is read when mimalloc reserves its first arena, which
/// happens on the first allocation, before `main`; so it is set from `.init_array`, which the
/// loader runs before any Rust code allocates.
extern "C" fn tune_allocator() {
    // SAFETY: mi_option_set only stores an option value; any value is valid for this option.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

/// `EX_USAGE` from sysexits.h: the configuration is wrong.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let Command::Serve(flags) = Cli::parse().command;
    let config = match Config::load(&flags) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("shardcast: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging(config.log_format);
    if config.dev {
        tracing::warn!("--dev: trusting ?user=NAME and serving /echo; not for production");
    }
    let node = match Node::start(config) {
        Ok(node) => node,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let stopper = node.stopper();
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut received = signals.forever();
            if let Some(signal) = received.next() {
                tracing::info!(signal, "signal received; draining");
                stopper.stop();
            }
            if received.next().is_some() {
                tracing::warn!("second signal; exiting at once");
                std::process::exit(1);
            }
        })
        .expect("spawning the signal thread");
    node.join();
    ExitCode::SUCCESS
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
