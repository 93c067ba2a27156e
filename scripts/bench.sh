#!/usr/bin/env bash
# Benchmark: rate-cap accuracy, adaptation to a throttling Cognito, raw
# throughput and cost (SQS requests/job, CPU, peak RSS) of the release worker
# binary against an in-process fake of SQS + Cognito (tests/support/fake_aws.rs)
# on loopback; then the campaign ledger (tests/bench_ledger.rs): goodput at a
# 30/s cap and raw throughput with each backend (memory, SQLite, DynamoDB on a
# moto server it starts), ledger requests per job, p99 claim latency. Never
# calls AWS. Prints markdown reports and writes them to $BENCH_REPORT
# (default: <target dir>/bench_rate.md) and $BENCH_LEDGER_REPORT
# (<target dir>/bench_ledger.md).
#
#   scripts/bench.sh                    # everything, about 3-4 minutes
#   BENCH_SKIP_LEDGER=1 scripts/bench.sh
#   BENCH_ONLY=cap10,raw scripts/bench.sh
#   BENCH_STRICT=1 scripts/bench.sh     # exit non-zero when a goal is missed
#   FAKE_AWS_WORKER_ENV=RESET_WORKER_SQS__DELETE_FLUSH_INTERVAL_MS=1000 scripts/bench.sh
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

target_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
export BENCH_REPORT="${BENCH_REPORT:-$target_dir/bench_rate.md}"
export BENCH_LEDGER_REPORT="${BENCH_LEDGER_REPORT:-$target_dir/bench_ledger.md}"

log "building release test binaries (cargo test --release --test bench_rate --test bench_ledger --no-run)"
cargo test --release --test bench_rate --test bench_ledger --no-run

log "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' + uncommitted changes in src/')"
log "running the benchmark"
cargo test --release --test bench_rate -- --ignored --nocapture --test-threads 1
log "report written to $BENCH_REPORT"

if [[ "${BENCH_SKIP_LEDGER:-}" != "1" ]]; then
  ensure_python_deps
  start_moto "$(free_port)"
  trap stop_moto EXIT
  log "running the ledger benchmark (DynamoDB on moto at $MOTO_URL)"
  TEST_MOTO_URL="$MOTO_URL" cargo test --release --test bench_ledger -- --ignored --nocapture --test-threads 1
  log "report written to $BENCH_LEDGER_REPORT"
fi
