//! Turns SIGTERM/SIGINT into a [`CancellationToken`].
//!
//! The worker never listens for signals itself; it takes the token, so tests
//! stop it exactly when they choose.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit code when a second signal cuts the graceful shutdown short.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Returns a token cancelled by the first SIGTERM or SIGINT. A second signal
/// exits the process at once: the operator has asked twice.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let trigger = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down: no new messages; finishing in-flight calls"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down: no new messages; finishing in-flight calls"),
        }
        trigger.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!(
            "second signal: exiting now; unfinished messages reappear after their visibility timeout"
        );
        std::process::exit(FORCED_EXIT_CODE);
    });
    Ok(token)
}
