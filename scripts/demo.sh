#!/usr/bin/env bash
# Runs a campaign end to end against a local moto server (never real AWS):
# creates a user pool, an app client with a secret, users and queues; then, with
# the worker's own subcommands, runs `preflight`, loads config/sample-campaign.jsonl
# with `enqueue`, drains it with `run --until-empty`, shows the metrics, `status`
# and the ForgotPassword calls moto received, then what a re-run would enqueue
# (nobody: the SQLite ledger has every user as sent) and the campaign's
# `report`, and exits with the worker's exit code.
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

log "reset-worker enqueue --campaign demo-2026-11 $CAMPAIGN"
"$WORKER_BIN" enqueue --config "$CONFIG" --campaign demo-2026-11 \
  --checkpoint "$DEMO_DIR/enqueue.checkpoint" --rejects "$DEMO_DIR/rejects.csv" "$CAMPAIGN"

echo "== reset-worker preflight =="
"$WORKER_BIN" preflight --config "$CONFIG" || log "preflight reported a FAIL (see above)"

WORKER_LOG="$DEMO_DIR/worker.log"
log "running the worker on $JOBS jobs (metrics on http://$METRICS_ADDR/metrics, log $WORKER_LOG)"
"$WORKER_BIN" run --config "$CONFIG" --until-empty >"$WORKER_LOG" 2>&1 &
WORKER_PID=$!

# Sum of every sample of reset_worker_jobs_total in a Prometheus text exposition.
jobs_total() {
  awk '$1 ~ /^reset_worker_jobs_total([{]|$)/ { sum += $NF } END { printf "%d\n", sum }' <<<"$1"
}

metrics=""
deadline=$((SECONDS + 120))
while :; do
  if scraped="$(curl -fsS --max-time 2 "http://$METRICS_ADDR/metrics" 2>/dev/null)"; then
    metrics="$scraped"
    if (($(jobs_total "$metrics") >= JOBS)); then
      break
    fi
  fi
  if ! kill -0 "$WORKER_PID" 2>/dev/null; then
    log "worker exited before its metrics accounted for all $JOBS jobs"
    break
  fi
  if ((SECONDS >= deadline)); then
    log "timed out after 120 s waiting for reset_worker_jobs_total to reach $JOBS"
    break
  fi
  sleep 0.2
done

echo "== metrics (reset_worker_*, histogram buckets omitted) =="
grep '^reset_worker_' <<<"$metrics" | grep -v '_bucket{' || echo "(no reset_worker_ metrics scraped)"
accounted="$(jobs_total "$metrics")"

# In --until-empty mode the worker exits by itself once the queue is drained.
deadline=$((SECONDS + 60))
while kill -0 "$WORKER_PID" 2>/dev/null && ((SECONDS < deadline)); do
  sleep 0.2
done
if kill -0 "$WORKER_PID" 2>/dev/null; then
  log "worker still running 60 s after the campaign was accounted for; sending SIGTERM"
  kill -TERM "$WORKER_PID" 2>/dev/null || true
fi
worker_rc=0
wait "$WORKER_PID" || worker_rc=$?
WORKER_PID=""

echo "== worker log =="
cat "$WORKER_LOG"
echo "== reset-worker status --campaign demo-2026-11 =="
"$WORKER_BIN" status --config "$CONFIG" --campaign demo-2026-11
echo "== a re-run: reset-worker enqueue --dry-run (the ledger skips users already sent) =="
"$WORKER_BIN" enqueue --config "$CONFIG" --campaign demo-2026-11 --dry-run \
  --rejects "$DEMO_DIR/rejects-rerun.csv" "$CAMPAIGN"
echo "== reset-worker report --campaign demo-2026-11 =="
"$WORKER_BIN" report --config "$CONFIG" --campaign demo-2026-11 --output "$DEMO_DIR/report.csv"
cat "$DEMO_DIR/report.csv"
echo "== summary =="
echo "jobs in campaign:               $JOBS"
echo "jobs accounted in metrics:      $accounted"
echo "ForgotPassword calls (moto):    $(moto_forgot_password_count)"
echo "worker exit code:               $worker_rc"

if ((accounted < JOBS && worker_rc == 0)); then
  log "the worker exited 0 but its metrics accounted for only $accounted of $JOBS jobs"
  exit 1
fi
exit "$worker_rc"
