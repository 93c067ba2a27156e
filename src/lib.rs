//! reset-worker: runs bulk forced password-reset campaigns on Amazon Cognito.
//!
//! An identity team puts one job per user on an SQS queue; the worker
//! long-polls it, calls Cognito `ForgotPassword` (or
//! `AdminResetUserPassword`) for each job under a concurrency limit and a
//! request-rate cap, and accounts for every message: deleted, deferred,
//! dead-lettered or released, never silently dropped.
//!
//! # Layout
//! Rooms by role; the leaves ([`config`], [`telemetry`]) import nothing of ours.
//! - [`app`]: the worker application, built here so `main` and the tests start the same thing.
//! - [`worker`]: the worker; `worker::listener` is the receive loop, `worker::task` runs one
//!   message (decide → call → apply);
//!   [`worker::policy`] is the one place that decides what a result means and what happens next;
//!   [`worker::outcome`] logs and counts it; [`worker::reload`] (live config).
//! - [`ledger`]: the campaign ledger, one entry per (campaign, username), claimed before a call
//!   and finished after it; backends [`ledger::sqlite`] (default), [`ledger::dynamodb`],
//!   [`ledger::memory`] behind one trait.
//! - [`aws`]: the services behind small facades: [`aws::sqs`] (the queue), [`aws::deleter`]
//!   (batched deletes), [`aws::resend`] (dead-letter copies, FIFO deferrals), [`aws::cognito`]
//!   (the reset call, `SecretHash`, error codes; SDK retries off).
//! - [`rate`]: the request-rate cap (`governor`), one limiter per Region: hard, adaptive (a CUBIC-shaped climb after throttling) and live.
//! - [`backoff`]: the one retry schedule (exponential, full jitter) for every retry.
//! - [`job`]: parses a message body into a [`job::ResetJob`]; the keyed user hash for logs.
//! - [`crypto`]: the one keyed hash (HMAC-SHA256).
//! - [`cli`]: the command line; the operator commands [`cli::enqueue`] (with [`cli::input`]
//!   for campaign files), [`cli::status`], [`cli::report`] (and `ledger init`), [`cli::preflight`].
//! - [`health`]: the `/metrics`, `/healthz`, `/readyz` listener; [`shutdown`]: signals to a token.
//! - [`config`]: typed settings from TOML and `RESET_WORKER_*` env vars, validated at start-up.
//! - [`telemetry`]: tracing set-up and every metric's name.

pub mod app;
pub mod aws;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod health;
pub mod job;
pub mod ledger;
pub mod rate;
pub mod shutdown;
pub mod telemetry;
pub mod worker;
