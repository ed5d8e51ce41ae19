//! `wharf bench …`: benchmarks that drive the same code paths users hit and print figures.

pub mod e2e;
pub mod http;
pub mod longpoll;
pub mod mqtt;
pub mod mqtt_brokers;
pub mod nginx;
pub mod pgbench;
pub mod plugin;
pub mod remoting;
pub mod send;
pub mod soak;
pub mod util;

/// Which benchmark to run.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Store append through the broker send path (group commit): msgs/s, MB/s, p50/p99.
    Send(send::SendArgs),
    /// HTTP against a running host: keep-alive sends (optionally against nginx), or the pull consumer.
    Http(http::HttpArgs),
    /// Send → consume → ack through the consumption engine; timer insertion and memory.
    E2e(e2e::E2eArgs),
    /// Send throughput with and without thousands of long polls parked on other queues.
    Longpoll(longpoll::LongpollArgs),
    /// MQTT gateway against Mosquitto (same rows, same run): msgs/s, p50/p99, idle-connection memory.
    Mqtt(mqtt::MqttArgs),
    /// The RocketMQ remoting protocol against a running host: 1/16/64 sync producers, pull consumer.
    Remoting(remoting::RemotingArgs),
    /// Messages/s through a trivial wasm plugin against a native closure; deploy and start times.
    Plugin(plugin::PluginArgs),
    /// 4× the measured send capacity for 60 s: accepted, refused SYSTEM_BUSY, lost (must be 0).
    Soak(soak::SoakArgs),
}

impl BenchCommand {
    /// Runs the chosen benchmark and prints its figures.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            BenchCommand::Send(a) => send::run(a).await,
            BenchCommand::Http(a) => http::run(a).await,
            BenchCommand::E2e(a) => e2e::run(a).await,
            BenchCommand::Longpoll(a) => longpoll::run(a).await,
            BenchCommand::Plugin(a) => plugin::run(a).await,
            BenchCommand::Mqtt(a) => mqtt::run(a).await,
            BenchCommand::Remoting(a) => remoting::run(a).await,
            BenchCommand::Soak(a) => soak::run(a).await,
        }
    }
}
