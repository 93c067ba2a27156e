#!/usr/bin/env bash
# Fuzzes the job parser with cargo-fuzz (libFuzzer). Not part of the test
# suite; run it by hand: ./scripts/fuzz.sh [SECONDS] (default 60).
# The toolchain here is stable; RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass the
# sanitizer flags it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
corpus="tests/fuzz/corpus/parse_job"
mkdir -p "$corpus"
# Seed with the sample campaign so the fuzzer starts from valid jobs.
[[ -n "$(ls -A "$corpus")" ]] || split -l 1 config/sample-campaign.jsonl "$corpus/seed-"
cargo fuzz run --fuzz-dir tests/fuzz parse_job "$corpus" -- -max_total_time="$seconds" -max_len=4096
