use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use aws_config::{BehaviorVersion, SdkConfig};
use clap::{Args, Parser, Subcommand};
use reset_worker::campaign::{self, Level};
use reset_worker::config::Settings;
use reset_worker::enqueue::{self, Format};
use reset_worker::health::{self, Health};
use reset_worker::queue::Queue;
use reset_worker::worker::{RunOptions, Worker, WorkerError};
use reset_worker::{cognito, queue, reload, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// Exit codes an operator (or a Kubernetes Job's podFailurePolicy) can act on.
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

#[derive(Args, Clone)]
struct ConfigArg {
    /// TOML config file; `RESET_WORKER_*` env vars override it.
    #[arg(long, env = "RESET_WORKER_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Long-poll the queue and reset every job's password.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Exit 0 once the queue is drained (Kubernetes Job mode).
        #[arg(long)]
        until_empty: bool,
        /// With --until-empty: empty receives in a row, with nothing in
        /// flight, that count as drained.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
        empty_polls: u32,
    },
    /// Load a campaign file (CSV, JSONL or one username per line) into the queue.
    Enqueue {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        args: EnqueueArgs,
    },
    /// Show queue depths, the ETA at the configured rate, and the worker's counters.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// The worker's metrics endpoint, e.g. http://127.0.0.1:9464/metrics.
        #[arg(long)]
        metrics_url: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check the queues, the app client and the pool before a campaign.
    Preflight {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the configuration and print every key, its value (secrets
    /// redacted) and where it came from.
    Config {
        #[command(flatten)]
        config: ConfigArg,
    },
}

impl Command {
    fn config_path(&self) -> Option<&Path> {
        match self {
            Command::Run { config, .. }
            | Command::Enqueue { config, .. }
            | Command::Status { config, .. }
            | Command::Preflight { config }
            | Command::Config { config } => config.config.as_deref(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_tracing();
    let config_path = cli.command.config_path().map(Path::to_path_buf);
    let settings = match Settings::load(config_path.as_deref()) {
        Ok(s) => s,
        Err(err) => {
            tracing::error!(error = %err, "configuration rejected");
            eprintln!("reset-worker: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Config { .. } = cli.command {
        for line in settings.explain(config_path.as_deref()) {
            println!("{} = {}    # {}", line.key, line.value, line.source);
        }
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
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run {
                until_empty,
                empty_polls,
                ..
            } => {
                let options = RunOptions {
                    until_empty_polls: until_empty.then_some(empty_polls),
                };
                run(settings, config_path, options).await
            }
            Command::Enqueue { args, .. } => run_enqueue(settings, args).await,
            Command::Status {
                metrics_url, json, ..
            } => run_status(settings, metrics_url, json).await,
            Command::Preflight { .. } => run_preflight(settings).await,
            Command::Config { .. } => Ok(()),
        }
    });
    match result {
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
            eprintln!("reset-worker: {err:#}");
            if halted {
                ExitCode::from(EXIT_HALTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The default chain: env, profile, IRSA web identity, Pod Identity, IMDS;
/// AWS_ENDPOINT_URL_SQS / AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER apply.
async fn aws() -> SdkConfig {
    aws_config::load_defaults(BehaviorVersion::latest()).await
}

fn queue_for(settings: &Settings, sdk: &SdkConfig) -> Queue {
    Queue::new(
        queue::build_client(sdk),
        settings.sqs.queue_url.clone(),
        settings.sqs.dead_letter_queue_url.clone(),
    )
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

    let sdk = aws().await;
    let worker = Worker::new(
        &settings,
        queue::build_client(&sdk),
        cognito::build_client(&sdk, &settings.cognito),
        health,
    );
    tracing::info!(
        queue = %settings.sqs.queue_url,
        action = settings.cognito.action.as_str(),
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

#[derive(Args)]
struct EnqueueArgs {
    /// Campaign ID put on every job.
    #[arg(long)]
    campaign: String,
    /// Input format.
    #[arg(long, value_enum, default_value_t = Format::Auto)]
    format: Format,
    /// Validate and estimate only; send nothing.
    #[arg(long)]
    dry_run: bool,
    /// Continue an interrupted run from its checkpoint.
    #[arg(long)]
    resume: bool,
    /// Checkpoint file (default: FILE.checkpoint; none for stdin unless given).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Where invalid rows are listed (default: FILE.rejects.csv, or
    /// enqueue-rejects.csv for stdin).
    #[arg(long)]
    rejects: Option<PathBuf>,
    /// The campaign file; `-` reads stdin.
    file: String,
}

async fn run_enqueue(settings: Settings, args: EnqueueArgs) -> anyhow::Result<()> {
    let stdin = args.file == "-";
    let mut input: Box<dyn BufRead> = if stdin {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(&args.file)
            .with_context(|| format!("Failed to open {}", args.file))?;
        Box::new(std::io::BufReader::new(file))
    };
    let loaded = enqueue::load(&mut *input, &args.file, args.format, &args.campaign)?;
    let rejects_path = args.rejects.clone().unwrap_or_else(|| {
        if stdin {
            PathBuf::from("enqueue-rejects.csv")
        } else {
            PathBuf::from(format!("{}.rejects.csv", args.file))
        }
    });
    if !loaded.rejects.is_empty() {
        enqueue::write_rejects(&rejects_path, &loaded.rejects)
            .with_context(|| format!("Failed to write {}", rejects_path.display()))?;
    }
    let valid = loaded.jobs.len();
    let estimate = campaign::estimate(valid as u64, settings.limits.max_rps);
    if args.dry_run {
        println!(
            "dry run: {valid} valid jobs, {} invalid, {} duplicate; about {estimate} at limits.max_rps {}",
            loaded.rejects.len(),
            loaded.duplicates,
            settings.limits.max_rps
        );
        if !loaded.rejects.is_empty() {
            println!("invalid rows listed in {}", rejects_path.display());
        }
        return Ok(());
    }
    let checkpoint = args
        .checkpoint
        .clone()
        .or_else(|| (!stdin).then(|| PathBuf::from(format!("{}.checkpoint", args.file))));
    let queue = Arc::new(queue_for(&settings, &aws().await));
    let sent = enqueue::send(
        queue,
        &args.campaign,
        &loaded.jobs,
        checkpoint.as_deref(),
        args.resume,
    )
    .await?;
    println!(
        "enqueued {}, already enqueued {}, invalid {}, duplicate {}; about {estimate} at limits.max_rps {}",
        sent.enqueued,
        sent.already_enqueued,
        loaded.rejects.len(),
        loaded.duplicates,
        settings.limits.max_rps
    );
    if !loaded.rejects.is_empty() {
        println!("invalid rows listed in {}", rejects_path.display());
    }
    Ok(())
}

async fn run_status(
    settings: Settings,
    metrics_url: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let metrics = match &metrics_url {
        Some(url) => Some(
            campaign::http_get(url)
                .await
                .with_context(|| format!("Failed to read {url}"))?,
        ),
        None => None,
    };
    let queue = queue_for(&settings, &aws().await);
    let status = campaign::status(&settings, &queue, metrics).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{status}");
    }
    Ok(())
}

async fn run_preflight(settings: Settings) -> anyhow::Result<()> {
    let sdk = aws().await;
    let queue = queue_for(&settings, &sdk);
    let cognito = cognito::build_client(&sdk, &settings.cognito);
    let checks = campaign::preflight(&settings, &queue, &cognito).await;
    for c in &checks {
        println!("{:<4}  {:<22} {}", c.level, c.name, c.detail);
    }
    let failed = checks.iter().filter(|c| c.level == Level::Fail).count();
    if failed > 0 {
        anyhow::bail!("preflight: {failed} checks failed");
    }
    Ok(())
}
