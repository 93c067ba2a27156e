//! reset-worker: runs bulk forced password-reset campaigns on Amazon Cognito.
//!
//! An identity team puts one job per user on an SQS queue; the worker
//! long-polls it, calls Cognito `ForgotPassword` for each job under a
//! concurrency limit and a request-rate cap, and accounts for every message:
//! deleted, deferred, dead-lettered or released, never silently dropped.
//!
//! # Layout
//! - [`config`]: typed settings from `config/*.toml` and `RESET_WORKER_*` env vars, validated at start-up.
//! - [`job`]: parses a message body into a [`job::ResetJob`]; the keyed user hash for logs.
//! - [`dedup`]: suppresses a second send to the same (campaign, user) within a window.
//! - [`queue`]: SQS receive, visibility changes, dead-lettering, batched deletes.
//! - [`cognito`]: the `ForgotPassword` call, `SecretHash`, error codes; SDK retries off.
//! - [`policy`]: [`policy::classify`], the one function that decides what an error means; backoff with full jitter.
//! - [`rate`]: the request-rate cap (`governor`): hard, adaptive (AIMD on throttling) and live.
//! - [`reload`]: watches the config file and applies rate limits and the secret without a restart.
//! - [`worker`]: the receive loop and the per-message task: decide, then apply.
//! - [`outcome`]: the outcome of a message, logged and counted in one place.
//! - [`telemetry`]: tracing set-up and every metric's name.
//! - [`health`]: the `/metrics`, `/healthz`, `/readyz` listener.
//! - [`shutdown`]: SIGTERM/SIGINT to a cancellation token.
//! - [`enqueue`]: `reset-worker enqueue`: validate, de-duplicate and load a campaign file, resumably.
//! - [`campaign`]: `reset-worker preflight` checks and `status`.

pub mod campaign;
pub mod cognito;
pub mod config;
pub mod dedup;
pub mod enqueue;
pub mod health;
pub mod job;
pub mod outcome;
pub mod policy;
pub mod queue;
pub mod rate;
pub mod reload;
pub mod shutdown;
pub mod telemetry;
pub mod worker;
