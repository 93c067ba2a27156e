//! The command line: `run` (the worker, see [`crate::app`]) and the
//! operator commands `enqueue`, `status`, `report`, `ledger init`,
//! `preflight` and `config`.
//!
//! [`Cli::run`] is what `main` calls: it loads the configuration, dispatches,
//! and maps the result to an exit code an operator (or a Kubernetes Job's
//! `podFailurePolicy`) can act on.

mod checkpoint;
pub mod enqueue;
pub mod from_pool;
pub mod input;
mod paced;
pub mod preflight;
mod progress;
pub mod report;
pub mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aws_config::SdkConfig;
use clap::{Args, Parser, Subcommand};

use crate::app::App;
use crate::aws::sqs::{self, Queue};
use crate::config::Settings;
use crate::ledger::LedgerError;
use crate::telemetry;
use crate::worker::{RunOptions, WorkerError};

/// Exit code for a configuration rejected at start-up.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for a campaign halted by a fatal (misconfiguration) error.
pub const EXIT_HALTED: u8 = 3;

#[derive(Parser)]
#[command(
    version,
    about = "Bulk forced password-reset campaigns: SQS jobs -> Cognito ForgotPassword"
)]
pub struct Cli {
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
        args: enqueue::EnqueueArgs,
    },
    /// Show queue depths, the ETA at the configured rate, and the worker's counters.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// The worker's metrics endpoint, e.g. http://127.0.0.1:9464/metrics.
        #[arg(long)]
        metrics_url: Option<String>,
        /// Also count this campaign's users per state in the ledger.
        #[arg(long)]
        campaign: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the campaign's ledger, one row per user
    /// (`username,state,reason,attempts,updated_at`), sorted by username;
    /// a summary of counts per state goes to stderr. With --refresh-status,
    /// first read each pending `sent` user's Cognito status (AdminGetUser)
    /// and add `user_status,checked_at,completion`.
    Report {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        args: report::ReportArgs,
    },
    /// Set up the ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Check the queues, the app client, the pool and the ledger before a campaign.
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

#[derive(Subcommand)]
enum LedgerCommand {
    /// Create the DynamoDB table (on-demand, TTL on `expires_at`) or the
    /// SQLite schema if missing; idempotent; prints what it did.
    Init {
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
            | Command::Report { config, .. }
            | Command::Ledger {
                command: LedgerCommand::Init { config },
            }
            | Command::Preflight { config }
            | Command::Config { config } => config.config.as_deref(),
        }
    }
}

impl Cli {
    /// Runs the parsed command to its exit code.
    pub fn run(self) -> ExitCode {
        telemetry::init_tracing(match self.command {
            Command::Run { .. } => telemetry::LogTo::Stdout,
            _ => telemetry::LogTo::Stderr,
        });
        let config_path = self.command.config_path().map(Path::to_path_buf);
        let settings = match Settings::load(config_path.as_deref()) {
            Ok(s) => s,
            Err(err) => {
                tracing::error!(error = %err, "configuration rejected");
                eprintln!("reset-worker: {err}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let checked = match &self.command {
            Command::Run {
                until_empty: true, ..
            } => settings.check_until_empty(),
            Command::Enqueue { args, .. } => match (args.from_user_pool(), args.pool()) {
                (Some(pool), _) => settings.check_list_pool(pool),
                (None, Some(pool)) => settings.check_pool(pool),
                (None, None) => Ok(()),
            },
            Command::Report { args, .. } if args.refresh_status => {
                settings.check_status_pool(args.pool())
            }
            _ => Ok(()),
        };
        if let Err(err) = checked {
            tracing::error!(error = %err, "configuration rejected");
            eprintln!("reset-worker: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
        if let Command::Config { .. } = self.command {
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
        let result = runtime.block_on(self.command.dispatch(settings, config_path));
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                // A misconfigured ledger (no table, access denied, a file
                // that cannot be opened) is a halt too, whether found at
                // start-up or mid-run: retrying the pod cannot fix it.
                let halted = match err.downcast_ref::<WorkerError>() {
                    Some(WorkerError::Fatal { .. }) => true,
                    Some(WorkerError::Ledger(e)) => e.is_fatal(),
                    _ => err.chain().any(|e| {
                        e.downcast_ref::<LedgerError>()
                            .is_some_and(LedgerError::is_fatal)
                            || e.downcast_ref::<report::RefreshError>()
                                .is_some_and(report::RefreshError::is_fatal)
                            || e.downcast_ref::<from_pool::ListError>()
                                .is_some_and(from_pool::ListError::is_fatal)
                    }),
                };
                // A filter Cognito refuses is the operator's input, like a
                // configuration error.
                let operator_input = err.chain().any(|e| {
                    e.downcast_ref::<from_pool::ListError>()
                        .is_some_and(from_pool::ListError::is_operator_input)
                });
                tracing::error!(
                    error = format!("{err:#}"),
                    "reset-worker stopped with an error"
                );
                eprintln!("reset-worker: {err:#}");
                if operator_input {
                    ExitCode::from(EXIT_CONFIG)
                } else if halted {
                    ExitCode::from(EXIT_HALTED)
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    }
}

impl Command {
    async fn dispatch(
        self,
        settings: Settings,
        config_path: Option<PathBuf>,
    ) -> anyhow::Result<()> {
        match self {
            Command::Run {
                until_empty,
                empty_polls,
                ..
            } => {
                let options = RunOptions {
                    until_empty_polls: until_empty.then_some(empty_polls),
                };
                let shutdown = crate::shutdown::on_signal()?;
                App::build(settings, config_path)
                    .await?
                    .run_until_stopped(shutdown, options)
                    .await
                    .map(|_| ())
            }
            Command::Enqueue { args, .. } => enqueue::run(&settings, args).await,
            Command::Status {
                metrics_url,
                campaign,
                json,
                ..
            } => status::run(&settings, metrics_url, campaign, json).await,
            Command::Report { args, .. } => report::run(&settings, args).await,
            Command::Ledger {
                command: LedgerCommand::Init { .. },
            } => report::init(&settings).await,
            Command::Preflight { .. } => preflight::run(&settings).await,
            Command::Config { .. } => Ok(()),
        }
    }
}

/// The job queue (and dead-letter queue) of `settings`, on `sdk`.
fn queue_with(settings: &Settings, sdk: &SdkConfig) -> Queue {
    Queue::new(
        sqs::build_client(sdk),
        settings.sqs.queue_url.clone(),
        settings.sqs.dead_letter_queue_url.clone(),
    )
}

/// The job queue of `settings`, with the default AWS config.
async fn queue(settings: &Settings) -> Queue {
    queue_with(settings, &crate::aws::load_sdk_config().await)
}

/// Campaign duration at `rps` for `jobs` jobs.
pub fn estimate(jobs: u64, rps: u32) -> String {
    if rps == 0 {
        return "paused (limits.max_rps = 0)".to_owned();
    }
    human_duration(jobs as f64 / f64::from(rps))
}

/// Human-readable duration for estimates.
pub fn human_duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(42.0), "42 s");
        assert_eq!(human_duration(125.0), "2 min 5 s");
        assert_eq!(human_duration(33_480.0), "9 h 18 min");
    }

    #[test]
    fn estimates() {
        assert_eq!(estimate(1_000_000, 30), "9 h 15 min");
        assert!(estimate(5, 0).contains("paused"));
    }
}
