#!/usr/bin/env bash
# Runs two campaigns end to end against a local moto server (never real AWS),
# with the worker's own subcommands. Exits 0 when both workers drained their
# queue and accounted for every job; else with the first failing worker's exit
# code (1 if it exited 0 without accounting for every job).
#
# Set-up: a user pool, an app client with a secret, the users of
# config/sample-campaign.jsonl, a queue and a dead-letter queue.
#
# Act 1, a file campaign (forgot_password): `preflight`, `enqueue` of
# config/sample-campaign.jsonl, `run --until-empty`, the metrics, `status` and
# the ForgotPassword calls moto received, then what a re-run would enqueue
# (nobody: the SQLite ledger has every user as sent) and the `report`.
#
# Act 2, a breach response (admin_reset_user_password): the users to reset are
# selected from the pool with `enqueue --from-user-pool --filter` (a dry run,
# then for real), `run --until-empty`, then `report --refresh-status` to see
# who has set a new password, before and after one user does.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

CAMPAIGN="config/sample-campaign.jsonl"
CONFIG="config/reset-worker.toml"
[[ -f "$CONFIG" ]] || die "missing $CONFIG"

WORKER_PID=""
DEMO_DIR="$(mktemp -d "${TMPDIR:-/tmp}/reset-worker-demo.XXXXXX")"
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  if [[ -n "$WORKER_PID" ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
    kill -TERM "$WORKER_PID" 2>/dev/null || true
    wait "$WORKER_PID" 2>/dev/null || true
  fi
  stop_moto
  rm -rf "$DEMO_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_python_deps

log "building reset-worker (debug)"
cargo build --quiet
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
WORKER_BIN="$TARGET_DIR/debug/reset-worker"
[[ -x "$WORKER_BIN" ]] || die "no worker binary at $WORKER_BIN"

start_moto "$(free_port)"

stack_exports="$("$PY" scripts/local_stack.py --endpoint "$MOTO_URL" --campaign "$CAMPAIGN" --no-enqueue)"
eval "$stack_exports"
JOBS="$LOCAL_JOB_COUNT"
export RESET_WORKER_COGNITO__USER_POOL_ID="$LOCAL_USER_POOL_ID"

METRICS_ADDR="127.0.0.1:$(free_port)"
export_local_aws_env "$MOTO_URL" "$METRICS_ADDR"
export RUST_LOG="${RUST_LOG:-info}"
# The campaign ledger: the default backend (SQLite), in the demo's own dir.
export RESET_WORKER_LEDGER__PATH="$DEMO_DIR/ledger.sqlite3"

# Sum of every sample of reset_worker_jobs_total in a Prometheus text exposition.
jobs_total() {
  awk '$1 ~ /^reset_worker_jobs_total([{]|$)/ { sum += $NF } END { printf "%d\n", sum }' <<<"$1"
}

# run_until_drained JOBS LOG: runs `reset-worker run --until-empty` in the
# background (log in LOG, metrics on a fresh port), scrapes its metrics until
# reset_worker_jobs_total reaches JOBS, then waits for it to exit by itself
# once the queue is drained. Sets RUN_METRICS (the last scrape), RUN_ACCOUNTED
# (jobs it accounted for) and RUN_RC (its exit code).
run_until_drained() {
  local expected="$1" log_file="$2" metrics_addr scraped deadline
  # A fresh port per run, so a run never finds the previous run's port taken.
  metrics_addr="127.0.0.1:$(free_port)"
  log "running the worker on $expected jobs (metrics on http://$metrics_addr/metrics, log $log_file)"
  RESET_WORKER_METRICS__LISTEN="$metrics_addr" \
    "$WORKER_BIN" run --config "$CONFIG" --until-empty >"$log_file" 2>&1 &
  WORKER_PID=$!

  RUN_METRICS=""
  deadline=$((SECONDS + 120))
  while :; do
    if scraped="$(curl -fsS --max-time 2 "http://$metrics_addr/metrics" 2>/dev/null)"; then
      RUN_METRICS="$scraped"
      if (($(jobs_total "$RUN_METRICS") >= expected)); then
        break
      fi
    fi
    if ! kill -0 "$WORKER_PID" 2>/dev/null; then
      log "worker exited before its metrics accounted for all $expected jobs"
      break
    fi
    if ((SECONDS >= deadline)); then
      log "timed out after 120 s waiting for reset_worker_jobs_total to reach $expected"
      break
    fi
    sleep 0.2
  done
  RUN_ACCOUNTED="$(jobs_total "$RUN_METRICS")"

  # In --until-empty mode the worker exits by itself once the queue is drained.
  deadline=$((SECONDS + 60))
  while kill -0 "$WORKER_PID" 2>/dev/null && ((SECONDS < deadline)); do
    sleep 0.2
  done
  if kill -0 "$WORKER_PID" 2>/dev/null; then
    log "worker still running 60 s after the campaign was accounted for; sending SIGTERM"
    kill -TERM "$WORKER_PID" 2>/dev/null || true
  fi
  RUN_RC=0
  wait "$WORKER_PID" || RUN_RC=$?
  WORKER_PID=""
}

# exit_if_failed NAME EXPECTED: ends the demo after an act whose worker
# failed: with the worker's exit code, or 1 if it exited 0 without accounting
# for all EXPECTED jobs.
exit_if_failed() {
  local name="$1" expected="$2"
  if ((RUN_RC != 0)); then
    log "$name: the worker exited with code $RUN_RC"
    exit "$RUN_RC"
  fi
  if ((RUN_ACCOUNTED < expected)); then
    log "$name: the worker exited 0 but its metrics accounted for only $RUN_ACCOUNTED of $expected jobs"
    exit 1
  fi
}

echo "== act 1: a file campaign (demo-2026-11, forgot_password) =="
log "reset-worker enqueue --campaign demo-2026-11 $CAMPAIGN"
"$WORKER_BIN" enqueue --config "$CONFIG" --campaign demo-2026-11 \
  --checkpoint "$DEMO_DIR/enqueue.checkpoint" --rejects "$DEMO_DIR/rejects.csv" "$CAMPAIGN"

echo "== reset-worker preflight =="
"$WORKER_BIN" preflight --config "$CONFIG" || log "preflight reported a FAIL (see above)"

run_until_drained "$JOBS" "$DEMO_DIR/worker.log"

echo "== metrics (reset_worker_*, histogram buckets omitted) =="
grep '^reset_worker_' <<<"$RUN_METRICS" | grep -v '_bucket{' || echo "(no reset_worker_ metrics scraped)"

echo "== worker log =="
cat "$DEMO_DIR/worker.log"
echo "== reset-worker status --campaign demo-2026-11 =="
"$WORKER_BIN" status --config "$CONFIG" --campaign demo-2026-11
echo "== a re-run: reset-worker enqueue --dry-run (the ledger skips users already sent) =="
"$WORKER_BIN" enqueue --config "$CONFIG" --campaign demo-2026-11 --dry-run \
  --rejects "$DEMO_DIR/rejects-rerun.csv" "$CAMPAIGN"
echo "== reset-worker report --campaign demo-2026-11 =="
"$WORKER_BIN" report --config "$CONFIG" --campaign demo-2026-11 --output "$DEMO_DIR/report.csv"
cat "$DEMO_DIR/report.csv"
echo "== summary (act 1) =="
echo "jobs in campaign:               $JOBS"
echo "jobs accounted in metrics:      $RUN_ACCOUNTED"
echo "ForgotPassword calls (moto):    $(moto_call_count ForgotPassword)"
echo "worker exit code:               $RUN_RC"
exit_if_failed "act 1" "$JOBS"

# Act 2: a breach response. Passwords leaked, so the reset must invalidate
# them: admin_reset_user_password (needs the pool ID, exported above).
echo "== act 2: a breach response (breach-demo, admin_reset_user_password, sign_out) =="
export RESET_WORKER_COGNITO__ACTION=admin_reset_user_password
# Sign-out revokes the refresh tokens, which a reset alone leaves valid.
export RESET_WORKER_COGNITO__SIGN_OUT=true

# set_password USER...: gives each user of the demo pool a permanent password
# (status CONFIRMED), as the user would by signing in or finishing a reset.
set_password() {
  local args=() user
  for user in "$@"; do
    args+=(--set-password "$user")
  done
  "$PY" scripts/local_stack.py --endpoint "$MOTO_URL" --user-pool-id "$LOCAL_USER_POOL_ID" "${args[@]}"
}

# The sample users never set a password (FORCE_CHANGE_PASSWORD), and Cognito
# resets only users who have one (the others' jobs would be rejected). Give
# three of them a password, as if they had signed up.
BREACHED=(bob@example.com carol@example.com dave@example.com)
set_password "${BREACHED[@]}"
# Select the users a reset applies to straight from the pool (ListUsers):
# those with a password. After a real breach the filter is often a prefix,
# such as `email ^= "leak"`; every sample address starts with a different
# letter, so here a prefix would select a single user.
FILTER='cognito:user_status = "CONFIRMED"'

echo "== reset-worker enqueue --campaign breach-demo --from-user-pool --filter '$FILTER' --dry-run =="
"$WORKER_BIN" enqueue --config "$CONFIG" --campaign breach-demo --from-user-pool \
  --filter "$FILTER" --list-rps 20 --dry-run
echo "== reset-worker enqueue --campaign breach-demo --from-user-pool --filter '$FILTER' =="
enqueued="$("$WORKER_BIN" enqueue --config "$CONFIG" --campaign breach-demo --from-user-pool \
  --filter "$FILTER" --list-rps 20 --checkpoint "$DEMO_DIR/breach.checkpoint")"
echo "$enqueued"
BREACH_JOBS="$(sed -n 's/^enqueued \([0-9]*\),.*/\1/p' <<<"$enqueued")"
[[ "$BREACH_JOBS" == "${#BREACHED[@]}" ]] ||
  die "the filter selected ${BREACH_JOBS:-no} users, not the ${#BREACHED[@]} given a password"

run_until_drained "$BREACH_JOBS" "$DEMO_DIR/worker-breach.log"
echo "== worker log (act 2) =="
cat "$DEMO_DIR/worker-breach.log"
echo "== summary (act 2) =="
echo "users selected from the pool:           $BREACH_JOBS"
echo "jobs accounted in metrics:              $RUN_ACCOUNTED"
echo "AdminResetUserPassword calls (moto):    $(moto_call_count AdminResetUserPassword)"
echo "AdminUserGlobalSignOut calls (moto):    $(moto_call_count AdminUserGlobalSignOut)"
echo "worker exit code:                       $RUN_RC"
exit_if_failed "act 2" "$BREACH_JOBS"

# Completion: right after the reset every user is pending (RESET_REQUIRED).
echo "== reset-worker report --campaign breach-demo --refresh-status =="
"$WORKER_BIN" report --config "$CONFIG" --campaign breach-demo --refresh-status \
  --status-rps 50 --output "$DEMO_DIR/breach-report.csv"
cat "$DEMO_DIR/breach-report.csv"
# carol sets a new password. The next refresh (daily, in a real campaign)
# asks Cognito about the users still pending only.
set_password carol@example.com
echo "== reset-worker report --campaign breach-demo --refresh-status (after carol set a new password) =="
"$WORKER_BIN" report --config "$CONFIG" --campaign breach-demo --refresh-status \
  --status-rps 50 --output "$DEMO_DIR/breach-report.csv"
cat "$DEMO_DIR/breach-report.csv"
