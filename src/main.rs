use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use aws_config::BehaviorVersion;
use clap::{Parser, Subcommand};
use reset_worker::config::Settings;
use reset_worker::health::{self, Health};
use reset_worker::worker::{RunOptions, Worker, WorkerError};
use reset_worker::{cognito, queue, reload, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// Exit codes an operator (or a Kubernetes Job's backoffLimit) can act on.
const EXIT_CONFIG: u8 = 2;
const EXIT_HALTED: u8 = 3;

#[derive(Parser)]
#[command(
    version,
    about = "Bulk forced password-reset campaigns: SQS jobs -> Cognito ForgotPassword"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Long-poll the queue and call ForgotPassword for every job.
    Run {
        /// TOML config file; `RESET_WORKER_*` env vars override it.
        #[arg(long, env = "RESET_WORKER_CONFIG")]
        config: Option<PathBuf>,
        /// Exit 0 once the queue is drained (Kubernetes Job mode).
        #[arg(long)]
        until_empty: bool,
        /// With --until-empty: empty receives in a row, with nothing in
        /// flight, that count as drained.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
        empty_polls: u32,
    },
    /// Validate the configuration and print it with secrets redacted.
    Config {
        #[arg(long, env = "RESET_WORKER_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_tracing();
    let (config, run_options) = match &cli.command {
        Command::Run {
            config,
            until_empty,
            empty_polls,
        } => (
            config.clone(),
            RunOptions {
                until_empty_polls: until_empty.then_some(*empty_polls),
            },
        ),
        Command::Config { config } => (config.clone(), RunOptions::default()),
    };
    let settings = match Settings::load(config.as_deref()) {
        Ok(s) => s,
        Err(err) => {
            tracing::error!(error = %err, "configuration rejected");
            eprintln!("reset-worker: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Config { .. } = cli.command {
        println!("{settings:#?}");
        return ExitCode::SUCCESS;
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("reset-worker: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings, config, run_options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let halted = matches!(
                err.downcast_ref::<WorkerError>(),
                Some(WorkerError::Fatal { .. })
            );
            tracing::error!(
                error = format!("{err:#}"),
                "reset-worker stopped with an error"
            );
            if halted {
                ExitCode::from(EXIT_HALTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(
    settings: Settings,
    config: Option<PathBuf>,
    options: RunOptions,
) -> anyhow::Result<()> {
    let metrics =
        telemetry::install_recorder().context("Failed to install the metrics recorder")?;
    let shutdown = shutdown::on_signal().context("Failed to install signal handlers")?;
    let health = Arc::new(Health::default());
    let server_stop = CancellationToken::new();
    let (addr, server) = health::bind(
        settings.metrics.listen,
        health.clone(),
        metrics,
        server_stop.clone(),
    )
    .await
    .with_context(|| format!("Failed to bind metrics.listen {}", settings.metrics.listen))?;
    let server = tokio::spawn(server);
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");

    // The default chain: env, profile, IRSA web identity, Pod Identity, IMDS;
    // AWS_ENDPOINT_URL_SQS / AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER apply.
    let sdk = aws_config::load_defaults(BehaviorVersion::latest()).await;
    let worker = Worker::new(
        &settings,
        queue::build_client(&sdk),
        cognito::build_client(&sdk, &settings.cognito),
        health,
    );
    tracing::info!(
        queue = %settings.sqs.queue_url,
        concurrency = settings.limits.concurrency,
        max_rps = settings.limits.max_rps,
        secret_hash = settings.cognito.client_secret.is_some(),
        "worker starting"
    );
    let watcher = config.map(|path| {
        tokio::spawn(reload::watch(
            path,
            settings.clone(),
            worker.live(),
            reload::POLL_INTERVAL,
            server_stop.clone(),
        ))
    });
    let result = worker.run(shutdown, options).await;
    server_stop.cancel();
    if let Some(w) = watcher {
        let _ = w.await;
    }
    let _ = server.await;
    result
        .map(|_| ())
        .with_context(|| format!("Worker on {} failed", settings.sqs.queue_url))
}
