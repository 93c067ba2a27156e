//! One rate budget for every worker that shares a ledger
//! (`limits.scope = "cluster"`): `limits.max_rps` is the campaign's rate,
//! divided among the live workers, not each worker's.
//!
//! Every worker registers in the ledger every [`HEARTBEAT`] and counts as
//! alive for [`ALIVE_FOR`]. Each takes `1 / live workers` of the budget. A
//! worker that joins takes nothing for [`JOIN_DELAY`] (two heartbeats), so
//! every other worker has seen it and lowered its own share before it
//! starts: the shares never add up to more than the budget, not even while
//! workers join or leave. A worker that exits cleanly deregisters, and the
//! others take up its share at their next heartbeat; one that dies is
//! dropped when its registration runs out, after [`ALIVE_FOR`].

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::ledger::{Member, now_ms};

/// How often a worker renews its registration and recomputes its share.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a registration counts as alive without a renewal.
pub const ALIVE_FOR: Duration = Duration::from_secs(10);
/// How long a joining worker waits before it takes a share: two heartbeats,
/// so every other worker has renewed (and seen it) at least once.
pub const JOIN_DELAY: Duration = Duration::from_secs(4);

/// How long a worker waits at exit for its deregistration.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// This worker's share of the budget, given the live members at `now_ms`.
pub fn share_of(members: &[Member], me: &str, now_ms: u64) -> f64 {
    let Some(mine) = members.iter().find(|m| m.worker == me) else {
        // Not registered (yet): take nothing.
        return 0.0;
    };
    let others = members.iter().filter(|m| m.worker != me).count();
    // Alone, nobody has to see this worker first. A worker joining later
    // waits for us to see it, not the other way round.
    if others > 0 && now_ms < mine.joined_at_ms + JOIN_DELAY.as_millis() as u64 {
        return 0.0;
    }
    1.0 / (others + 1) as f64
}

/// Keeps this worker registered and its share applied until `stop` fires,
/// then deregisters. A heartbeat that fails keeps the share in force: while
/// the ledger is down no job can be claimed, so nothing is called anyway.
/// It counts as the ledger failing, like a claim: `/readyz` answers 503
/// (an unreachable ledger) or the campaign halts (a refusal, e.g. IAM), so
/// a worker still waiting for its first share is not ready in name only.
pub(super) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let ledger = &shared.ledger;
    let limiters = &shared.limiters;
    let me = ledger.worker_id().to_owned();
    let mut last_shown = None;
    loop {
        match ledger.heartbeat(ALIVE_FOR).await {
            Ok(members) => {
                if shared.health.set_ledger_up(true) {
                    tracing::info!("ledger answers again; resuming");
                }
                let share = share_of(&members, &me, now_ms());
                limiters.set_share(share);
                if last_shown != Some((members.len(), share > 0.0)) {
                    last_shown = Some((members.len(), share > 0.0));
                    tracing::info!(
                        workers = members.len(),
                        share = format!("{share:.3}"),
                        // This worker's rate in each Region.
                        rps = limiters
                            .configured()
                            .iter()
                            .map(|(region, l)| format!(
                                "{region}={:.2}",
                                f64::from(l.max_rps) * share
                            ))
                            .collect::<Vec<_>>()
                            .join(" "),
                        "cluster rate budget"
                    );
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cluster heartbeat failed; keeping the current share");
                shared.ledger_failed(&err);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
    // Bounded: this runs after the jobs' grace period, and a ledger that does
    // not answer must not hold the exit; the registration expires anyway.
    let left = tokio::time::timeout(LEAVE_TIMEOUT, ledger.leave()).await;
    if let Err(err) = left
        .map_err(|_| "timed out".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        tracing::warn!(error = %err, "could not deregister from the cluster budget; the others take up this share after the expiry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(worker: &str, joined_at_ms: u64) -> Member {
        Member {
            worker: worker.into(),
            joined_at_ms,
        }
    }

    #[test]
    fn shares_add_up_to_at_most_one_while_workers_join() {
        let now = 100_000;
        // Alone: the whole budget at once.
        assert_eq!(share_of(&[member("a", now)], "a", now), 1.0);
        // b just joined: a already counts it (1/2); b waits two heartbeats.
        let both = [member("a", 0), member("b", now)];
        assert_eq!(share_of(&both, "a", now), 0.5);
        assert_eq!(share_of(&both, "b", now), 0.0);
        let later = now + JOIN_DELAY.as_millis() as u64;
        assert_eq!(share_of(&both, "b", later), 0.5);
        // Three live workers, all settled.
        let three = [member("a", 0), member("b", 0), member("c", 0)];
        let sum: f64 = ["a", "b", "c"]
            .iter()
            .map(|w| share_of(&three, w, now))
            .sum();
        assert!((sum - 1.0).abs() < 1e-9);
        // A worker missing from the list (its registration failed) takes nothing.
        assert_eq!(share_of(&three, "d", now), 0.0);
    }
}
