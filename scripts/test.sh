#!/usr/bin/env bash
# Full check: formatting, clippy (warnings are errors), then every test target
# against one local moto server (never real AWS). .ci/run runs exactly this.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

started=$SECONDS
finish() {
  local rc=$?
  stop_moto
  log "test.sh finished with exit code $rc in $((SECONDS - started)) s"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for component in rustfmt clippy; do
  subcommand="${component/rustfmt/fmt}"
  if ! cargo "$subcommand" --version >/dev/null 2>&1; then
    rustup component add "$component" || log "could not add $component (offline?)"
  fi
done

ensure_python_deps

log "cargo fmt --check"
cargo fmt --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
./scripts/check-deploy.sh # deploy/: kustomize, schemas, lint, config, metric names

# Supply chain: licenses, sources and banned (unmaintained) crates, offline.
if ! command -v cargo-deny >/dev/null 2>&1; then
  log "installing cargo-deny (cargo install --locked; a few minutes, once per machine)"
  cargo install --locked cargo-deny
fi
log "cargo deny --offline check bans licenses sources"
cargo deny --offline check bans licenses sources

start_moto "$(free_port)"
# Not RESET_WORKER_*: the worker's config loader reads every variable with that
# prefix and rejects unknown keys (its unit tests would fail).
export TEST_MOTO_URL="$MOTO_URL"

log "cargo test --all-targets"
cargo test --all-targets
