//! The worker application, built in the library so that `main` only parses
//! the command line and tests start the very same thing in process.
//!
//! [`App::build`] binds the metrics listener (port 0 picks a free one),
//! builds the AWS clients and the worker; [`App::run_until_stopped`] runs
//! the worker, the listener and the config watcher until the shutdown token
//! fires, a fatal error halts the campaign, or the queue is drained.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use aws_config::SdkConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::aws::{cognito, sqs};
use crate::config::Settings;
use crate::health::{self, Health};
use crate::ledger::{Ledger, dynamodb};
use crate::telemetry;
use crate::worker::outcome::Summary;
use crate::worker::{RunOptions, Worker, reload};

/// The AWS clients the worker uses.
pub struct Clients {
    pub sqs: aws_sdk_sqs::Client,
    /// Built by [`cognito::build_client`]: SDK retries off, a call timeout.
    /// The `default` pool's client; pools with a `region` or `endpoint_url`
    /// of their own get clients derived from it
    /// ([`cognito::clients_by_pool`]).
    pub cognito: aws_sdk_cognitoidentityprovider::Client,
    /// For `ledger.backend = "dynamodb"`; built by [`dynamodb::build_client`].
    pub dynamodb: aws_sdk_dynamodb::Client,
}

impl Clients {
    /// Every client from one AWS config.
    pub fn from_sdk(sdk: &SdkConfig, settings: &Settings) -> Self {
        Self {
            sqs: sqs::build_client(sdk),
            cognito: cognito::build_client(sdk, &settings.cognito),
            dynamodb: dynamodb::build_client(sdk),
        }
    }
}

/// A built worker application, listening but not yet polling.
pub struct App {
    settings: Settings,
    /// The config file, watched for live changes; `None` when none was given.
    config_path: Option<PathBuf>,
    worker: Worker,
    metrics_addr: SocketAddr,
    /// The HTTP listener's task, and the token that stops it.
    server: JoinHandle<std::io::Result<()>>,
    server_stop: CancellationToken,
}

impl App {
    /// Builds the app with the default AWS config (credential chain, Region,
    /// `AWS_ENDPOINT_URL_<SERVICE>`).
    pub async fn build(settings: Settings, config_path: Option<PathBuf>) -> anyhow::Result<Self> {
        let sdk = crate::aws::load_sdk_config().await;
        let clients = Clients::from_sdk(&sdk, &settings);
        Self::build_with(settings, config_path, clients).await
    }

    /// Builds the app on the given clients.
    pub async fn build_with(
        settings: Settings,
        config_path: Option<PathBuf>,
        clients: Clients,
    ) -> anyhow::Result<Self> {
        let metrics =
            telemetry::install_recorder().context("Failed to install the metrics recorder")?;
        let health = Arc::new(Health::default());
        let server_stop = CancellationToken::new();
        tokio::spawn(telemetry::upkeep(metrics.clone(), server_stop.clone()));
        let (metrics_addr, server) = health::bind(
            settings.metrics.listen,
            health.clone(),
            metrics,
            server_stop.clone(),
        )
        .await
        .with_context(|| format!("Failed to bind metrics.listen {}", settings.metrics.listen))?;
        let server = tokio::spawn(server);
        tracing::info!(addr = %metrics_addr, "serving /metrics, /healthz and /readyz");
        let ledger = Ledger::open(&settings.ledger, || clients.dynamodb.clone())
            .context("Failed to open the ledger")?;
        let worker = Worker::new(&settings, clients.sqs, clients.cognito, ledger, health);
        Ok(Self {
            settings,
            config_path,
            worker,
            metrics_addr,
            server,
            server_stop,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Runs until `shutdown` fires, a fatal error halts the campaign, or
    /// (with `until_empty_polls`) the queue is drained; then stops the
    /// listener and the config watcher.
    pub async fn run_until_stopped(
        self,
        shutdown: CancellationToken,
        options: RunOptions,
    ) -> anyhow::Result<Summary> {
        let s = &self.settings;
        tracing::info!(
            queue = %s.sqs.queue_url,
            action = s.cognito.action.as_str(),
            concurrency = s.limits.concurrency,
            max_rps = s.limits.max_rps,
            ledger = s.ledger.backend.as_str(),
            secret_hash = s.cognito.client_secret.is_some(),
            pools = s.cognito.pools.len() + 1,
            "worker starting"
        );
        let watcher = self.config_path.clone().map(|path| {
            tokio::spawn(reload::watch(
                path,
                self.settings.clone(),
                self.worker.live(),
                reload::POLL_INTERVAL,
                self.server_stop.clone(),
            ))
        });
        let result = self.worker.run(shutdown, options).await;
        self.server_stop.cancel();
        if let Some(w) = watcher {
            let _ = w.await;
        }
        let _ = self.server.await;
        result.with_context(|| format!("Worker on {} failed", self.settings.sqs.queue_url))
    }
}
