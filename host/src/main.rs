//! `wharf`: parse the command line, then serve or run a client command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use wharf::bench::BenchCommand;
use wharf::cli::{
    self, ClientOpts, GroupCommand, MqttCommand, PluginCommand, QueryCommand, SendArgs,
    TopicCommand,
};
use wharf::config::{Config, LogFormat, Overrides};

/// glibc's malloc arenas are locked across threads (a buffer the store's writer thread frees
/// was allocated on a runtime worker), and that lock showed up as futex waits on the send
/// path; mimalloc frees to per-thread lists without one.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Message broker, MQTT gateway and WebAssembly consumer runtime in one host.
#[derive(Debug, Parser)]
#[command(name = "wharf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the host (broker, HTTP API, plugins).
    Serve(ServeArgs),
    /// Manage topics.
    Topic {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: TopicCommand,
    },
    /// Manage groups.
    Group {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: GroupCommand,
    },
    /// Send one message.
    Send {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(flatten)]
        args: SendArgs,
    },
    /// Query messages by id, key or time range.
    Query {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: QueryCommand,
    },
    /// Deploy and manage consumer plugins.
    Plugin {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: PluginCommand,
    },
    /// Inspect MQTT devices, groups and topics.
    Mqtt {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: MqttCommand,
    },
    /// Run a benchmark and print its figures.
    Bench {
        #[command(subcommand)]
        kind: BenchCommand,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Config file (default: config/wharf.toml when present, else built-in defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (overrides [store] data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP listen address, e.g. 127.0.0.1:8080 (overrides [http] listen).
    #[arg(long)]
    http: Option<String>,
    /// MQTT listen address (overrides [mqtt] listen).
    #[arg(long)]
    mqtt: Option<String>,
    /// RocketMQ remoting listen address (overrides [remoting] listen).
    #[arg(long)]
    remoting: Option<String>,
    /// Log format (overrides [log] format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(a) => {
            let overrides = Overrides {
                data_dir: a.data_dir,
                http: a.http,
                mqtt: a.mqtt,
                remoting: a.remoting,
                log_format: a.log_format,
            };
            let config = Config::resolve(a.config.as_deref(), &overrides)?;
            wharf::serve::init_logging(config.log.format, &config.log.filter);
            wharf::serve::run(config).await
        }
        Command::Topic { opts, cmd } => cli::topic(&opts, cmd).await,
        Command::Group { opts, cmd } => cli::group(&opts, cmd).await,
        Command::Send { opts, args } => cli::send(&opts, args).await,
        Command::Query { opts, cmd } => cli::query(&opts, cmd).await,
        Command::Plugin { opts, cmd } => cli::plugin(&opts, cmd).await,
        Command::Mqtt { opts, cmd } => cli::mqtt(&opts, cmd).await,
        Command::Bench { kind } => {
            wharf::serve::init_logging(LogFormat::Human, "warn");
            kind.run().await
        }
    }
}

/// Prints an error on stderr; a host error leads with its spec code and name.
fn report(e: &anyhow::Error) {
    if let Some(se) = e.downcast_ref::<cli::client::ServerError>() {
        eprintln!("error: {se}");
    } else {
        eprintln!("error: {e:#}");
    }
}
