#!/usr/bin/env bash
# Benchmark: rate-cap accuracy, adaptation to a throttling Cognito, raw
# throughput and cost (SQS requests/job, CPU, peak RSS) of the release worker
# binary against an in-process fake of SQS + Cognito (tests/support/fake_aws.rs)
# on loopback. Needs neither moto nor AWS. Prints a markdown report and writes
# it to $BENCH_REPORT (default: <target dir>/bench_rate.md).
#
#   scripts/bench.sh                    # everything, about 1-2 minutes
#   BENCH_ONLY=cap10,raw scripts/bench.sh
#   BENCH_STRICT=1 scripts/bench.sh     # exit non-zero when a goal is missed
#   FAKE_AWS_WORKER_ENV=RESET_WORKER_SQS__DELETE_FLUSH_INTERVAL_MS=1000 scripts/bench.sh
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

target_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
export BENCH_REPORT="${BENCH_REPORT:-$target_dir/bench_rate.md}"

log "building release test binaries (cargo test --release --test bench_rate --no-run)"
cargo test --release --test bench_rate --no-run

log "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' + uncommitted changes in src/')"
log "running the benchmark"
cargo test --release --test bench_rate -- --ignored --nocapture --test-threads 1
log "report written to $BENCH_REPORT"
